"""Fixtures shared across layers: a small char-level dataset and a tiny LM recipe."""

from pathlib import Path
from pydoc_data.topics import topics

import pytest
import torch

from genforge.data.tokens import prepare_text_dataset

# The test models are tiny: a second intra-op thread gains nothing, and OpenMP's spin-waiting makes
# them many times slower whenever the cores are shared (a server subprocess, a busy CI machine).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def char_dataset(tmp_path_factory) -> Path:
    """A small char-level dataset from the CPython docs (fast to prepare and to learn)."""
    root = tmp_path_factory.mktemp("chardata")
    text = "\n\n".join(topics[k] for k in sorted(topics))[:60_000]
    (root / "docs.txt").write_text(text, encoding="utf-8")
    prepare_text_dataset(str(root / "docs.txt"), str(root / "ds"), tokenizer="char", val_fraction=0.1,
                         doc_split="file")
    return root / "ds"


@pytest.fixture
def tiny_recipe():
    return make_tiny_recipe


def make_tiny_recipe(tmp_path: Path, dataset: Path, name: str = "r", **train) -> Path:
    """An lm recipe small enough to train dozens of steps in a second or two."""
    t = {"max_steps": 40, "batch_size": 8, "lr": 3e-3, "warmup_steps": 5, "eval_every": 10,
         "eval_batches": 4, "log_every": 5, "checkpoint_every": 10, "keep_last": 2, "seed": 7, **train}
    lines = "\n".join(f"  {k}: {v}" for k, v in t.items())
    p = tmp_path / f"{name}.yaml"
    p.write_text(f"name: {name}\nfamily: lm\ndataset: {dataset}\nout_dir: {tmp_path / 'runs'}\n"
                 f"model:\n  preset: lm-nano\n  hidden_size: 32\n  num_layers: 2\n  num_heads: 2\n"
                 f"  num_kv_heads: 1\n  intermediate_size: 64\n  context_length: 32\ntrain:\n{lines}\n")
    return p


# --- PostgreSQL + pgvector (tests/pg.py): one server per session, a fresh database per test ---

@pytest.fixture(scope="session")
def pg_server():
    from tests.pg import running_pg

    with running_pg() as server:
        yield server


@pytest.fixture(scope="session")
def pg_url(pg_server) -> str:
    """URI of the session's PostgreSQL (database `postgres`, pgvector installed)."""
    return pg_server.get_uri("postgres")


@pytest.fixture
def pg_store_url(pg_server) -> str:
    """URI of a database of its own for this test, so tests never see each other's rows."""
    from tests.pg import fresh_database

    return fresh_database(pg_server)
