"""`genforge serve --upstream A --canary-upstream B=SHARE% / --shadow-upstream B` end to end: two real
`genforge serve` processes of lm-nano as the upstreams, real gateway processes in front of them, and the
openai client. Which upstream answered is the x-genforge-model-version header (its URL)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from genforge.serve.versions import route_bucket

from .conftest import MODEL_NAME, ROOT, CliServer, _genforge_command, free_socket
from .processes import CHILD_ENV, _stop, _wait_healthy, genforge, serving

pytestmark = pytest.mark.slow

KEY = "sk-gateway"
USERS = [f"user-{i}" for i in range(16)]


def _gateway(args: list[str], log: Path) -> CliServer:
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    with log.open("wb") as out:
        proc = subprocess.Popen([*_genforge_command(), "serve", *args, "--port", str(port), "--api-key", KEY],
                                stdout=out, stderr=subprocess.STDOUT, env=CHILD_ENV, cwd=ROOT)
    return CliServer(f"http://127.0.0.1:{port}", api_key=KEY, proc=proc, log=log)


@pytest.fixture(scope="module")
def fleet(lm_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Upstreams a and b (the same model, so greedy answers agree); gateway `split` sends 50% to b,
    gateway `mirror` sends none to b (0%) but mirrors every request to it."""
    logs = tmp_path_factory.mktemp("canary")
    with serving(lm_run, [], [], logs=logs) as (a, b):
        split = _gateway(["--upstream", a.url, "--canary-upstream", f"{b.url}=50%"], logs / "split.log")
        mirror = _gateway(["--upstream", a.url, "--canary-upstream", f"{b.url}=0%", "--shadow-upstream", b.url,
                           "--shadow-log", str(logs / "shadow.jsonl")], logs / "mirror.log")
        try:
            for gateway in (split, mirror):
                _wait_healthy(gateway, time.monotonic() + 120)
            yield {"a": a, "b": b, "split": split, "mirror": mirror, "shadow_log": logs / "shadow.jsonl"}
        finally:
            _stop(split)
            _stop(mirror)


def client(server: CliServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key=server.api_key, max_retries=0, timeout=60)


def answered_by(server: CliServer, user: str | None = None, stream: bool = False, **headers: str) -> str:
    kw = {"model": MODEL_NAME, "prompt": "In Python, a class", "max_tokens": 3, "temperature": 0}
    if user is not None:
        kw["user"] = user
    if stream:
        with client(server).completions.with_streaming_response.create(stream=True, extra_headers=headers,
                                                                        **kw) as raw:
            assert "".join(c.choices[0].text for c in raw.parse() if c.choices)
            return raw.headers["x-genforge-model-version"]
    raw = client(server).completions.with_raw_response.create(extra_headers=headers, **kw)
    assert raw.parse().choices[0].text
    return raw.headers["x-genforge-model-version"]


def admin(server: CliServer, path: str, body: dict | None = None, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=30)


def test_half_goes_to_the_canary_and_each_user_stays_on_one(fleet) -> None:
    a, b, split = fleet["a"], fleet["b"], fleet["split"]
    seen = {user: answered_by(split, user) for user in USERS}
    assert set(seen.values()) == {a.url, b.url}
    # the registry canary's rule exactly: the user's bucket decides, on every replica and after restarts
    assert seen == {user: b.url if route_bucket(user) < 50 else a.url for user in USERS}
    for user in USERS[:6]:
        assert answered_by(split, user) == seen[user]
        assert answered_by(split, user, stream=True) == seen[user]
    key = next(u for u in USERS if seen[u] == b.url)  # the route-key header wins over `user`
    assert answered_by(split, "someone-else", **{"x-genforge-route-key": key}) == b.url
    assert split.metric("genforge:version_requests_total", version=a.url, role="primary") >= 1
    assert split.metric("genforge:version_requests_total", version=b.url, role="canary") >= 1
    assert split.metric("genforge:generation_tokens_total", version=b.url) >= 3  # per-upstream token counts
    health = httpx.get(split.url + "/health", timeout=10).json()
    assert health["upstreams"]["primary"]["ref"] == a.url
    assert health["upstreams"]["canary"] | {"in_flight": 0} == {"version": 2, "ref": b.url, "ok": True, "share": 50.0,
                                                               "traffic": True, "in_flight": 0}


def test_zero_share_sends_all_to_the_primary_and_the_shadow_records_its_answers(fleet) -> None:
    a, b, mirror = fleet["a"], fleet["b"], fleet["mirror"]
    assert {answered_by(mirror, user) for user in USERS[:8]} == {a.url}
    chat = client(mirror).chat.completions.create(model=MODEL_NAME, max_tokens=6, temperature=0,
                                                   messages=[{"role": "user", "content": "What is a list?"}])
    deadline = time.monotonic() + 60
    lines: list[dict] = []
    while time.monotonic() < deadline and len(lines) < 9:
        path = fleet["shadow_log"]
        lines = [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
        time.sleep(0.2)
    assert len(lines) == 9 and {x["shadow"] for x in lines} == {b.url} and {x["served_by"] for x in lines} == {a.url}
    assert all(x["outcome"] == "ok" for x in lines)
    # the same model on both: the shadow's greedy answers are the client's
    assert all(x["shadow_answers"] == x["served_answers"] for x in lines)
    assert chat.choices[0].message.content in [x["shadow_answers"][0] for x in lines if x["endpoint"] != "completions"]
    assert mirror.metric("genforge:version_requests_total", version=b.url, role="shadow") == 9


def test_promote_and_rollback_switch_the_primary_without_a_restart(fleet) -> None:
    a, b, split = fleet["a"], fleet["b"], fleet["split"]
    on_a = next(u for u in USERS if route_bucket(u) >= 50)
    assert admin(split, "/admin/promote", key=None).status_code == 401  # behind the API key
    r = admin(split, "/admin/promote")
    assert r.status_code == 200, r.text
    assert r.json()["primary"]["ref"] == b.url and r.json()["previous"]["ref"] == a.url and r.json()["canary"] is None
    assert {answered_by(split, user) for user in [on_a, *USERS[:4]]} == {b.url}
    r = admin(split, "/admin/rollback")
    assert r.status_code == 200 and r.json()["primary"]["ref"] == a.url
    assert {answered_by(split, user) for user in USERS[:4]} == {a.url}
    assert admin(split, "/admin/promote").status_code == 409  # no canary any more
    r = admin(split, "/admin/canary", {"version": b.url, "share": 50})
    assert r.status_code == 200 and r.json()["canary"]["ref"] == b.url
    assert admin(split, "/admin/canary", {"version": "not a url", "share": 5}).status_code == 400
    assert split.metric("genforge:version_switches_total", action="promote") == 1


def test_a_canary_that_is_down_takes_no_traffic(fleet) -> None:  # last: it stops upstream b
    a, b, split = fleet["a"], fleet["b"], fleet["split"]
    _stop(b)
    # every user answered, the canary's share by the primary (the first of them finds b down)
    assert {answered_by(split, user) for user in USERS} == {a.url}
    health = httpx.get(split.url + "/health", timeout=10)
    assert health.status_code == 200
    canary = health.json()["upstreams"]["canary"]
    assert canary["ref"] == b.url and canary["ok"] is False and canary["traffic"] is False
    r = admin(split, "/admin/promote")
    assert r.status_code == 422 and "still serving" in r.json()["error"]["message"]


@pytest.mark.parametrize("args, message", [
    (["--upstream", "http://127.0.0.1:9", "--canary-upstream", "http://127.0.0.1:10=150%"],
     "the share must be between 0 and 100"),
    (["--upstream", "http://127.0.0.1:9", "--canary-upstream", "http://127.0.0.1:10"], "expected URL=SHARE%"),
    (["--upstream", "127.0.0.1:9"], "expected the http(s) URL"),
    (["--upstream", "http://127.0.0.1:9", "--shadow-upstream", "http://127.0.0.1:99999"], "expected the http(s) URL"),
    (["--upstream", "http://127.0.0.1:9", "--canary-upstream", "http://127.0.0.1:9=5%"], "that is the primary"),
    (["--canary-upstream", "http://127.0.0.1:10=5%"], "give the primary engine with --upstream"),
])
def test_bad_canary_and_url_flags_are_one_line_errors(args: list[str], message: str) -> None:
    r = genforge("serve", *args)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
