"""Documents for retrieval: readers (txt, md, html, pdf, jsonl, folders, builtin:pydoc) and chunking.

A reader turns one source into a `Document`: its text and the paragraphs ("blocks") in it, each with
the heading path it sits under ("Title > Section"). For txt, md and pydoc the text is the file's own
text, so a chunk's `start`/`end` metadata are offsets into the file; html, pdf and jsonl are
extracted first and the offsets point into the extracted text.

`chunk_document` packs whole paragraphs into chunks of at most `chunk_tokens` tokens (counted by the
tokenizer the caller passes: the embedder's, so a chunk fits the model), splits only paragraphs
that are too long on their own, and only between words (CJK: between characters). Consecutive
chunks share up to `overlap` tokens. A chunk never spans two headings, and its heading is prefixed
to the text that is embedded and BM25-indexed (`embedding_text`).
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from genforge.common.errors import ConfigError, DataError
from genforge.common.store import Chunk

EXTENSIONS = {".txt": "txt", ".md": "md", ".markdown": "md", ".html": "html", ".htm": "html",
              ".pdf": "pdf", ".jsonl": "jsonl"}
PYDOC = "builtin:pydoc"
MAX_FILE_BYTES = 50 * 1024 * 1024

TokenCounter = Callable[[str], int]


@dataclass(frozen=True)
class Block:
    """One paragraph: `text[start:end]` of its document, under `heading`, in section `section`."""
    start: int
    end: int
    heading: str | None
    section: int
    extra: dict = field(default_factory=dict)   # e.g. {"page": 3} or {"line": 12}


@dataclass
class Document:
    source: str
    text: str
    blocks: list[Block]


@dataclass(frozen=True)
class Source:
    """One thing to ingest: a file, a pydoc topic (`builtin:pydoc/<topic>`), or an uploaded file's
    bytes (`data`, named as the user named the file)."""
    name: str
    kind: str
    path: Path | None = None
    data: bytes | None = field(default=None, repr=False, compare=False)

    def read_bytes(self, max_bytes: int = MAX_FILE_BYTES) -> bytes:
        if self.data is not None:
            check_file_bytes(self.name, len(self.data), max_bytes)
            return check_not_empty(self.name, self.data)
        if self.path is None:
            from pydoc_data.topics import topics
            return topics[self.name.removeprefix(PYDOC + "/")].encode()
        check_file_bytes(str(self.path), self.path.stat().st_size, max_bytes)
        return check_not_empty(str(self.path), self.path.read_bytes())


def check_file_bytes(name: str, size: int, max_bytes: int = MAX_FILE_BYTES) -> None:
    """DataError naming the file when `size` is over the per-file limit."""
    if size > max_bytes:
        raise DataError(f"{name}: {size / 2**20:.1f} MB is over the limit of {max_bytes / 2**20:.1f} MB "
                        "per file (split the file, or raise the limit)", param="max_file_bytes")


def check_not_empty(name: str, data: bytes) -> bytes:
    """`data`, or a DataError naming the file when it holds nothing but whitespace."""
    if not data.strip():
        raise DataError(f"{name}: the file is empty (nothing to index)")
    return data


def kind_of(name: str) -> str:
    """The reader a file name selects by its extension; DataError naming the file when there is none."""
    suffix = Path(name).suffix
    kind = EXTENSIONS.get(suffix.lower())
    if kind is None:
        raise DataError(f"{name}: unsupported file type '{suffix or '(none)'}' "
                        f"(supported: {', '.join(sorted(EXTENSIONS))})", param="paths")
    return kind


def list_sources(paths: list[str]) -> list[Source]:
    """Expand files, folders (recursive, sorted, hidden files skipped) and builtin:pydoc[/<topic>]."""
    out: dict[str, Source] = {}
    for spec in paths:
        for src in _expand(spec):
            out.setdefault(src.name, src)
    return list(out.values())


def _expand(spec: str) -> list[Source]:
    if spec.startswith("builtin:"):
        from pydoc_data.topics import topics
        if spec == PYDOC:
            return [Source(f"{PYDOC}/{k}", "pydoc") for k in sorted(topics)]
        topic = spec.removeprefix(PYDOC + "/")
        if spec.startswith(PYDOC + "/") and topic in topics:
            return [Source(spec, "pydoc")]
        raise DataError(f"unknown built-in source {spec!r} (use {PYDOC} or {PYDOC}/<topic>, topics: "
                        f"{', '.join(sorted(topics)[:8])}, ...)", param="paths")
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"{spec}: no such file or folder", param="paths")
    if path.is_file():
        return [Source(str(path.resolve()), kind_of(str(path)), path.resolve())]
    # Hidden files and folders (.git, editor swap files) are never documents.
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    return [Source(str(p.resolve()), EXTENSIONS[p.suffix.lower()], p.resolve()) for p in files]


def parse(source: Source, data: bytes, *, field: str = "text") -> Document:
    """The document in `data` (the bytes of `source`); DataError naming the file when unreadable."""
    if source.kind == "pdf":
        return _parse_pdf(source.name, data)
    try:
        text = data.decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as e:
        raise DataError(f"{source.name}: not UTF-8 text ({e.reason} at byte {e.start}); "
                        "convert it to UTF-8") from None
    if source.kind == "html":
        return _parse_html(source.name, text)
    if source.kind == "jsonl":
        return _parse_jsonl(source.name, text, field)
    style = {"txt": None, "md": "md", "pydoc": "rst"}[source.kind]
    doc = Document(source.name, text, _scan_lines(text, style))
    if source.kind == "pydoc" and doc.blocks and doc.blocks[0].heading is None:
        topic = source.name.removeprefix(PYDOC + "/")
        doc.blocks = [Block(b.start, b.end, b.heading or topic, b.section, b.extra) for b in doc.blocks]
    return doc


_ATX = re.compile(r" {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_FENCE = re.compile(r" {0,3}(```|~~~)")
_UNDERLINE = re.compile(r"([=\-~*^\"+#])\1{2,}")


def _scan_lines(text: str, style: str | None, base: int = 0, section0: int = 0) -> list[Block]:
    """Paragraphs (blank-line separated) of `text`, with headings: markdown ATX/setext ("md"),
    reStructuredText underlines ("rst", as pydoc is written), or none. Fenced code stays one block."""
    blocks: list[Block] = []
    stack: list[tuple[int, str]] = []          # (level, title) of the open headings
    rst_levels: dict[str, int] = {}            # underline char -> level, in order of first use
    section = section0
    para: list[tuple[int, int]] = []           # (start, end) of the current paragraph's lines
    fenced = False

    def heading() -> str | None:
        return " > ".join(t for _, t in stack) or None

    def flush() -> None:
        if para:
            blocks.append(Block(base + para[0][0], base + para[-1][1], heading(), section))
            para.clear()

    def open_heading(level: int, title: str) -> None:
        nonlocal section
        flush()
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, title.strip()))
        section += 1

    pos = 0
    for line in text.split("\n"):
        start, end = pos, pos + len(line)
        pos = end + 1
        stripped = line.strip()
        if style == "md" and _FENCE.match(line):
            fenced = not fenced
            para.append((start, end))
            continue
        if fenced:
            para.append((start, end))
            continue
        if not stripped:
            flush()
            continue
        if style == "md" and (m := _ATX.match(line)):
            open_heading(len(m.group(1)), m.group(2))
            continue
        if len(para) == 1 and _UNDERLINE.fullmatch(stripped) and not line[:1].isspace():
            title = text[para[0][0]:para[0][1]]
            if style == "md" and stripped[0] in "=-":
                para.clear()
                open_heading(1 if stripped[0] == "=" else 2, title)
                continue
            if style == "rst" and len(stripped) >= len(title.rstrip()) and title[:1] not in " |+":
                para.clear()
                open_heading(rst_levels.setdefault(stripped[0], len(rst_levels) + 1), title)
                continue
        para.append((start, end))
    flush()
    return blocks


def _joined(source: str, pieces: list[tuple[str, str | None, dict]]) -> Document:
    """A document whose text is `pieces` (text, heading, extra) joined by blank lines; each piece is
    split into paragraphs and starts a new section when its heading or extra changes."""
    parts: list[str] = []
    blocks: list[Block] = []
    pos, section, last = 0, 0, None
    for text, head, extra in pieces:
        text = text.strip()
        if not text:
            continue
        if (head, extra) != last:
            section, last = section + 1, (head, extra)
        for b in _scan_lines(text, None, pos, section):
            blocks.append(Block(b.start, b.end, head, section, extra))
        parts.append(text)
        pos += len(text) + 2
    return Document(source, "\n\n".join(parts), blocks)


def _parse_pdf(source: str, data: bytes) -> Document:
    import io
    import logging

    from pypdf import PdfReader

    # pypdf logs what it repairs ("EOF marker not found", ...); the caller reports the outcome once
    logging.getLogger("pypdf").setLevel(logging.ERROR)
    try:
        pages = [page.extract_text() or "" for page in PdfReader(io.BytesIO(data)).pages]
    except Exception as e:  # pypdf raises many types (PdfReadError, ValueError, KeyError...) on bad files
        raise DataError(f"{source}: cannot parse the PDF ({type(e).__name__}: {e}); "
                        "repair or re-export it, or leave it out") from None
    doc = _joined(source, [(t, None, {"page": i + 1}) for i, t in enumerate(pages)])
    if not doc.blocks:
        raise DataError(f"{source}: the PDF has no extractable text (a scan? run OCR on it first)")
    return doc


def _parse_jsonl(source: str, text: str, field: str) -> Document:
    pieces: list[tuple[str, str | None, dict]] = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{source}:{n}: not valid JSON ({e.msg}); one JSON object per line") from None
        value = row.get(field) if isinstance(row, dict) else None
        if not isinstance(value, str):
            raise DataError(f"{source}:{n}: no string field {field!r} (name the text field with --field)",
                            param="field")
        title = row.get("title")
        pieces.append((value, title if isinstance(title, str) else None, {"line": n}))
    return _joined(source, pieces)


def _parse_html(source: str, text: str) -> Document:
    from html.parser import HTMLParser

    skip_tags = {"script", "style", "noscript", "template", "head", "svg"}
    block_tags = {"p", "div", "br", "li", "ul", "ol", "tr", "table", "pre", "blockquote", "section",
                  "article", "header", "footer", "main", "nav", "dt", "dd", "hr", "figure", "form"}
    pieces: list[tuple[str, str | None, dict]] = []
    stack: list[tuple[int, str]] = []

    class Parser(HTMLParser):
        def __init__(self) -> None:
            super().__init__(convert_charrefs=True)
            self.skipping = self.pre = self.head_level = 0
            self.buf: list[str] = []

        def flush(self) -> None:
            raw = "".join(self.buf)
            self.buf = []
            if self.head_level:
                title = " ".join(raw.split())
                while stack and stack[-1][0] >= self.head_level:
                    stack.pop()
                stack.append((self.head_level, title))
                self.head_level = 0
                return
            body = raw if self.pre else " ".join(raw.split())
            pieces.append((body, " > ".join(t for _, t in stack) or None, {}))

        def handle_starttag(self, tag, attrs):
            if tag in skip_tags:
                self.skipping += 1
            elif re.fullmatch(r"h[1-6]", tag):
                self.flush()
                self.head_level = int(tag[1])
            elif tag in block_tags:
                self.flush()
                if tag == "pre":
                    self.pre += 1

        def handle_endtag(self, tag):
            if tag in skip_tags:
                self.skipping = max(0, self.skipping - 1)
            elif re.fullmatch(r"h[1-6]", tag) or tag in block_tags:
                self.flush()
                if tag == "pre" and self.pre:
                    self.pre -= 1

        def handle_data(self, data):
            if not self.skipping:
                self.buf.append(data)

    p = Parser()
    p.feed(text)
    p.close()
    p.flush()
    # Consecutive pieces under one heading are paragraphs of one section.
    doc = _joined(source, pieces)
    if not doc.blocks:
        raise DataError(f"{source}: the HTML page has no text outside scripts and styles")
    return doc


@dataclass
class Chunked:
    chunks: list[Chunk]
    duplicates: int = 0     # exact repeats of an earlier chunk of the same source, removed
    dropped: int = 0        # near-empty chunks (no letters or digits, or under min_tokens), removed


_WORD = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]"
                   r"|[^\s\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]+")


def hf_token_counter(tokenizer) -> TokenCounter:
    """Count tokens with a Hugging Face tokenizer (the embedder's: `Embedder._model.tokenizer`)."""
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def chunk_document(doc: Document, count_tokens: TokenCounter, *, chunk_tokens: int = 200,
                   overlap: int = 40, min_tokens: int = 4) -> Chunked:
    """Chunks of `doc` (see the module docstring); positions are consecutive from 0."""
    if chunk_tokens < 8:
        raise ConfigError(f"chunk_tokens must be at least 8, got {chunk_tokens}", param="chunk_tokens")
    if not 0 <= overlap < chunk_tokens // 2:
        raise ConfigError(f"overlap must be in [0, chunk_tokens/2), got {overlap} with chunk_tokens "
                          f"{chunk_tokens}", param="overlap")
    cache: dict[str, int] = {}
    out = Chunked([])
    seen: set[str] = set()
    sections: dict[int, list[Block]] = {}
    for b in doc.blocks:
        sections.setdefault(b.section, []).append(b)
    for blocks in sections.values():
        # Words of the section with their char spans; a paragraph is a range of word indices.
        spans: list[tuple[int, int]] = []
        paras: list[tuple[int, int, Block]] = []
        for b in blocks:
            first = len(spans)
            spans += [(m.start(), m.end()) for m in _WORD.finditer(doc.text, b.start, b.end)]
            if len(spans) > first:
                paras.append((first, len(spans), b))
        # Word pieces tokenize independently (whitespace separates them), so counts add up.
        cum = [0]
        for s, e in spans:
            word = doc.text[s:e]
            if word not in cache:
                cache[word] = count_tokens(word)
            cum.append(cum[-1] + cache[word])
        for a, z, block in _pack(paras, cum, chunk_tokens, overlap):
            text = doc.text[spans[a][0]:spans[z - 1][1]]
            if cum[z] - cum[a] < min_tokens or not any(ch.isalnum() for ch in text):
                out.dropped += 1
                continue
            key = " ".join(text.split())
            if key in seen:
                out.duplicates += 1
                continue
            seen.add(key)
            meta = {"heading": block.heading, "start": spans[a][0], "end": spans[z - 1][1], **block.extra}
            out.chunks.append(Chunk(doc.source, len(out.chunks), text, meta))
    return out


def _pack(paras: list[tuple[int, int, Block]], cum: list[int], budget: int,
          overlap: int) -> list[tuple[int, int, Block]]:
    """Word ranges [a, z) of the chunks, each with the block it starts in."""
    def tok(a: int, z: int) -> int:
        return cum[z] - cum[a]

    out: list[tuple[int, int, Block]] = []
    start, p = (paras[0][0] if paras else 0), 0
    while p < len(paras):
        end, first = start, p
        while p < len(paras) and tok(start, paras[p][1]) <= budget:
            end, p = paras[p][1], p + 1
        if p == first:
            if start < paras[p][0] and tok(paras[p][0], paras[p][1]) <= budget:
                start = paras[p][0]     # fits whole without the overlap: a whole paragraph wins
                continue
            # Too long on its own: as many words as fit, at least one past the previous chunk.
            end = bisect.bisect_right(cum, cum[start] + budget) - 1
            end = min(max(end, start + 1, out[-1][1] + 1 if out else 0), paras[p][1])
            if end == paras[p][1]:
                p += 1
        owner = next(b for a, z, b in paras if a <= start < z)
        out.append((start, end, owner))
        if p < len(paras):
            # The next chunk starts with the last words (up to `overlap` tokens) of this one.
            back = bisect.bisect_left(cum, cum[end] - overlap)
            start = min(max(back, start + 1), end)
    return out


def embedding_text(chunk: Chunk) -> str:
    """What is embedded and BM25-indexed for `chunk`: its heading path, then its text."""
    heading = (chunk.metadata or {}).get("heading")
    return f"{heading}\n{chunk.text}" if heading else chunk.text
