"""Readers and chunking of documents, with the embedder's real tokenizer."""

import json
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from genforge.common.errors import ConfigError, DataError
from genforge.data.documents import (
    chunk_document,
    embedding_text,
    hf_token_counter,
    list_sources,
    parse,
)
from genforge.models.embeddings import default_embedder_path


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(default_embedder_path()))


@pytest.fixture(scope="module")
def count(tokenizer):
    return hf_token_counter(tokenizer)


def make_pdf(path: Path, pages: list[list[str]]) -> Path:
    """A minimal but valid PDF (Helvetica text, one line per string), xref offsets computed."""
    n = len(pages)
    objs = ["<< /Type /Catalog /Pages 2 0 R >>",
            f"<< /Type /Pages /Kids [{' '.join(f'{4 + 2 * i} 0 R' for i in range(n))}] /Count {n} >>",
            "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    for i, lines in enumerate(pages):
        body = "BT /F1 12 Tf 14 TL 72 720 Td " + " ".join(f"({ln}) Tj T*" for ln in lines) + " ET"
        objs.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
                    f"/Contents {5 + 2 * i} 0 R >>")
        objs.append(f"<< /Length {len(body)} >>\nstream\n{body}\nendstream")
    out, offsets = b"%PDF-1.4\n", []
    for i, obj in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{obj}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    path.write_bytes(out)
    return path


def doc_of(path: Path, **kw):
    [src] = list_sources([str(path)])
    return parse(src, src.read_bytes(), **kw)


def test_markdown_headings_paragraphs_and_fences(tmp_path, count):
    md = ("# Guide\n\nIntro paragraph here.\n\n## Install\n\nRun the installer now.\n\n"
          "```\n# not a heading\n\nstill code\n```\n\nSetext title\n------------\n\nUnder setext.\n")
    doc = doc_of(_write(tmp_path / "g.md", md))
    chunks = chunk_document(doc, count, chunk_tokens=200, overlap=0).chunks
    heads = [c.metadata["heading"] for c in chunks]
    assert heads == ["Guide", "Guide > Install", "Guide > Setext title"]
    # The fenced block (with its blank line and '#') stays in the Install chunk, not a heading.
    assert "# not a heading\n\nstill code" in chunks[1].text
    for c in chunks:
        assert c.text == doc.text[c.metadata["start"]:c.metadata["end"]]
        assert c.source == str((tmp_path / "g.md").resolve())
    assert [c.position for c in chunks] == [0, 1, 2]
    assert embedding_text(chunks[1]).startswith("Guide > Install\n")


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_chunks_fit_keep_paragraphs_split_between_words_and_overlap(tmp_path, count, tokenizer):
    short = [f"Paragraph {i} talks about topic {i} briefly and then stops." for i in range(6)]
    long = " ".join(f"word{i} alpha-beta, gamma." for i in range(300))   # one paragraph of ~2000 tokens
    text = "\n\n".join(short[:3] + [long] + short[3:])
    doc = doc_of(_write(tmp_path / "a.txt", text))
    chunks = chunk_document(doc, count, chunk_tokens=60, overlap=12).chunks
    for c in chunks:
        assert len(tokenizer(c.text, add_special_tokens=False)["input_ids"]) <= 60
        s, e = c.metadata["start"], c.metadata["end"]
        assert s == 0 or doc.text[s - 1].isspace()          # never starts inside a word
        assert e == len(doc.text) or doc.text[e].isspace()  # never ends inside a word
    # Short paragraphs are never cut: each appears whole in some chunk.
    for p in short:
        assert any(p in c.text for c in chunks)
    # The long paragraph is split, and consecutive pieces of it overlap.
    pieces = [c for c in chunks if "word" in c.text]
    assert len(pieces) >= 10
    for a, b in zip(pieces, pieces[1:]):
        assert b.metadata["start"] < a.metadata["end"]
        shared = len(tokenizer(doc.text[b.metadata["start"]:a.metadata["end"]], add_special_tokens=False)["input_ids"])
        assert 0 < shared <= 12
    # Everything is covered: no word of the document is missing from the chunks.
    covered = set()
    for c in chunks:
        covered.update(range(c.metadata["start"], c.metadata["end"]))
    assert all(i in covered for i, ch in enumerate(doc.text) if not ch.isspace())


def test_cjk_text_splits_between_characters(tmp_path, count):
    zh = "检索增强生成把文档片段放进提示词里。" * 40
    doc = doc_of(_write(tmp_path / "zh.txt", zh))
    chunks = chunk_document(doc, count, chunk_tokens=50, overlap=10).chunks
    assert len(chunks) > 5
    assert "".join(c.text for c in chunks).replace("\n", "")[:30] == zh[:30]
    assert all(count(c.text) <= 50 for c in chunks)


def test_duplicates_removed_and_near_empty_dropped(tmp_path, count):
    text = "\n\n".join(["# Notes", "The same sentence repeated here.", "----", "The same sentence repeated here.",
                        "## Other", "----"])
    doc = doc_of(_write(tmp_path / "d.md", text))
    out = chunk_document(doc, count, chunk_tokens=8, overlap=0)
    assert [c.text for c in out.chunks] == ["The same sentence repeated here."]
    assert out.duplicates == 1 and out.dropped == 2


def test_html_drops_scripts_keeps_headings(tmp_path, count):
    html = ("<html><head><title>T</title><style>p {color: red}</style></head><body>"
            "<h1>Manual</h1><p>First &amp; foremost.</p><script>var secret = 1;</script>"
            "<h2>Setup</h2><p>Plug it   in.</p><ul><li>one item</li><li>two item</li></ul></body></html>")
    doc = doc_of(_write(tmp_path / "m.html", html))
    chunks = chunk_document(doc, count, overlap=0).chunks
    assert [(c.metadata["heading"], c.text) for c in chunks] == [
        ("Manual", "First & foremost."), ("Manual > Setup", "Plug it in.\n\none item\n\ntwo item")]
    assert "secret" not in doc.text and "color" not in doc.text


def test_pdf_pages_and_broken_pdf(tmp_path, count):
    good = make_pdf(tmp_path / "r.pdf", [["Quarterly revenue grew by twelve percent."], ["The second page text."]])
    doc = doc_of(good)
    chunks = chunk_document(doc, count, overlap=0).chunks
    assert [(c.text, c.metadata["page"]) for c in chunks] == [
        ("Quarterly revenue grew by twelve percent.", 1), ("The second page text.", 2)]
    bad = tmp_path / "broken.pdf"
    bad.write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 9 0 R >> garbage")
    with pytest.raises(DataError, match=r"broken\.pdf.*PDF"):
        doc_of(bad)


def test_jsonl_field_and_errors(tmp_path, count):
    rows = [{"text": "Refunds take five days.", "title": "Refunds"}, {"text": "Shipping is free."}]
    p = _write(tmp_path / "faq.jsonl", "\n".join(json.dumps(r) for r in rows))
    chunks = chunk_document(doc_of(p), count, overlap=0).chunks
    # Records are separate sections: never merged into one chunk.
    assert [(c.text, c.metadata["heading"], c.metadata["line"]) for c in chunks] == [
        ("Refunds take five days.", "Refunds", 1), ("Shipping is free.", None, 2)]
    other = _write(tmp_path / "b.jsonl", json.dumps({"body": "Body text."}))
    assert doc_of(other, field="body").text == "Body text."
    with pytest.raises(DataError, match=r"b\.jsonl:1: no string field 'text'"):
        doc_of(other)
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match=r"c\.jsonl:2: not valid JSON"):
        doc_of(tmp_path / "c.jsonl")


def test_empty_oversized_and_unknown_inputs(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    [src] = list_sources([str(tmp_path / "empty.txt")])
    with pytest.raises(DataError, match=r"empty\.txt: the file is empty"):
        src.read_bytes()
    (tmp_path / "big.txt").write_text("x" * 5000)
    [src] = list_sources([str(tmp_path / "big.txt")])
    with pytest.raises(DataError, match=r"big\.txt: .* over the limit"):
        src.read_bytes(max_bytes=1000)
    with pytest.raises(DataError, match="no such file"):
        list_sources([str(tmp_path / "missing.md")])
    (tmp_path / "x.docx").write_text("x")
    with pytest.raises(DataError, match="unsupported file type '.docx'"):
        list_sources([str(tmp_path / "x.docx")])
    with pytest.raises(DataError, match="unknown built-in source"):
        list_sources(["builtin:pydoc/no-such-topic"])


def test_folders_recursive_and_pydoc(tmp_path, count):
    (tmp_path / "sub" / ".git").mkdir(parents=True)
    for name in ["a.md", "sub/b.txt", "sub/.git/c.txt", "sub/d.docx", ".hidden.md"]:
        (tmp_path / name).write_text("text")
    names = [Path(s.name).relative_to(tmp_path.resolve()).as_posix() for s in list_sources([str(tmp_path)])]
    assert names == ["a.md", "sub/b.txt"]

    from pydoc_data.topics import topics
    srcs = list_sources(["builtin:pydoc", "builtin:pydoc/assert"])
    assert len(srcs) == len(topics) and srcs[0].name == f"builtin:pydoc/{sorted(topics)[0]}"
    [src] = list_sources(["builtin:pydoc/compound"])
    chunks = chunk_document(parse(src, src.read_bytes()), count).chunks
    heads = {c.metadata["heading"] for c in chunks}
    assert "Compound statements" in heads
    assert 'Compound statements > The "match" statement > Patterns > OR Patterns' in heads
    assert not any(re.fullmatch(r"[=\-~*]+", c.text.strip()) for c in chunks)


def test_bad_chunk_settings(tmp_path, count):
    doc = doc_of(_write(tmp_path / "a.txt", "some text here"))
    with pytest.raises(ConfigError, match="overlap"):
        chunk_document(doc, count, chunk_tokens=50, overlap=30)
    with pytest.raises(ConfigError, match="chunk_tokens"):
        chunk_document(doc, count, chunk_tokens=2, overlap=0)
