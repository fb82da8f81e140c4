"""The model registry: named, immutable versions of trained models and aliases that point at them.

    genforge registry push runs/nano --name nano          # nano@1, then nano@2, ...
    genforge registry alias nano@1 production
    genforge serve --model nano@production --canary nano@2=10%

A version is two things. Its files: the run's model folder, copied into the registry's file root
under the digest of its contents (`ROOT/objects/<digest>/`, read-only), so a later change to the
run (more training, a deleted folder) never changes a version, and pushing the same weights twice
stores them once. Its record, in the store (`common/store.py`: the embedded SQLite file by default,
PostgreSQL for replicas): the digest and folder, where it came from, its recipe, the last value of
each metric the run logged and the dataset's content hash. Aliases (production, staging, ...) are
the only mutable part: each remembers where it pointed before its last move, so a rollback is one
move back (and a second rollback moves forward again, as `kubectl rollout undo` does).

References: NAME@N, NAME@latest, NAME@ALIAS; NAME alone means NAME@latest. Replicas that share a
PostgreSQL store must also share the file root (a network volume), since records name folders in it
relative to the root.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from genforge.common.errors import ConfigError, NotFoundError, RunError
from genforge.common.runs import RunDir
from genforge.common.store import Store

REGISTRY_DIR_ENV = "GENFORGE_REGISTRY_DIR"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# What makes a folder a model: transformers' config, a diffusers pipeline, or genforge's own image models.
_MODEL_MARKERS = ("config.json", "model_index.json", "genforge.json")
_WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.onnx")
_CHUNK = 1 << 20


def default_registry_root() -> Path:
    """$GENFORGE_REGISTRY_DIR, else ~/.cache/genforge/registry (beside the embedded store's folder)."""
    return Path(os.environ.get(REGISTRY_DIR_ENV) or Path.home() / ".cache" / "genforge" / "registry").expanduser()


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: int
    path: Path  # the model folder in the registry's file root
    digest: str
    record: dict = field(default_factory=dict, compare=False)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def parse_ref(ref: str) -> tuple[str, str]:
    """'nano@3' -> ('nano', '3'); 'nano' -> ('nano', 'latest'); ConfigError for anything malformed."""
    name, sep, selector = str(ref).partition("@")
    if sep and not selector:
        raise ConfigError(f"model reference {ref!r}: nothing after '@'; use NAME@VERSION, NAME@latest or "
                          "NAME@ALIAS", param="model")
    check_name(name, "model name")
    selector = selector or "latest"
    if not selector.isdigit():
        check_name(selector, "alias")
    return name, selector


def check_name(text: str, what: str) -> None:
    if not _NAME.match(text or ""):
        raise ConfigError(f"{what} {text!r} is not valid: use 1-64 letters, digits, '_', '-' or '.', starting "
                          "with a letter or digit", param="name" if what == "model name" else "alias")


def looks_like_ref(text: str) -> bool:
    """Whether `genforge serve X` means a registry reference rather than a folder: it has an '@' and
    no such path exists."""
    return "@" in text and not Path(text).exists()


class Registry:
    """Versions and aliases over one store, files under one root."""

    def __init__(self, store: Store, root: str | Path | None = None):
        self.store = store
        self.root = (Path(root).expanduser() if root is not None else default_registry_root()).absolute()

    # ------------------------------------------------------------------ push
    def push(self, run: str | Path, name: str) -> ModelVersion:
        """Copy RUN's model folder into the file root and record it as the next version of `name`."""
        check_name(name, "model name")
        source, model = _model_folder(Path(run))
        objects = self.root / "objects"
        try:
            objects.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"registry folder {self.root} cannot be created ({e.strerror}); pass a writable "
                              f"folder with --registry-dir or ${REGISTRY_DIR_ENV}", param="registry_dir") from e
        tmp = objects / f".push-{uuid.uuid4().hex[:12]}"
        try:
            digest, files, size = _copy_hashed(model, tmp)
            final = objects / digest
            if final.exists():  # the same weights were pushed before: one copy serves both versions
                shutil.rmtree(tmp)
            else:
                _read_only(tmp)
                try:
                    os.replace(tmp, final)
                except OSError:
                    # another process pushing the same weights renamed its copy first: keep that one
                    if not final.is_dir():
                        raise
                    shutil.rmtree(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        record = {"digest": digest, "path": f"objects/{digest}", "source": str(source.resolve()),
                  "files": files, "bytes": size, **_run_facts(source)}
        version = self.store.registry_add(name, record)
        return ModelVersion(name, version, final, digest, {**record, "name": name, "version": version})

    # ------------------------------------------------------------------ reading
    def names(self) -> list[str]:
        return self.store.registry_names()

    def versions(self, name: str) -> list[ModelVersion]:
        check_name(name, "model name")
        return [self._version(r) for r in self.store.registry_versions(name)]

    def aliases(self, name: str) -> dict[str, tuple[int, int | None]]:
        return self.store.registry_aliases(name)

    def resolve(self, ref: str) -> ModelVersion:
        """The version a reference names now; NotFoundError listing what exists when it names nothing."""
        name, selector = parse_ref(ref)
        records = self.store.registry_versions(name)
        if not records:
            known = ", ".join(self.names()) or "none yet"
            raise NotFoundError(f"no model {name!r} in the registry (models: {known}); push one with "
                                f"`genforge registry push RUN --name {name}`", param="model")
        by_number = {r["version"]: r for r in records}
        if selector == "latest":
            return self._version(records[-1])
        if selector.isdigit():
            if int(selector) not in by_number:
                raise NotFoundError(f"{name}@{selector}: no such version (versions of {name}: "
                                    f"{', '.join(map(str, by_number))})", param="model")
            return self._version(by_number[int(selector)])
        aliases = self.aliases(name)
        if selector not in aliases:
            known = ", ".join(aliases) or "none yet"
            raise NotFoundError(f"{name}@{selector}: no such version or alias (aliases of {name}: {known}; "
                                f"set one with `genforge registry alias {name}@N {selector}`)", param="model")
        return self._version(by_number[aliases[selector][0]])

    def _version(self, record: dict) -> ModelVersion:
        path = self.root / record["path"]
        return ModelVersion(record["name"], record["version"], path, record["digest"], record)

    def files_of(self, version: ModelVersion) -> Path:
        """The version's model folder; RunError when this machine's file root does not hold it."""
        if not (version.path / _present_marker(version.path)).is_file():
            raise RunError(f"{version.ref}: its files are not under the registry folder {self.root} "
                           f"(expected {version.path}); point --registry-dir or ${REGISTRY_DIR_ENV} at the folder "
                           "it was pushed to (replicas need a shared one)")
        return version.path

    # ------------------------------------------------------------------ aliases
    def set_alias(self, ref: str, alias: str) -> ModelVersion:
        """Point ALIAS at the version REF names (NAME@N, or another alias / latest: resolved now)."""
        check_name(alias, "alias")
        if alias.isdigit() or alias == "latest":
            raise ConfigError(f"alias {alias!r}: numbers and 'latest' already name versions; pick a word such as "
                              "production", param="alias")
        target = self.resolve(ref)
        self.store.registry_move_alias(target.name, alias, target.version)
        return target

    def move_alias(self, name: str, alias: str, version: int, *, expect: int | None = None) -> bool:
        return self.store.registry_move_alias(name, alias, version, expect=expect)

    def rollback_alias(self, name: str, alias: str) -> ModelVersion:
        """Move ALIAS back to where it pointed before its last move."""
        current, previous = self.aliases(name).get(alias, (None, None))
        if current is None:
            raise NotFoundError(f"{name}@{alias}: no such alias", param="model")
        if previous is None:
            raise ConfigError(f"{name}@{alias} has never been moved: there is no earlier version to roll back to",
                              param="model", code="nothing_to_roll_back")
        if not self.move_alias(name, alias, previous, expect=current):
            raise ConfigError(f"{name}@{alias} was moved by someone else meanwhile; look at `genforge registry "
                              f"list {name}` and try again", param="model", code="alias_moved")
        return self.resolve(f"{name}@{previous}")


# ---------------------------------------------------------------------- helpers


def _present_marker(folder: Path) -> str:
    return next((m for m in _MODEL_MARKERS if (folder / m).is_file()), _MODEL_MARKERS[0])


def _model_folder(path: Path) -> tuple[Path, Path]:
    """(the run or folder pushed, its model folder): RUN/model/ of a run, else the folder itself when it
    is a model folder; RunError saying what is missing otherwise."""
    if not path.exists():
        raise RunError(f"{path}: not found; push a run directory (with model/) or a model folder")
    if not path.is_dir():
        raise RunError(f"{path}: not a folder; push a run directory (with model/) or a model folder")
    for candidate in (path / "model", path):
        if any((candidate / m).is_file() for m in _MODEL_MARKERS):
            if not any(next(candidate.rglob(w), None) for w in _WEIGHTS):
                raise RunError(f"{candidate}: a model config but no weight files (*.safetensors, *.bin); the run's "
                               "training did not save its model")
            return path, candidate
    raise RunError(f"{path} has no model (no model/ folder with config.json or model_index.json); train it "
                   "first (`genforge train RECIPE`) or push the model folder itself")


def _copy_hashed(src: Path, dst: Path) -> tuple[str, int, int]:
    """Copy `src` into the new folder `dst`, hashing as it goes: (digest of the tree, files, bytes).
    The digest covers every file's relative path and contents, so equal folders get equal digests."""
    tree = hashlib.sha256()
    files = size = 0
    dst.mkdir()
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = path.relative_to(src)
        out = dst / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        with path.open("rb") as fin, out.open("wb") as fout:
            while chunk := fin.read(_CHUNK):
                h.update(chunk)
                fout.write(chunk)
        tree.update(f"{rel.as_posix()}\0{h.hexdigest()}\n".encode())
        files += 1
        size += out.stat().st_size
    return tree.hexdigest()[:32], files, size


def _read_only(folder: Path) -> None:
    """Files 0444: an edit in place fails loudly instead of silently changing a version."""
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(0o444)


def _run_facts(source: Path) -> dict:
    """What the run says about itself: family, recipe (without provenance), dataset identity, final metrics."""
    run = RunDir(source)
    facts: dict = {"family": "lm", "recipe": None, "dataset": None, "metrics": {}}
    if run.recipe_path.is_file():
        try:
            recipe = run.read_recipe() or {}
        except yaml.YAMLError as e:
            raise RunError(f"{run.recipe_path} is not valid YAML ({e}); fix or remove it before pushing") from None
        provenance = recipe.pop("_provenance", {}) if isinstance(recipe, dict) else {}
        facts["recipe"] = recipe
        facts["family"] = str(recipe.get("family", "lm")) if isinstance(recipe, dict) else "lm"
        facts["dataset"] = (provenance or {}).get("dataset")
    last: dict[str, float] = {}
    for row in run.read_metrics():  # the last value logged of each metric: the run's final state
        last.update({k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    facts["metrics"] = last
    return facts
