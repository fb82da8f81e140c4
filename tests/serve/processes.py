"""`genforge` as real processes for the serve tests: one-shot commands and `genforge serve` servers."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from .conftest import MODEL_NAME, ROOT, CliServer, _genforge_command, free_socket

# One intra-op thread per child: two servers and an ingest share the machine's cores, and OpenMP's
# spin-waiting makes every one of them many times slower when they oversubscribe it.
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def genforge(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run `genforge ARGS...` to completion; stdout and stderr as text."""
    return subprocess.run([*_genforge_command(), *args], capture_output=True, text=True, timeout=timeout,
                          env=CHILD_ENV, cwd=ROOT)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _wait_healthy(server: CliServer, deadline: float) -> None:
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"genforge serve exited with {server.proc.returncode}:\n{server.log.read_text()}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"genforge serve did not come up:\n{server.log.read_text()}")
        time.sleep(0.2)


def _stop(server: CliServer) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


@contextlib.contextmanager
def serving(model: Path, *argsets: list[str], logs: Path) -> Iterator[list[CliServer]]:
    """`genforge serve MODEL ARGS...` once per argument list, each on a free port; all start at once
    (their model and embedder loads overlap) and are stopped with SIGTERM on exit."""
    servers = []
    try:
        for args in argsets:
            sock = free_socket()
            port = sock.getsockname()[1]
            sock.close()  # the CLI binds it itself; the gap is a few milliseconds
            log = logs / f"serve-{port}.log"
            with log.open("wb") as out:
                proc = subprocess.Popen([*_genforge_command(), "serve", str(model), "--port", str(port),
                                         "--served-model-name", MODEL_NAME, "--enforce-eager", *args], stdout=out, stderr=subprocess.STDOUT,
                                        env=CHILD_ENV, cwd=ROOT)
            servers.append(CliServer(f"http://127.0.0.1:{port}", proc=proc, log=log))
        deadline = time.monotonic() + 120
        for server in servers:
            _wait_healthy(server, deadline)
        yield servers
    finally:
        for server in servers:
            _stop(server)


def ask(server: CliServer, question: str, **kw) -> httpx.Response:
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": question}], "max_tokens": 8,
            "temperature": 0, **kw}
    return httpx.post(server.v1 + "/chat/completions", json=body, timeout=60)


def answer(response: httpx.Response) -> tuple[str, str, list[str]]:
    """(cache header, answer text, names of the cited files) of a 200 chat response."""
    assert response.status_code == 200, response.text
    body = response.json()
    return (response.headers["x-genforge-cache"], body["choices"][0]["message"]["content"],
            [Path(s["source"]).name for s in body.get("sources") or []])
