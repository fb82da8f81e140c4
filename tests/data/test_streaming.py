"""Text preparation streams: chunk boundaries change nothing, and memory does not grow with the corpus."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from genforge.data import text as text_module
from genforge.data import tokens as tokens_module
from genforge.data.text import load_documents, split_text
from genforge.data.tokens import content_hash, prepare_text_dataset

TRICKY = ("Ünïcödé ✓ 你好 first para\r\nstill first\r\n\r\n \t \r\n\r\nsecond para 🙂\n\n\n\n"
          "third\r\n" + "\n".join(f"line {i} ✓" for i in range(40)) + "\n\n   \n\nlast one\n")


@pytest.mark.parametrize("doc_split", ["paragraph", "line", "file"])
@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64])
def test_txt_documents_do_not_depend_on_the_read_size(tmp_path, monkeypatch, doc_split, chunk):
    path = tmp_path / "t.txt"
    path.write_bytes(b"\xef\xbb\xbf" + TRICKY.encode("utf-8"))  # with a byte-order mark
    expected = split_text(TRICKY.replace("\r\n", "\n"), doc_split)
    monkeypatch.setattr(text_module, "CHUNK_BYTES", chunk)
    assert load_documents(str(path), doc_split=doc_split) == expected


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_jsonl_and_csv_do_not_depend_on_the_read_size(tmp_path, monkeypatch, chunk):
    rows = ["héllo", "wörld\nline two", "✓ " * 30]
    (tmp_path / "d.jsonl").write_text("\r\n".join(json.dumps({"text": r}) for r in rows) + "\n", encoding="utf-8")
    cells = "\r\n".join('"' + r.replace('"', '""') + '"' for r in rows)
    (tmp_path / "d.csv").write_text("text\r\n" + cells + "\r\n", encoding="utf-8")
    monkeypatch.setattr(text_module, "CHUNK_BYTES", chunk)
    assert load_documents(str(tmp_path / "d.jsonl"), field="text") == rows
    assert load_documents(str(tmp_path / "d.csv"), field="text") == rows


def test_a_utf8_error_names_the_byte_offset_across_chunks(tmp_path, monkeypatch):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"abcdefghij\xffrest")
    monkeypatch.setattr(text_module, "CHUNK_BYTES", 4)
    with pytest.raises(Exception, match="invalid byte at offset 10"):
        load_documents(str(path))


@pytest.mark.parametrize("tokenizer", ["char", "byte-bpe"])
def test_prepared_dataset_does_not_depend_on_chunk_sizes(tmp_path, monkeypatch, tokenizer):
    src = tmp_path / "c.txt"
    paras = [f"Paragraph {i}: ünïcödé ✓ {'word ' * (i % 7)}" for i in range(60)]
    src.write_text("\n\n".join(paras + paras[:5]) + "\n", encoding="utf-8")
    kw = dict(tokenizer=tokenizer, vocab_size=300, val_fraction=0.2)
    big = prepare_text_dataset(str(src), tmp_path / "a", **kw)
    monkeypatch.setattr(text_module, "CHUNK_BYTES", 3)
    monkeypatch.setattr(tokens_module, "_ENCODE_CHUNK_CHARS", 10)
    small = prepare_text_dataset(str(src), tmp_path / "b", **kw)
    assert small == big  # every stat, the content hash included
    assert big["documents"] == 60 and big["duplicates_removed"] == 5
    assert content_hash(tmp_path / "a") == big["content_hash"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["stats.json", "tokenizer", "train.bin", "val.bin"]


def _write_corpus(path, megabytes: float) -> int:
    """Distinct documents of ~2 KB (a few exact duplicates) as JSON lines; returns the size in bytes."""
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "lambda", "sigma", "omega", "the",
             "of", "and", "to", "in", "is", "that", "for", "it", "with"]
    import random

    rs = random.Random(0)
    size, i = 0, 0
    with path.open("w", encoding="utf-8") as f:
        while size < megabytes * 1e6:
            body = " ".join(rs.choice(words) for _ in range(400)) if i % 50 else "a duplicate document"
            line = json.dumps({"text": f"doc {i if i % 50 else 'dup'}: {body}"}) + "\n"
            f.write(line)
            size += len(line)
            i += 1
    return size


CHILD = textwrap.dedent("""
    import json, resource, sys
    from genforge.cli import main
    from genforge.data import text, tokens
    # Chunks of 64 KiB, so the small corpus already reaches the per-chunk peak and any further
    # growth is growth with the corpus.
    text.CHUNK_BYTES = tokens._ENCODE_CHUNK_CHARS = 1 << 16
    peaks = []
    for corpus, out in zip(sys.argv[1::2], sys.argv[2::2]):
        code = main(["data", "prepare", corpus, "--out", out, "--field", "text", "--tokenizer", "char"])
        assert code == 0, code
        peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps(peaks))
""")


def test_prepare_memory_does_not_grow_with_the_corpus(tmp_path):
    small = _write_corpus(tmp_path / "small.jsonl", 1)
    large = _write_corpus(tmp_path / "large.jsonl", 8)
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "small.jsonl"), str(tmp_path / "a"),
                          str(tmp_path / "large.jsonl"), str(tmp_path / "b")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    peak_small, peak_large = json.loads(out.stdout.strip().splitlines()[-1])
    growth = peak_large - peak_small
    # Holding the corpus would grow the peak by more than the corpus (the text, then 8-byte ids);
    # streaming grows it by the digests and lengths of the extra documents, and allocator noise.
    assert growth < (large - small) / 3, (growth, large - small)
    stats = json.loads((tmp_path / "b" / "stats.json").read_text())
    assert stats["documents_loaded"] > stats["documents"] > 3000 and stats["duplicates_removed"] > 50
    assert stats["tokens"]["train"] + stats["tokens"]["val"] > 7_000_000
    assert stats["content_hash"] == content_hash(tmp_path / "b")
