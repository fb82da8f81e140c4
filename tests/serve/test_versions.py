"""`genforge serve --model NAME@REF` as a real process, driven with the openai client: canary routing,
shadow traffic, promotion and rollback with streams in flight, a version that fails to load, and
the admin routes' errors.

    genforge registry push RUN --name nano          (x4, real processes)
    genforge registry alias nano@1 production
    genforge serve --model nano@production --canary nano@2=50% --shadow nano@3 --api-key sk-admin
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from genforge.common.registry import Registry
from genforge.common.store import open_store

from .processes import genforge
from .registry_processes import admin, client, push_all, save_versions, serving_ref, version_of

pytestmark = pytest.mark.slow
USERS = [f"user-{i}" for i in range(40)]


@pytest.fixture(scope="module")
def registry_env(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Four versions of `nano` in an embedded store; production -> nano@1."""
    root = tmp_path_factory.mktemp("registry")
    store, registry_dir = str(root / "state"), root / "registry"
    push_all(save_versions(root, 4), "nano", store, registry_dir)
    done = genforge("registry", "alias", "nano@1", "production", "--store", store, "--registry-dir", str(registry_dir))
    assert done.returncode == 0 and "nano@production -> nano@1" in done.stdout, done.stderr
    return {"store": store, "registry_dir": registry_dir, "root": root}


@pytest.fixture(scope="module")
def server(registry_env):
    """One server for the whole module: following nano@production with nano@2 as a 50% canary and
    nano@3 as the shadow, slowed to ~25 ms a step so that streams of 40 tokens are still running while
    the admin calls switch versions. The tests share it in file order; each leaves it as it found it,
    so each also passes alone."""
    shadow_log = registry_env["root"] / "shadow.jsonl"
    with serving_ref("nano@production", ["--canary", "nano@2=50%", "--shadow", "nano@3", "--shadow-log",
                     str(shadow_log)], store=registry_env["store"], registry_dir=registry_env["registry_dir"],
                     logs=registry_env["root"], env={"GENFORGE_TEST_STEP_DELAY": "0.025"}) as (live,):
        live.shadow_log = shadow_log
        yield live
    reg = Registry(open_store(registry_env["store"]), registry_env["registry_dir"])
    reg.move_alias("nano", "production", 1)  # as the next module to use the registry expects to find it
    reg.store.close()


def test_the_canary_takes_its_share_and_each_user_stays_on_one_version(server):
    first = {u: version_of(server, u) for u in USERS}
    assert set(first.values()) == {"nano@1", "nano@2"}
    on_canary = sum(v == "nano@2" for v in first.values())
    assert 10 <= on_canary <= 30  # 50% of 40 users; the split is a fixed hash, so this never flakes
    assert {u: version_of(server, u) for u in USERS} == first  # sticky
    # the route-key header wins over `user`: the same key, the same version, whatever the user
    key_user = USERS[0]
    assert {version_of(server, u, extra_headers={"x-genforge-route-key": key_user})
            for u in USERS[:8]} == {first[key_user]}
    assert server.metric("genforge:version_requests_total", version="2", role="canary") >= 2 * on_canary
    # the engine's own series carry the version that generated
    assert server.metric("genforge:generation_tokens_total", version="2") > 0


def test_the_shadow_answers_every_request_into_its_log_and_never_to_the_client(server):
    sent = []
    for i in range(4):
        raw = client(server).chat.completions.with_raw_response.create(
            model="nano", messages=[{"role": "user", "content": f"shadow question {i}"}], max_tokens=6,
            temperature=0, user=f"shadow-user-{i}")
        sent.append((f"shadow question {i}", raw.headers["x-genforge-model-version"], raw.parse()))
    assert all(version != "nano@3" for _, version, _ in sent)
    deadline = time.monotonic() + 60
    while True:
        lines = [json.loads(line) for line in server.shadow_log.read_text().splitlines()] \
            if server.shadow_log.exists() else []
        mine = {line["request"]["messages"][0]["content"]: line for line in lines
                if line["endpoint"] == "chat/completions"}
        if all(q in mine for q, _, _ in sent) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for question, version, response in sent:
        line = mine[question]
        assert line["shadow"] == "nano@3" and line["outcome"] == "ok" and line["usage"]["completion_tokens"] > 0
        assert line["served_by"] == version and line["served_answers"] == [response.choices[0].message.content]
        assert isinstance(line["shadow_answers"][0], str)
    assert server.metric("genforge:version_requests_total", version="3", role="shadow") >= len(sent)


def _stream(server, user: str, out: dict, started: threading.Event) -> None:
    raw = client(server).completions.with_raw_response.create(
        model="nano", prompt="the quick brown fox", max_tokens=40, temperature=0, stream=True, user=user,
        extra_body={"ignore_eos": True})
    text, finish = [], None
    for chunk in raw.parse():
        started.set()
        text.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    out[user] = (raw.headers["x-genforge-model-version"], "".join(text), finish)


def _streams_across(server, users: list[str], switch) -> tuple[dict, dict]:
    """Run one stream per user; once all have their first token, call `switch()`; wait for all."""
    out: dict = {}
    events = [threading.Event() for _ in users]
    threads = [threading.Thread(target=_stream, args=(server, u, out, ev)) for u, ev in zip(users, events)]
    for t in threads:
        t.start()
    for ev in events:
        assert ev.wait(60)
    switched = switch()
    for t in threads:
        t.join(120)
    return out, switched


def test_admin_errors_are_openai_style_4xx(server):
    def error(r: httpx.Response, status: int) -> dict:
        assert r.status_code == status, r.text
        return r.json()["error"]

    assert "no such version" in error(admin(server, "promote", {"version": "nano@9"}), 404)["message"]
    assert "no such version or alias" in error(admin(server, "promote", {"version": "nano@prod"}), 404)["message"]
    assert "already the primary" in error(admin(server, "promote", {"version": "nano@1"}), 409)["message"]
    assert error(admin(server, "canary", {"version": "nano@3", "share": 150}), 400)["param"] == "share"
    assert error(admin(server, "canary", {"version": "nano@3", "share": -1}), 400)["param"] == "share"
    assert error(admin(server, "rollback"), 409)["code"] == "nothing_to_roll_back"
    ended = admin(server, "canary", {"version": None}).json()
    assert ended["canary"] is None and ended["loaded"] == [1, 3]  # nano@2 has no role left: it is stopped
    assert error(admin(server, "promote"), 409)["code"] == "nothing_to_promote"
    assert error(admin(server, "promote", {"versoin": "nano@2"}), 400)["param"] == "versoin"
    restored = admin(server, "canary", {"version": "nano@2", "share": 50}).json()
    assert (restored["primary"]["ref"], restored["canary"]["ref"], restored["canary"]["share"]) == ("nano@1", "nano@2", 50)
    assert server.metric("genforge:request_errors_total", kind="internal") == 0


def test_the_registry_server_serves_the_console_and_names_its_version(server):
    assert httpx.get(server.url + "/", timeout=10).status_code == 200
    features = httpx.get(server.v1 + "/features", headers={"Authorization": f"Bearer {server.api_key}"},
                         timeout=10).json()
    assert features["chat"] and features["version"] == "nano@1" and features["images"] is None


def test_promote_and_rollback_switch_versions_while_streams_finish_where_they_started(server, registry_env):
    primary_users = [u for u in USERS if version_of(server, u) == "nano@1"][:3]
    canary_users = [u for u in USERS if version_of(server, u) == "nano@2"][:2]
    errors_before = server.metric("genforge:request_errors_total")
    assert admin(server, "promote", key=None).status_code == 401  # behind the API key

    out, promoted = _streams_across(server, primary_users + canary_users,
                                    lambda: admin(server, "promote"))
    assert promoted.status_code == 200, promoted.text
    body = promoted.json()
    assert (body["primary"]["ref"], body["previous"]["ref"], body["canary"]) == ("nano@2", "nano@1", None)
    assert body["alias"] == {"name": "nano@production", "moved": True, "version": 2}
    for user in primary_users + canary_users:  # every stream ran to its end, on the version it started on
        version, text, finish = out[user]
        assert finish == "length" and text
        assert version == ("nano@1" if user in primary_users else "nano@2")
    assert {version_of(server, u) for u in primary_users + canary_users} == {"nano@2"}
    reg = Registry(open_store(registry_env["store"]), registry_env["registry_dir"])
    assert reg.resolve("nano@production").version == 2  # the alias moved with the promotion

    out, rolled = _streams_across(server, primary_users, lambda: admin(server, "rollback"))
    assert rolled.status_code == 200, rolled.text
    assert (rolled.json()["primary"]["ref"], rolled.json()["previous"]["ref"]) == ("nano@1", "nano@2")
    assert all(out[u][0] == "nano@2" and out[u][2] == "length" for u in primary_users)
    assert {version_of(server, u) for u in USERS[:10]} == {"nano@1"}
    assert reg.resolve("nano@production").version == 1
    # no request failed during the switches: the one error is the refused promote without a key
    assert server.metric("genforge:request_errors_total") - errors_before == 1
    # the same greedy request gives the same text as before the round trip
    assert client(server).completions.create(model="nano", prompt="the quick", max_tokens=8,
                                                    temperature=0).choices[0].text
    reg.store.close()


def test_a_version_that_fails_to_load_leaves_the_serving_one_in_place(server, registry_env):
    reg = Registry(open_store(registry_env["store"]), registry_env["registry_dir"])
    broken = reg.resolve("nano@4")
    weights = broken.path / "model.safetensors"
    weights.chmod(0o644)
    saved = weights.read_bytes()
    weights.write_bytes(b"not a safetensors file")
    try:
        r = admin(server, "promote", {"version": "nano@4"})
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["type"] == "version_load_failed" and "nano@4 failed to load" in err["message"]
        assert "still serving nano@1" in err["message"]
        assert admin(server, "versions").json()["primary"]["ref"] == "nano@1"
        assert version_of(server, "someone") in {"nano@1", "nano@2"}
        assert reg.resolve("nano@production").version == 1  # the alias did not move either
    finally:
        weights.write_bytes(saved)
    assert "nano@4 failed to load" in server.log.read_text()
    # repaired, it loads, passes its health check and takes over
    assert admin(server, "promote", {"version": "nano@4"}).json()["primary"]["ref"] == "nano@4"
    assert version_of(server, "someone") in {"nano@4", "nano@2"}
    assert admin(server, "rollback").json()["primary"]["ref"] == "nano@1"
    reg.store.close()
