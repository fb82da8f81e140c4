"""Auth: every route but /health and /metrics needs a key, whatever prefix the app is served under;
keys are checked at start-up (empty = error, whitespace stripped, from a file)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from genforge.common.errors import ConfigError
from genforge.serve.options import exposure_warning, parse_bytes, read_key_file, resolve_api_keys

from .conftest import MODEL_NAME, Live, _genforge_command, free_socket, lm_server, serve_in_thread

KEY = "sk-auth-test"
PROTECTED = [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
             ("GET", "/openapi.json"), ("GET", "/v1/nope"), ("GET", "/nope"), ("GET", "/health/"),
             ("GET", "/metrics/x"), ("GET", "/v1/features"), ("GET", "/v1/run/report"), ("GET", "/console")]


@pytest.fixture(scope="module")
def keyed(lm) -> Iterator[Live]:
    with lm_server(lm, api_keys=[KEY]) as live:
        live.api_key = KEY
        yield live


def _check_gate(base: str) -> None:
    for method, path in PROTECTED:
        r = httpx.request(method, base + path, json={"prompt": "x"} if method == "POST" else None)
        assert r.status_code == 401, (path, r.status_code, r.text)
        assert r.json()["error"]["type"] == "authentication_error"
    # probes, scrapers, and the web console's page and files (it asks for the key; the API checks it)
    for path in ("/health", "/metrics", "/", "/console/app.js"):
        assert httpx.get(base + path).status_code == 200, path
    ok = httpx.get(base + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200 and ok.json()["data"][0]["id"] == MODEL_NAME


def test_every_route_but_the_public_ones_needs_a_key(keyed: Live) -> None:
    _check_gate(keyed.url)
    c = openai.OpenAI(base_url=keyed.v1, api_key=KEY, max_retries=0)
    assert c.completions.create(model=MODEL_NAME, prompt="The", max_tokens=2).choices
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed.v1, api_key=KEY + "x", max_retries=0).models.list()


def test_auth_holds_under_root_path(lm) -> None:
    """Behind a proxy that strips /gf, uvicorn --root-path /gf puts the prefix back into the ASGI
    path ("/gf/v1/models"); the gate must judge the route the router matches ("/v1/models")."""
    with lm_server(lm, config={"root_path": "/gf"}, api_keys=[KEY]) as live:
        _check_gate(live.url)


def test_auth_holds_when_mounted_under_a_prefix(keyed: Live, lm) -> None:
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from genforge.serve.server import create_app

    model, tokenizer = lm
    inner = create_app(model=model, tokenizer=tokenizer, served_model_name=MODEL_NAME, api_keys=[KEY])
    outer = Starlette(routes=[Mount("/api", app=inner)], lifespan=inner.app.router.lifespan_context)
    with serve_in_thread(outer) as live:
        _check_gate(live.url + "/api")


def test_key_checks(tmp_path) -> None:
    with pytest.raises(ConfigError, match="empty"):
        resolve_api_keys([""], None, {})
    with pytest.raises(ConfigError, match="GENFORGE_API_KEYS"):
        resolve_api_keys([], None, {"GENFORGE_API_KEYS": ""})  # set but empty is not "auth off"
    with pytest.raises(ConfigError, match="empty"):
        resolve_api_keys([], None, {"GENFORGE_API_KEYS": "a,,b"})
    assert resolve_api_keys([" k1 "], None, {"GENFORGE_API_KEYS": " k2 , k3\n"}) == ["k1", "k2", "k3"]
    f = tmp_path / "keys"
    f.write_text("# team keys\n  sk-one  \n\nsk-two\n", encoding="utf-8")
    assert read_key_file(f) == ["sk-one", "sk-two"]
    f.write_text("\n# nothing\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="no key"):
        read_key_file(f)
    with pytest.raises(ConfigError, match="cannot read"):
        read_key_file(tmp_path / "missing")
    from genforge.serve.server import create_app

    with pytest.raises(ConfigError, match="empty"):
        create_app(model=object(), tokenizer=object(), api_keys=["  "])


def test_exposure_warning_and_sizes() -> None:
    assert exposure_warning("127.0.0.1", []) is None and exposure_warning("::1", []) is None
    assert exposure_warning("localhost", []) is None and exposure_warning("0.0.0.0", ["k"]) is None
    for host in ("0.0.0.0", "::", "10.1.2.3", "example.org"):
        assert "without an API key" in exposure_warning(host, [])
    assert parse_bytes("512MiB") == 512 * 2**20 and parse_bytes("2GB") == 2 * 10**9
    assert parse_bytes("1.5GiB") == int(1.5 * 2**30) and parse_bytes("4096") == 4096
    for bad in ("lots", "12XB", "0", "-5MiB", ""):
        with pytest.raises(ConfigError, match="kv-cache-memory"):
            parse_bytes(bad)


def _start(args: list[str], env: dict | None = None) -> subprocess.Popen:
    import os

    return subprocess.Popen([*_genforge_command(), "serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})


def _lines_until(proc: subprocess.Popen, prefix: str) -> str:
    """The process's output up to and including the first line starting with `prefix`."""
    lines = []
    while True:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError("the server exited early:\n" + "".join(lines))
        lines.append(line)
        if line.startswith(prefix):
            return "".join(lines)


@pytest.mark.slow
def test_cli_key_file_and_exposure_warning(lm_run, tmp_path) -> None:
    """`genforge serve --host 0.0.0.0` without a key warns; with --api-key-file it does not, and
    the file's key works (and is not in the process list)."""
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    proc = _start([str(lm_run), "--host", "0.0.0.0", "--port", str(port), "--enforce-eager"])
    try:
        head = _lines_until(proc, "serving ")
        assert "warning: serving on 0.0.0.0 without an API key" in head, head
    finally:
        proc.kill()
        proc.wait(timeout=30)
    keys = tmp_path / "keys.txt"
    keys.write_text("sk-from-file\n", encoding="utf-8")
    proc = _start([str(lm_run), "--host", "0.0.0.0", "--port", str(port), "--enforce-eager",
                   "--api-key-file", str(keys), "--served-model-name", MODEL_NAME])
    try:
        head = _lines_until(proc, "serving ")
        assert "without an API key" not in head, head
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)
        url = f"http://127.0.0.1:{port}/v1/models"
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer sk-from-file"}).status_code == 200
        cmdline = open(f"/proc/{proc.pid}/cmdline", "rb").read()
        assert b"sk-from-file" not in cmdline
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.mark.slow
@pytest.mark.parametrize(("args", "env", "message"), [
    (["--api-key", ""], {}, "an API key is empty"),
    ([], {"GENFORGE_API_KEYS": " "}, "GENFORGE_API_KEYS: an API key is empty"),
    (["--kv-cache-memory", "lots"], {}, "--kv-cache-memory"),
    (["--kv-cache-memory", "1KiB"], {}, "error: "),  # parsed, but not even one row of the context fits
    (["--max-batch-size", "0"], {}, "--max-batch-size"),
    (["--request-timeout", "-1"], {}, "--request-timeout"),
])
def test_cli_refuses_bad_serve_options(lm_run, args, env, message) -> None:
    proc = _start([str(lm_run), "--enforce-eager", *args], env)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert message in out, out
