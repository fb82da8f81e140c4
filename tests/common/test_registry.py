"""The model registry (common/registry.py) over both stores: numbering, immutable content-addressed
files, aliases and their rollback, and the errors for what does not exist."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from genforge.common.errors import ConfigError, NotFoundError, RunError
from genforge.common.registry import Registry, parse_ref
from genforge.common.store import open_store


def make_run(root: Path, *, seed: float = 0.0, metrics: list[dict] | None = None) -> Path:
    """A run directory with a (fake-weighted) model folder, a recipe with a dataset hash and metrics."""
    model = root / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "seed": seed}))
    (model / "model.safetensors").write_bytes(b"weights-" + str(seed).encode() * 1000)
    (root / "recipe.yaml").write_text("name: r\nfamily: lm\ntrain:\n  max_steps: 40\n_provenance:\n"
                                      "  dataset:\n    path: /data/ds\n    content_hash: 5eed0fda7a\n")
    rows = metrics or [{"step": 5, "loss": 3.0}, {"step": 10, "loss": 2.0}, {"step": 10, "val_loss": 2.5}]
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(params=["sqlite", "pg"])
def store_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "state")
    return request.getfixturevalue("pg_store_url")


@pytest.fixture
def registry(store_url, tmp_path):
    reg = Registry(open_store(store_url), tmp_path / "registry")
    yield reg
    reg.store.close()


def test_versions_are_numbered_per_name_and_record_the_run(registry, tmp_path):
    run = make_run(tmp_path / "run")
    first = registry.push(run, "nano")
    second = registry.push(make_run(tmp_path / "run2", seed=1), "nano")
    other = registry.push(run, "other")
    assert (first.version, second.version, other.version) == (1, 2, 1)
    assert registry.names() == ["nano", "other"]
    record = registry.resolve("nano@1").record
    assert record["dataset"]["content_hash"] == "5eed0fda7a"
    assert record["metrics"] == {"step": 10, "loss": 2.0, "val_loss": 2.5}  # the last value of each
    assert record["recipe"]["train"]["max_steps"] == 40 and "_provenance" not in record["recipe"]
    assert record["source"] == str(run.resolve()) and record["files"] == 2
    assert [v.version for v in registry.versions("nano")] == [1, 2]


def test_a_version_does_not_change_when_its_run_does(registry, tmp_path):
    run = make_run(tmp_path / "run")
    v1 = registry.push(run, "nano")
    weights = (v1.path / "model.safetensors").read_bytes()
    (run / "model" / "model.safetensors").write_bytes(b"trained further")  # the run goes on
    v2 = registry.push(run, "nano")
    assert (registry.resolve("nano@1").path / "model.safetensors").read_bytes() == weights
    assert v1.digest != v2.digest and v1.path != v2.path
    assert not v1.path.is_relative_to(run)
    # the same weights pushed again share one folder (content-addressed), under a new number
    v3 = registry.push(run, "nano")
    assert (v3.version, v3.path, v3.digest) == (3, v2.path, v2.digest)
    assert sorted(p.name for p in (registry.root / "objects").iterdir()) == sorted({v1.digest, v2.digest})


def test_references_latest_number_alias_and_bare_name(registry, tmp_path):
    for seed in range(3):
        registry.push(make_run(tmp_path / f"run{seed}", seed=seed), "nano")
    assert registry.resolve("nano").version == 3
    assert registry.resolve("nano@latest").version == 3
    assert registry.resolve("nano@2").version == 2
    assert registry.set_alias("nano@2", "production").version == 2
    assert registry.resolve("nano@production").version == 2
    registry.set_alias("nano@production", "staging")  # an alias of an alias is resolved when set
    registry.set_alias("nano@3", "production")
    assert registry.resolve("nano@staging").version == 2
    assert registry.aliases("nano") == {"production": (3, 2), "staging": (2, None)}


def test_an_alias_rolls_back_to_where_it_pointed_and_forward_again(registry, tmp_path):
    for seed in range(3):
        registry.push(make_run(tmp_path / f"run{seed}", seed=seed), "nano")
    registry.set_alias("nano@1", "production")
    with pytest.raises(ConfigError, match="never been moved"):
        registry.rollback_alias("nano", "production")
    registry.set_alias("nano@3", "production")
    assert registry.rollback_alias("nano", "production").version == 1
    assert registry.rollback_alias("nano", "production").version == 3  # as `kubectl rollout undo` does
    # a move made elsewhere meanwhile is not overwritten
    assert registry.move_alias("nano", "production", 2, expect=1) is False
    assert registry.resolve("nano@production").version == 3


def test_what_does_not_exist_is_a_not_found_error_listing_what_does(registry, tmp_path):
    with pytest.raises(NotFoundError, match="no model 'nano' in the registry.*none yet"):
        registry.resolve("nano@1")
    registry.push(make_run(tmp_path / "run"), "nano")
    registry.set_alias("nano@1", "production")
    with pytest.raises(NotFoundError, match=r"nano@7: no such version \(versions of nano: 1\)"):
        registry.resolve("nano@7")
    with pytest.raises(NotFoundError, match=r"nano@prod: no such version or alias \(aliases of nano: production"):
        registry.resolve("nano@prod")
    with pytest.raises(NotFoundError, match=r"no model 'nana'.*models: nano"):
        registry.set_alias("nana@1", "production")


@pytest.mark.parametrize("ref", ["nano@", "@3", "na no@1", "nano@pro duction", "../x@1"])
def test_malformed_references_are_config_errors(ref):
    with pytest.raises(ConfigError):
        parse_ref(ref)


def test_bad_alias_names_are_refused(registry, tmp_path):
    registry.push(make_run(tmp_path / "run"), "nano")
    for alias in ("latest", "12", "with space"):
        with pytest.raises(ConfigError):
            registry.set_alias("nano@1", alias)


def test_pushing_what_has_no_model_is_a_run_error_and_records_nothing(registry, tmp_path):
    (tmp_path / "empty-run").mkdir()
    (tmp_path / "empty-run" / "recipe.yaml").write_text("name: r\nfamily: lm\n")
    with pytest.raises(RunError, match="has no model"):
        registry.push(tmp_path / "empty-run", "nano")
    no_weights = tmp_path / "no-weights" / "model"
    no_weights.mkdir(parents=True)
    (no_weights / "config.json").write_text("{}")
    with pytest.raises(RunError, match="no weight files"):
        registry.push(tmp_path / "no-weights", "nano")
    with pytest.raises(RunError, match="not found"):
        registry.push(tmp_path / "missing", "nano")
    with pytest.raises(ConfigError, match="model name"):
        registry.push(make_run(tmp_path / "run"), "bad name")
    assert registry.names() == []
    assert not any(p.name.startswith(".push-") for p in (registry.root / "objects").glob("*"))


def test_files_missing_from_this_machines_root_are_a_clear_error(store_url, tmp_path):
    a, b = Registry(open_store(store_url), tmp_path / "a"), Registry(open_store(store_url), tmp_path / "b")
    try:
        a.push(make_run(tmp_path / "run"), "nano")
        version = b.resolve("nano@1")  # the record is shared, the files are not
        with pytest.raises(RunError, match="registry folder"):
            b.files_of(version)
        assert a.files_of(a.resolve("nano@1")).is_dir()
    finally:
        a.store.close()
        b.store.close()


def _push_in_process(store_url: str, root: str, run: str, out) -> None:
    reg = Registry(open_store(store_url), root)
    out.put(reg.push(run, "nano").version)
    reg.store.close()


def test_two_processes_pushing_at_once_get_different_numbers(store_url, tmp_path):
    run = make_run(tmp_path / "run")
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_push_in_process, args=(store_url, str(tmp_path / "reg"), str(run), out))
             for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]  # a push that raised says so in the captured stderr
    assert sorted(out.get(timeout=5) for _ in procs) == [1, 2, 3]
    objects = [p for p in (tmp_path / "reg" / "objects").iterdir()]
    assert len(objects) == 1 and not objects[0].name.startswith(".push-")  # one copy, no leftovers


def test_a_push_that_loses_the_rename_to_a_concurrent_push_of_the_same_weights_keeps_the_winner(
        registry, tmp_path, monkeypatch):
    import shutil

    import genforge.common.registry as reg_module
    run = make_run(tmp_path / "run")
    real_read_only = reg_module._read_only

    def other_push_wins(folder: Path) -> None:
        # between this push's "does it exist" check and its rename, another process renames its copy in
        real_read_only(folder)
        digest_folders = folder.parent
        shutil.copytree(folder, digest_folders / "winner")
    monkeypatch.setattr(reg_module, "_read_only", other_push_wins)

    def rename_winner_first(src, dst):
        Path(src).parent.joinpath("winner").rename(dst)
        return real_replace(src, dst)  # the loser's rename now fails: the folder is there and not empty
    real_replace = reg_module.os.replace
    monkeypatch.setattr(reg_module.os, "replace", rename_winner_first)
    version = registry.push(run, "nano")
    monkeypatch.undo()
    assert version.version == 1 and registry.files_of(version).is_dir()
    assert [p.name for p in (registry.root / "objects").iterdir()] == [version.digest]
