"""`genforge serve --upstream URL` end to end: a real `genforge serve` of lm-nano as the upstream, a real
gateway process in front of it (with the semantic cache on), and the openai client against both."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from .conftest import MODEL_NAME, ROOT, CliServer, _genforge_command, free_socket
from .processes import CHILD_ENV, _stop, _wait_healthy, genforge, serving

pytestmark = pytest.mark.slow

MSGS = [{"role": "user", "content": "What is a class?"}]


@pytest.fixture(scope="module")
def pair(lm_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[CliServer, CliServer]]:
    """(upstream, gateway): the gateway forwards to the upstream and caches deterministic chat answers."""
    logs = tmp_path_factory.mktemp("upstream")
    with serving(lm_run, [], logs=logs) as (upstream,):
        sock = free_socket()
        port = sock.getsockname()[1]
        sock.close()
        log = logs / "gateway.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([*_genforge_command(), "serve", "--upstream", upstream.url, "--port", str(port),
                                     "--cache", "--state-dir", str(logs / "state")],
                                    stdout=out, stderr=subprocess.STDOUT, env=CHILD_ENV, cwd=ROOT)
        gateway = CliServer(f"http://127.0.0.1:{port}", proc=proc, log=log)
        try:
            # its app layer (embedder, verifier) loads in a process at idle priority: slow on a busy machine
            _wait_healthy(gateway, time.monotonic() + 300)
            yield upstream, gateway
        finally:
            _stop(gateway)


def client(server: CliServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60)


def test_models_and_health(pair) -> None:
    upstream, gateway = pair
    assert [m.id for m in client(gateway).models.list().data] == [m.id for m in client(upstream).models.list().data]
    health = httpx.get(gateway.url + "/health", timeout=10)
    assert health.status_code == 200
    assert health.json()["upstream"] == {"url": upstream.url, "ok": True}
    # the gateway serves the web console too, and tells it what it offers
    assert "genforge console" in httpx.get(gateway.url + "/", timeout=10).text
    features = httpx.get(gateway.v1 + "/features", timeout=10).json()
    assert features["chat"] and features["cache"] and features["upstream"] == upstream.url
    assert features["images"] is None and not features["documents"]


def test_completion_and_chat_equal_the_upstreams(pair) -> None:
    upstream, gateway = pair
    kw = {"model": MODEL_NAME, "prompt": "In Python, a class", "max_tokens": 12, "temperature": 0}
    direct, via = client(upstream).completions.create(**kw), client(gateway).completions.create(**kw)
    assert via.choices[0].text == direct.choices[0].text and via.choices[0].text
    assert via.usage == direct.usage
    # n=2 with a seed: two different sampled answers, the same on both paths, and usage counts both
    kw = {"model": MODEL_NAME, "messages": MSGS, "max_tokens": 10, "temperature": 1.0, "seed": 3, "n": 2}
    direct, via = client(upstream).chat.completions.create(**kw), client(gateway).chat.completions.create(**kw)
    assert [c.message.content for c in via.choices] == [c.message.content for c in direct.choices]
    assert len(via.choices) == 2 and via.usage == direct.usage and via.usage.completion_tokens > 10


def test_streaming_passes_chunk_by_chunk(pair) -> None:
    upstream, gateway = pair
    kw = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "import"}], "max_tokens": 12,
          "temperature": 0.5, "seed": 1, "stream": True, "stream_options": {"include_usage": True}}

    def pieces(server: CliServer) -> tuple[list[str], object]:
        chunks = list(client(server).chat.completions.create(**kw))
        return [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content], chunks[-1].usage

    direct, direct_usage = pieces(upstream)
    via, via_usage = pieces(gateway)
    assert via == direct and len(via) > 1  # the same text in the same chunks, not one buffered blob
    assert via_usage == direct_usage and via_usage.completion_tokens > 0


def test_upstream_errors_pass_through(pair) -> None:
    upstream, gateway = pair
    body = {"model": MODEL_NAME, "prompt": "x", "max_tokens": 100_000}
    direct = httpx.post(upstream.v1 + "/completions", json=body, timeout=30)
    via = httpx.post(gateway.v1 + "/completions", json=body, timeout=30)
    assert direct.status_code == 400
    assert via.status_code == 400 and via.json() == direct.json()
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client(gateway).chat.completions.create(model=MODEL_NAME, messages=MSGS, max_tokens=100_000)


def test_semantic_cache_hits_on_the_second_request(pair) -> None:
    _, gateway = pair
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "How do I open a file?"}],
            "max_tokens": 8, "temperature": 0}
    first = httpx.post(gateway.v1 + "/chat/completions", json=body, timeout=60)
    second = httpx.post(gateway.v1 + "/chat/completions", json=body, timeout=60)
    assert first.headers["x-genforge-cache"] == "miss"
    assert second.headers["x-genforge-cache"] == "hit"
    assert second.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
    # a streamed miss is stored once its stream has ended, and the next request hits it
    streamed = {**body, "messages": [{"role": "user", "content": "What does yield do?"}], "stream": True,
                "stream_options": {"include_usage": True}}
    chunks = list(client(gateway).chat.completions.create(**streamed))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    again = httpx.post(gateway.v1 + "/chat/completions", json={**streamed, "stream": False}, timeout=60)
    assert again.headers["x-genforge-cache"] == "hit"
    assert again.json()["choices"][0]["message"]["content"] == text


def test_refused_engine_flags_are_one_line_errors() -> None:
    r = genforge("serve", "--upstream", "http://127.0.0.1:9", "--watermark", "k" * 16)
    assert r.returncode == 2
    assert "--watermark with --upstream" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = genforge("serve", "--upstream", "http://127.0.0.1:9", "--decode", "compiled")
    assert r.returncode == 2 and "--decode/--enforce-eager with --upstream" in r.stderr


def test_upstream_down_is_502_and_health_503(pair) -> None:  # last: it stops the upstream
    upstream, gateway = pair
    _stop(upstream)
    with pytest.raises(openai.APIStatusError) as err:
        client(gateway).completions.create(model=MODEL_NAME, prompt="x", max_tokens=2)
    assert err.value.status_code == 502 and err.value.body["code"] == "upstream_unavailable"
    health = httpx.get(gateway.url + "/health", timeout=10)
    assert health.status_code == 503 and health.json()["upstream"]["ok"] is False


# ---------------------------------------------------------------- llama.cpp's llama-server as the upstream

def _llama_server() -> tuple[Path | None, str]:
    """(the llama-server binary, why not): GENFORGE_LLAMA_SERVER, else the one benchmarks/peers.py builds."""
    named = os.environ.get("GENFORGE_LLAMA_SERVER")
    cache = Path(os.environ.get("GENFORGE_BENCH_CACHE", Path.home() / ".cache" / "genforge-bench"))
    path = Path(named) if named else cache / "llama.cpp" / "build" / "bin" / "llama-server"
    if not path.is_file():
        return None, (f"no llama-server at {path}: set GENFORGE_LLAMA_SERVER=PATH or run `python benchmarks/peers.py "
                      "--llama` (a 2-core build takes about an hour, so CI does not)")
    return path, ""


@pytest.fixture(scope="module")
def llama_pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[tuple[CliServer, CliServer]]:
    """(llama-server over lm-nano converted to GGUF, a gateway in front of it)."""
    binary, why = _llama_server()
    if binary is None:
        pytest.skip(why)
    lm_run = request.getfixturevalue("lm_run")  # trained only when the test can run
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from peers import convert_gguf  # the vendored converter, with the GPT-2 pre-tokenizer mapping it needs

    gguf = convert_gguf(lm_run / "model", "f32")
    if gguf["status"] != "ok":
        pytest.skip(f"cannot convert the test model to GGUF: {gguf['status']}")
    logs = tmp_path_factory.mktemp("llama")
    servers = []
    try:
        for name, cmd in (("llama-server", [str(binary), "-m", gguf["path"], "-np", "4", "-c", "1024", "-t", "1",
                                            "--host", "127.0.0.1", "--alias", MODEL_NAME, "--port"]),
                          ("gateway", [*_genforge_command(), "serve", "--upstream", None, "--port"])):
            sock = free_socket()
            port = sock.getsockname()[1]
            sock.close()
            cmd = [servers[0].url if c is None else c for c in cmd] + [str(port)]
            log = logs / f"{name}.log"
            with log.open("wb") as out:
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=CHILD_ENV, cwd=ROOT)
            servers.append(CliServer(f"http://127.0.0.1:{port}", proc=proc, log=log))
            _wait_healthy(servers[-1], time.monotonic() + 180)
        yield servers[0], servers[1]
    finally:
        for server in servers:
            _stop(server)


def counts(usage) -> tuple[int, int, int]:
    return usage.prompt_tokens, usage.completion_tokens, usage.total_tokens


def test_llama_server_passes_through_faithfully(llama_pair) -> None:
    llama, gateway = llama_pair
    health = httpx.get(gateway.url + "/health", timeout=10).json()
    assert health["upstream"] == {"url": llama.url, "ok": True}
    kw = {"model": MODEL_NAME, "prompt": "In Python, a class", "max_tokens": 12, "temperature": 0}
    direct, via = client(llama).completions.create(**kw), client(gateway).completions.create(**kw)
    assert via.choices[0].text == direct.choices[0].text and via.choices[0].text
    # The counts; llama.cpp's prompt cache makes a repeated prompt's cached-token details differ by request.
    assert counts(via.usage) == counts(direct.usage) and via.usage.completion_tokens > 0

    def pieces(server: CliServer) -> tuple[list[str], object]:
        chunks = list(client(server).completions.create(stream=True, stream_options={"include_usage": True}, **kw))
        return [c.choices[0].text for c in chunks if c.choices and c.choices[0].text], chunks[-1].usage

    direct_chunks, direct_usage = pieces(llama)
    via_chunks, via_usage = pieces(gateway)
    assert via_chunks == direct_chunks and len(via_chunks) > 1 and "".join(via_chunks) == via.choices[0].text
    assert counts(via_usage) == counts(direct_usage)
    # llama.cpp's own error (a prompt beyond its context) reaches the client with its status and body
    body = {**kw, "prompt": "In Python, a class " * 400}
    direct_err = httpx.post(llama.v1 + "/completions", json=body, timeout=60)
    via_err = httpx.post(gateway.v1 + "/completions", json=body, timeout=60)
    assert 400 <= direct_err.status_code < 500
    assert via_err.status_code == direct_err.status_code and via_err.json() == direct_err.json()
