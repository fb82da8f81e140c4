import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from genforge.cli import main
from genforge.common.errors import DataError
from genforge.data.tokens import TokenBatches, TokenDataset, prepare_text_dataset

PARAS = [f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i} times. Ünïcödé ✓ 你好"
         for i in range(20)]


@pytest.fixture
def corpus(tmp_path):
    # 20 paragraphs, two exact duplicates, one trimmed duplicate, blank lines and a whitespace-only one.
    text = "\n\n".join(PARAS) + "\n\n\n\n" + PARAS[3] + "\n\n   \n\n" + PARAS[5] + "\n\n  " + PARAS[7] + "  \n"
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


def decode_docs(ds, name):
    ids = np.asarray(ds.split(name), dtype=np.int64)
    eos = ds.tokenizer.eos_token_id
    cuts = np.flatnonzero(ids == eos)
    pieces = np.split(ids, cuts + 1)
    return [ds.tokenizer.decode(p[p != eos].tolist()) for p in pieces if len(p)]


def test_prepare_txt_counts_files_and_stats(corpus, tmp_path):
    out = tmp_path / "ds"
    stats = prepare_text_dataset(str(corpus), out, tokenizer="byte-bpe", vocab_size=300, max_chars=10_000)
    assert {p.name for p in out.iterdir()} == {"train.bin", "val.bin", "tokenizer", "stats.json"}
    assert json.loads((out / "stats.json").read_text()) == stats
    assert stats["documents"] == 20 and stats["documents_loaded"] == 23
    assert stats["duplicates_removed"] == 3 and stats["filtered"] == 0
    assert stats["dtype"] == "uint16" and stats["vocab_size"] == 300 and stats["tokenizer"] == "byte-bpe"

    ds = TokenDataset(out)
    assert ds.content_hash == stats["content_hash"] and ds.path == out
    assert len(ds.split("train")) == stats["tokens"]["train"] and len(ds.split("val")) == stats["tokens"]["val"]
    assert ds.split("train").dtype == np.uint16
    train_docs, val_docs = decode_docs(ds, "train"), decode_docs(ds, "val")
    # Every document, in order, ends with EOS; the split is at a document boundary, val last.
    assert train_docs + val_docs == PARAS
    assert len(val_docs) == 2
    assert int(ds.split("val")[-1]) == ds.tokenizer.eos_token_id
    assert stats["bytes"] == {"train": sum(len(d.encode()) for d in train_docs),
                              "val": sum(len(d.encode()) for d in val_docs)}


def test_length_filter_counts(corpus, tmp_path):
    # Paragraphs 0-9 have 78 characters, 10-19 have 80; filtering runs before deduplication, so the
    # copies of paragraphs 3, 5 and 7 count as filtered, not as duplicates.
    with pytest.warns(UserWarning, match="'9'"):  # val holds digits train never saw
        stats = prepare_text_dataset(str(corpus), tmp_path / "ds", tokenizer="char", min_chars=79)
    assert (stats["documents"], stats["filtered"], stats["duplicates_removed"]) == (10, 13, 0)
    with pytest.warns(UserWarning, match="'9'"):
        stats = prepare_text_dataset(str(corpus), tmp_path / "ds", tokenizer="char", max_chars=79)
    assert (stats["documents"], stats["filtered"], stats["duplicates_removed"]) == (10, 10, 3)


def test_single_document_is_split_at_the_last_fraction(tmp_path):
    text = "".join(f"line {i} of the single file\n" for i in range(200)).strip()
    src = tmp_path / "one.txt"
    src.write_text(text, encoding="utf-8")
    stats = prepare_text_dataset(str(src), tmp_path / "ds", tokenizer="char", doc_split="file", val_fraction=0.1)
    ds = TokenDataset(tmp_path / "ds")
    cut = int(len(text) * 0.9)
    tok = ds.tokenizer
    assert tok.decode(ds.split("train").tolist()) == text[:cut]  # no EOS inside the cut document
    assert tok.decode(ds.split("val")[:-1].tolist()) == text[cut:]
    assert int(ds.split("val")[-1]) == tok.eos_token_id
    assert stats["tokens"] == {"train": cut, "val": len(text) - cut + 1}
    assert stats["bytes"] == {"train": cut, "val": len(text) - cut}


def test_every_input_kind(tmp_path):
    rows = [f"record number {i} says hello" for i in range(12)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows), encoding="utf-8")
    (tmp_path / "d.csv").write_text("text\n" + "".join(r + "\n" for r in rows), encoding="utf-8")
    pq.write_table(pa.table({"text": rows}), tmp_path / "d.parquet")
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("\n\n".join(rows[:6]), encoding="utf-8")
    (folder / "sub" / "b.txt").write_text("\n\n".join(rows[6:]), encoding="utf-8")
    for name in ("d.jsonl", "d.csv", "d.parquet", "folder"):
        stats = prepare_text_dataset(str(tmp_path / name), tmp_path / f"out-{name}", tokenizer="char", field="text")
        assert stats["documents"] == 12, name
        ds = TokenDataset(tmp_path / f"out-{name}")
        assert decode_docs(ds, "train") + decode_docs(ds, "val") == rows, name


def test_builtin_pydoc_byte_bpe(tmp_path):
    stats = prepare_text_dataset("builtin:pydoc", tmp_path / "ds", vocab_size=512)
    assert stats["source"] == "builtin:pydoc" and stats["documents"] > 50
    assert 0.05 < stats["tokens"]["val"] / sum(stats["tokens"].values()) < 0.2
    assert (tmp_path / "ds" / "tokenizer" / "tokenizer.json").is_file()


def test_same_input_same_hash(corpus, tmp_path):
    a = prepare_text_dataset(str(corpus), tmp_path / "a", vocab_size=300)
    b = prepare_text_dataset(str(corpus), tmp_path / "b", vocab_size=300)
    c = prepare_text_dataset(str(corpus), tmp_path / "c", vocab_size=301)
    assert a["content_hash"] == b["content_hash"] != c["content_hash"]


def test_prepare_errors(corpus, tmp_path):
    out = tmp_path / "ds"
    with pytest.raises(DataError, match="input not found"):
        prepare_text_dataset(str(tmp_path / "nope.txt"), out)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty"):
        prepare_text_dataset(str(tmp_path / "empty.txt"), out)
    (tmp_path / "d.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match=r"no field 'text' \(fields: body\)"):
        prepare_text_dataset(str(tmp_path / "d.jsonl"), out, field="text")
    with pytest.raises(DataError, match=r"at most \d+ tokens"):
        prepare_text_dataset(str(corpus), out, vocab_size=60_000)
    for bad in (0, 0.6, -0.1):
        with pytest.raises(DataError, match=r"val_fraction must be in \(0, 0.5\]"):
            prepare_text_dataset(str(corpus), out, val_fraction=bad)
    with pytest.raises(DataError, match="no text left after cleaning"):
        prepare_text_dataset(str(corpus), out, min_chars=10_000)
    (tmp_path / "tiny.txt").write_text("ab")
    with pytest.raises(DataError, match="needs at least 2"), pytest.warns(UserWarning, match="'b'"):
        prepare_text_dataset(str(tmp_path / "tiny.txt"), out, tokenizer="char")
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_failed_prepare_leaves_existing_dataset_untouched(corpus, tmp_path):
    out = tmp_path / "ds"
    stats = prepare_text_dataset(str(corpus), out, tokenizer="char")
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(DataError):
        prepare_text_dataset(str(corpus), out, vocab_size=60_000)
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert TokenDataset(out).content_hash == stats["content_hash"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "ds"]
    # A successful prepare replaces it.
    assert prepare_text_dataset(str(corpus), out, vocab_size=300)["tokenizer"] == "byte-bpe"


def test_refuses_to_replace_a_folder_that_is_not_a_dataset(corpus, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a dataset folder"):
        prepare_text_dataset(str(corpus), precious)
    assert (precious / "notes.txt").read_text() == "keep me"
    with pytest.raises(DataError, match="would replace the input"):
        prepare_text_dataset(str(corpus), tmp_path)


def test_token_dataset_errors(tmp_path, corpus):
    with pytest.raises(DataError, match="dataset folder not found"):
        TokenDataset(tmp_path / "missing")
    with pytest.raises(DataError, match="not a text dataset folder"):
        TokenDataset(tmp_path)
    prepare_text_dataset(str(corpus), tmp_path / "ds", tokenizer="char")
    with pytest.raises(DataError, match="unknown split"):
        TokenDataset(tmp_path / "ds").split("test")


def test_token_batches_are_deterministic_and_shifted():
    train = np.arange(1000, dtype=np.uint16)
    val = np.arange(5000, 5100, dtype=np.uint16)
    data = TokenBatches(train, val, batch_size=4, context=16, seed=3)
    assert data.tokens_per_batch == 64
    a, b = data.train_batch(7), data.train_batch(7)
    assert a["input_ids"].shape == a["labels"].shape == (4, 16)
    assert a["input_ids"].dtype == torch.long
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert torch.equal(a["labels"], a["input_ids"] + 1)  # labels are the next tokens
    assert not torch.equal(a["input_ids"], data.train_batch(8)["input_ids"])
    other_seed = TokenBatches(train, val, batch_size=4, context=16, seed=4)
    assert not torch.equal(a["input_ids"], other_seed.train_batch(7)["input_ids"])
    # Windows may reach the very last token but never past it.
    many = torch.cat([data.train_batch(i)["labels"] for i in range(300)])
    assert int(many.max()) <= 999 and int(many.min()) >= 1


def test_val_batches_cover_the_split_in_order():
    val = np.arange(103, dtype=np.uint16)
    data = TokenBatches(np.arange(50), val, batch_size=2, context=10, seed=0)
    batches = list(data.val_batches())
    assert [len(b["input_ids"]) for b in batches] == [2, 2, 2, 2, 2]
    x = torch.cat([b["input_ids"] for b in batches]).flatten()
    y = torch.cat([b["labels"] for b in batches]).flatten()
    assert torch.equal(x, torch.arange(100)) and torch.equal(y, torch.arange(1, 101))
    again = list(data.val_batches())
    assert all(torch.equal(p["input_ids"], q["input_ids"]) for p, q in zip(batches, again))
    assert len(list(data.val_batches(3))) == 3


def test_context_too_long(tmp_path, corpus):
    with pytest.raises(DataError, match="context 20 is too long for the data: the val split has 20 tokens"):
        TokenBatches(np.arange(100), np.arange(20), batch_size=2, context=20, seed=0)
    prepare_text_dataset(str(corpus), tmp_path / "ds", tokenizer="char")
    ds = TokenDataset(tmp_path / "ds")
    batch = ds.batches(batch_size=2, context=8, seed=0).train_batch(0)
    assert int(batch["input_ids"].max()) < len(ds.tokenizer)


def test_cli_prepare(corpus, tmp_path, capsys):
    assert main(["data", "prepare", str(corpus), "--out", str(tmp_path / "ds"), "--tokenizer", "char"]) == 0
    assert "dataset written to" in capsys.readouterr().out
    assert TokenDataset(tmp_path / "ds").stats["tokenizer"] == "char"
    assert main(["data", "prepare", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: input not found") and err.count("\n") == 1
    assert main(["data", "prepare", str(corpus), "--out", str(tmp_path / "y"), "--vocab-size", "99999"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: vocab_size 99999 is more than")
