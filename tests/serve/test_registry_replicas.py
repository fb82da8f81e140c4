"""Two `genforge serve --model nano@production` replicas on one PostgreSQL database (a real pgserver):
the registry's aliases and the semantic cache are shared state.

    genforge registry push RUN --name nano --store postgresql://...     (x2)
    genforge serve --model nano@production --store postgresql://... --cache                         (A)
    genforge serve --model nano@production --store postgresql://... --cache --follow-interval 0.5   (B)

A promotion through A moves the alias; B follows it by itself (--follow-interval), A only when asked
(POST /admin/reload). The cache key holds the version, so a cached answer is shared by replicas on the
same version and never replayed by another version.
"""

from __future__ import annotations

import time

import httpx
import pytest

from genforge.common.registry import Registry
from genforge.common.store import open_store

from .processes import genforge
from .registry_processes import admin, client, push_all, save_versions, serving_ref

pytest.importorskip("sentence_transformers")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def replicas(pg_server, tmp_path_factory: pytest.TempPathFactory):
    from tests.pg import fresh_database

    url = fresh_database(pg_server)
    root = tmp_path_factory.mktemp("registry-replicas")
    registry_dir = root / "registry"  # one folder for both, as a shared volume would be
    push_all(save_versions(root, 2), "nano", url, registry_dir)
    done = genforge("registry", "alias", "nano@1", "production", "--store", url, "--registry-dir", str(registry_dir))
    assert done.returncode == 0, done.stderr
    with serving_ref("nano@production", ["--cache"], ["--cache", "--follow-interval", "0.5"], store=url,
                     registry_dir=registry_dir, logs=root) as (a, b):
        yield url, registry_dir, a, b


def ask(server, question: str) -> tuple[str, str, str]:
    """(version header, cache header, answer) of one deterministic chat request."""
    raw = client(server).chat.completions.with_raw_response.create(
        model="nano", messages=[{"role": "user", "content": question}], max_tokens=6, temperature=0)
    return (raw.headers["x-genforge-model-version"], raw.headers["x-genforge-cache"],
            raw.parse().choices[0].message.content)


def serving(server) -> str:
    return admin(server, "versions").json()["primary"]["ref"]


def wait_for(check, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_an_answer_cached_by_one_replica_is_a_hit_on_the_other(replicas):
    _, _, a, b = replicas
    version, state, text = ask(a, "What does the pass statement do?")
    assert (version, state) == ("nano@1", "miss")
    assert ask(b, "What does the pass statement do?") == ("nano@1", "hit", text)


def test_an_alias_moved_through_one_replica_is_followed_by_the_other(replicas):
    url, registry_dir, a, b = replicas
    registry = Registry(open_store(url), registry_dir)
    try:
        promoted = admin(a, "promote", {"version": "nano@2"})
        assert promoted.status_code == 200, promoted.text
        assert promoted.json()["alias"] == {"name": "nano@production", "moved": True, "version": 2}
        assert registry.resolve("nano@production").version == 2
        assert wait_for(lambda: serving(b) == "nano@2")  # B resolves the alias again every 0.5 s
        # the new version does not replay the old version's cached answer; its own is shared again
        question = "What does the pass statement do?"
        version, state, text = ask(b, question)
        assert (version, state) == ("nano@2", "miss")
        assert ask(a, question) == ("nano@2", "hit", text)

        # a rollback through B moves the alias back; A, not following, switches when told to reload
        rolled = admin(b, "rollback")
        assert rolled.status_code == 200 and rolled.json()["primary"]["ref"] == "nano@1", rolled.text
        assert registry.resolve("nano@production").version == 1
        assert serving(a) == "nano@2"
        reloaded = admin(a, "reload").json()
        assert reloaded["changed"] is True and reloaded["primary"]["ref"] == "nano@1"
        assert ask(a, question)[:2] == ("nano@1", "hit")  # nano@1's answer from the first test, kept
        assert admin(a, "reload").json()["changed"] is False
    finally:
        registry.store.close()


def test_the_replicas_metrics_say_which_version_answered(replicas):
    _, _, a, b = replicas
    for server in (a, b):
        text = httpx.get(server.url + "/metrics", timeout=10).text
        assert 'genforge:version_requests_total{model_name="nano",role="primary",version="1"}' in text
        assert 'genforge:serving_version{model_name="nano",role="primary"} 1.0' in text
