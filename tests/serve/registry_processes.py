"""Registry versions and `genforge serve --model NAME@REF` servers as real processes, for the tests of
serve/versions.py, serve/versioned_app.py and the replicas sharing one PostgreSQL store."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import torch

from tests.conftest import tiny_random_llama

from .conftest import ROOT, CliServer, _genforge_command, free_socket
from .processes import CHILD_ENV, _stop, _wait_healthy, genforge

ADMIN_KEY = "sk-admin"


def save_versions(root: Path, count: int) -> list[Path]:
    """`count` model folders of the tiny random Llama, each with its own weights (a different digest
    and different greedy text): what successive trainings would push."""
    model, tok = tiny_random_llama()
    folders = []
    for i in range(count):
        with torch.no_grad():
            if i:
                torch.manual_seed(i)
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 0.05)
        folder = root / f"run-{i + 1}" / "model"
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        folders.append(folder.parent)
    return folders


def push_all(runs: list[Path], name: str, store: str, registry_dir: Path) -> None:
    for run in runs:
        done = genforge("registry", "push", str(run), "--name", name, "--store", store,
                        "--registry-dir", str(registry_dir))
        assert done.returncode == 0, done.stderr


@contextlib.contextmanager
def serving_ref(ref: str, *argsets: list[str], store: str, registry_dir: Path, logs: Path,
                env: dict | None = None) -> Iterator[list[CliServer]]:
    """`genforge serve --model REF ARGS...` once per argument list, each on a free port; all start at
    once (their model loads overlap) and are stopped with SIGTERM on exit."""
    servers = []
    try:
        for args in argsets or ([],):
            sock = free_socket()
            port = sock.getsockname()[1]
            sock.close()  # the CLI binds it itself; the gap is a few milliseconds
            log = logs / f"serve-{port}.log"
            cmd = [*_genforge_command(), "serve", "--model", ref, "--port", str(port), "--store", store,
                   "--registry-dir", str(registry_dir), "--enforce-eager", "--api-key", ADMIN_KEY, *args]
            with log.open("wb") as out:
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**CHILD_ENV, **(env or {})},
                                        cwd=ROOT)
            servers.append(CliServer(f"http://127.0.0.1:{port}", api_key=ADMIN_KEY, proc=proc, log=log))
        for server in servers:
            _wait_healthy(server, deadline=time.monotonic() + 120)
        yield servers
    finally:
        for server in servers:
            _stop(server)


def client(server: CliServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key=server.api_key, max_retries=0, timeout=60)


def admin(server: CliServer, action: str, body: dict | None = None, *, key: str | None = ADMIN_KEY) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    if action == "versions":
        return httpx.get(server.url + "/admin/versions", headers=headers, timeout=120)
    return httpx.post(server.url + f"/admin/{action}", json=body, headers=headers, timeout=120)


def version_of(server: CliServer, user: str | None = None, **kw) -> str:
    """Which version answered one small completions request (the x-genforge-model-version header)."""
    raw = client(server).completions.with_raw_response.create(model="nano", prompt="the quick", max_tokens=1,
                                                              temperature=0, **({"user": user} if user else {}), **kw)
    raw.parse()
    return raw.headers["x-genforge-model-version"]
