"""Fixtures for the HTTP API tests: one briefly trained model per session, real servers on real ports.

The model is trained through the real pipeline (builtin:pydoc -> byte-level BPE dataset ->
`jobs.train.run_recipe` with the lm-nano preset). A trained model matters: random weights have
near-tied logits, and then batching's float-rounding noise flips greedy choices, which would make
"batched equals sequential" flaky for a reason that has nothing to do with the server.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .console_browser import browser  # noqa: E402,F401  (the web console tests' chromium)

ROOT = Path(__file__).resolve().parents[2]
MODEL_NAME = "nano"
CORPUS = ["the quick brown fox jumps over the lazy dog", "héllo wörld, 日本語 テキスト 😀 emoji",
          "def f(x):\n    return x + 1", "stop here. END of text", "a", "lorem ipsum dolor sit amet"]


# ---------------------------------------------------------------- engine-level: a random tiny Llama

@pytest.fixture(scope="session")
def tok() -> PreTrainedTokenizerFast:
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>")


@pytest.fixture(scope="session")
def model(tok) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, eos_token_id=0)
    return LlamaForCausalLM(cfg).eval()


# ---------------------------------------------------------------- HTTP-level: a trained lm-nano


@pytest.fixture(scope="session")
def lm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A genforge run dir holding an lm-nano trained 200 steps on the CPython docs (~20 s).

    Context 128 x batch 16 rather than the preset's 256 x 8: the same tokens per step, but after
    200 steps its greedy text varies instead of collapsing into runs of newlines.
    """
    from genforge.data.tokens import prepare_text_dataset
    from genforge.jobs.train import run_recipe

    if os.environ.get("GENFORGE_TEST_LM_RUN"):  # a copy of this run kept from before: local iterations only
        return Path(os.environ["GENFORGE_TEST_LM_RUN"])
    root = tmp_path_factory.mktemp("serve-lm")
    prepare_text_dataset("builtin:pydoc", root / "data", vocab_size=512)
    outcome = run_recipe(ROOT / "configs" / "lm-nano.yaml", overrides=[
        f"dataset={root / 'data'}", f"out_dir={root / 'runs'}", "name=nano",
        "model.context_length=128", "train.batch_size=16", "train.max_steps=200", "train.warmup_steps=20",
        "train.eval_every=200", "train.eval_batches=4", "train.checkpoint_every=1000", "train.log_every=50"])
    return outcome.run.path


@pytest.fixture(scope="session")
def lm(lm_run: Path):
    """(model, tokenizer) loaded once and shared by the in-process apps (each has its own engine)."""
    from genforge.models.lm import load_lm

    return load_lm(lm_run)


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@dataclass
class Live:
    """A running server: its base URL and, for metrics checks, a way to read /metrics."""

    url: str
    api_key: str = "unused"
    app: object = None  # the in-process Gate (its .state has service and metrics), when there is one

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels` (0 if none)."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            head, _, value = line.rpartition(" ")
            series, _, label_text = head.partition("{")
            if series != name:
                continue
            if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
                total += float(value)
        return total


@contextlib.contextmanager
def serve_in_thread(app, **config) -> Iterator[Live]:
    """Run `app` under a real uvicorn, configured as `genforge serve` does (serve/http.py; `config`
    overrides, e.g. root_path or header_timeout), on a free port in a background thread."""
    from genforge.serve.http import uvicorn_config

    sock = free_socket()
    server = uvicorn.Server(uvicorn_config(app, log_level="warning", **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield Live(f"http://127.0.0.1:{sock.getsockname()[1]}")
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@contextlib.contextmanager
def lm_server(lm, config: dict | None = None, **app_kw) -> Iterator[Live]:
    """A fresh in-process app (its own engine) over the shared lm-nano, with `app_kw` settings."""
    from genforge.serve.server import create_app

    model, tokenizer = lm
    app_kw.setdefault("served_model_name", MODEL_NAME)
    app = create_app(model=model, tokenizer=tokenizer, **app_kw)
    with serve_in_thread(app, **(config or {})) as live:
        live.app = app
        yield live


@pytest.fixture(scope="session")
def api(lm) -> Iterator[Live]:
    """The main in-process server (default limits)."""
    from genforge.serve.server import create_app

    model, tokenizer = lm
    with serve_in_thread(create_app(model=model, tokenizer=tokenizer, served_model_name=MODEL_NAME)) as live:
        yield live


@pytest.fixture(scope="session")
def tiny_api(lm) -> Iterator[Live]:
    """One batch slot and one queue place: a burst of requests overflows it."""
    from genforge.serve.server import create_app

    model, tokenizer = lm
    app = create_app(model=model, tokenizer=tokenizer, served_model_name=MODEL_NAME, max_batch_size=1, max_queue=1)
    with serve_in_thread(app) as live:
        yield live


@pytest.fixture(scope="session")
def serial_api(lm) -> Iterator[Live]:
    """One batch slot and a long queue: n choices run one after another, so a request with many
    choices is slow enough (whatever the machine) for a client to leave in the middle of it."""
    from genforge.serve.server import create_app

    model, tokenizer = lm
    app = create_app(model=model, tokenizer=tokenizer, served_model_name=MODEL_NAME, max_batch_size=1, max_queue=64)
    with serve_in_thread(app) as live:
        yield live


def _genforge_command() -> list[str]:
    script = Path(sys.executable).parent / "genforge"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "genforge.cli"]


@dataclass
class CliServer(Live):
    proc: subprocess.Popen | None = None
    log: Path | None = None


@pytest.fixture(scope="session")
def cli_api(lm_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliServer]:
    """`genforge serve RUN` as a real subprocess, with one key from --api-key and one from the env."""
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()  # the CLI binds it itself; the gap is a few milliseconds
    log = tmp_path_factory.mktemp("cli") / "serve.log"
    env = {**os.environ, "GENFORGE_API_KEYS": "env-key"}
    cmd = [*_genforge_command(), "serve", str(lm_run), "--port", str(port), "--served-model-name", MODEL_NAME,
           "--api-key", "sk-test", "--max-batch-size", "4", "--enforce-eager"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    live = CliServer(f"http://127.0.0.1:{port}", api_key="sk-test", proc=proc, log=log)
    deadline = time.monotonic() + 90
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"genforge serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(live.url + "/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"genforge serve did not come up:\n{log.read_text()}")
        time.sleep(0.2)
    try:
        yield live
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
