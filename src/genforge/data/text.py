"""Text loaders: a file, a folder of files, or a built-in corpus -> a stream of documents.

Supported inputs: .txt (split into documents by `doc_split`), .jsonl / .csv / .parquet (one
document per record, text taken from `field`), a folder of those (recursive, sorted, so the same
folder always gives the same documents in the same order) and `builtin:pydoc` (the CPython docs
corpus that ships with Python). Every failure is a `DataError` naming the file and what to do.

`iter_documents` reads in chunks (1 MiB of a text file, one Parquet row group batch at a time), so
memory holds one chunk and the document being assembled, never the corpus; `load_documents` is
the list of the same documents, for small inputs.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from genforge.common.errors import DataError

TEXT_EXTENSIONS = (".txt", ".jsonl", ".csv", ".parquet")
DOC_SPLITS = ("paragraph", "line", "file")
BUILTINS = ("builtin:pydoc",)
CHUNK_BYTES = 1 << 20
_PARQUET_BATCH_ROWS = 1024

# A blank line is a line holding only whitespace; runs of them are one separator.
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\f\v\r]*\n\s*")


def load_documents(input: str, field: str | None = None, doc_split: str | None = None) -> list[str]:
    """Documents of `input` (file, folder or `builtin:NAME`), in a deterministic order."""
    return list(iter_documents(input, field=field, doc_split=doc_split))


def iter_documents(input: str, field: str | None = None, doc_split: str | None = None) -> Iterator[str]:
    """The documents of `input` one at a time, in a deterministic order (see load_documents)."""
    doc_split = doc_split or "paragraph"
    if doc_split not in DOC_SPLITS:
        raise DataError(f"unknown doc_split {doc_split!r} (choose one of: {', '.join(DOC_SPLITS)})",
                        param="doc_split")
    if input.startswith("builtin:"):
        return iter(_load_builtin(input))
    path = Path(input).expanduser()
    if not path.exists():
        raise DataError(f"input not found: {input} (expected a file, a folder or one of: {', '.join(BUILTINS)})",
                        param="input")
    if path.is_dir():
        return _iter_folder(path, field, doc_split, _data_files(path))
    if path.suffix.lower() not in TEXT_EXTENSIONS:
        raise DataError(f"{path}: unsupported file type '{path.suffix or '(none)'}' "
                        f"(supported: {', '.join(TEXT_EXTENSIONS)})", param="input")
    return _iter_file_nonempty(path, field, doc_split)


def _iter_file_nonempty(path: Path, field: str | None, doc_split: str) -> Iterator[str]:
    empty = True
    for doc in _iter_file(path, field, doc_split):
        empty = False
        yield doc
    if empty:
        raise DataError(f"{path}: the file is empty (no text to prepare)", param="input")


def _load_builtin(name: str) -> list[str]:
    if name == "builtin:pydoc":
        from pydoc_data.topics import topics

        return [topics[key] for key in sorted(topics)]
    raise DataError(f"unknown built-in text corpus {name!r} (available: {', '.join(BUILTINS)})", param="input")


def _data_files(folder: Path) -> list[Path]:
    # Hidden files and folders (.git, editor swap files) are never data.
    files = sorted(p for p in folder.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    usable = [p for p in files if p.suffix.lower() in TEXT_EXTENSIONS]
    if not usable:
        found = sorted({p.suffix or "(none)" for p in files})
        detail = f"found only: {', '.join(found)}" if found else "the folder is empty"
        raise DataError(f"{folder}: no {'/'.join(TEXT_EXTENSIONS)} files ({detail})", param="input")
    return usable


def _iter_folder(folder: Path, field: str | None, doc_split: str, usable: list[Path]) -> Iterator[str]:
    empty = True
    for path in usable:
        for doc in _iter_file(path, field, doc_split):
            empty = False
            yield doc
    if empty:
        raise DataError(f"{folder}: all {len(usable)} data files are empty (no text to prepare)", param="input")


def _iter_file(path: Path, field: str | None, doc_split: str) -> Iterator[str]:
    loaders: dict[str, Callable[[Path, str | None], Iterator[str]]] = {
        ".jsonl": _iter_jsonl, ".csv": _iter_csv, ".parquet": _iter_parquet}
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _iter_txt(path, doc_split)
    return loaders[suffix](path, field)


def split_text(text: str, doc_split: str = "paragraph") -> list[str]:
    """One text -> documents; whitespace-only pieces are separators, not documents."""
    if doc_split == "file":
        pieces = [text]
    elif doc_split == "line":
        pieces = text.split("\n")
    else:
        pieces = _PARAGRAPH_BREAK.split(text)
    return [p for p in pieces if p.strip()]


def _chunks(path: Path) -> Iterator[str]:
    """The UTF-8 text of `path` in pieces of about CHUNK_BYTES, CRLF read as LF, BOM dropped."""
    # utf-8-sig drops a byte-order mark, which would otherwise become a character of the corpus.
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    offset, held = 0, ""
    try:
        with path.open("rb") as f:
            while True:
                raw = f.read(CHUNK_BYTES)
                try:
                    text = held + decoder.decode(raw, final=not raw)
                except UnicodeDecodeError as e:
                    raise DataError(f"{path} is not UTF-8 text (invalid byte at offset {offset + e.start}); "
                                    "convert it to UTF-8 first", param="input") from None
                offset += len(raw)
                # a CR at the end may be the first half of a CRLF split across two reads
                held = "\r" if raw and text.endswith("\r") else ""
                text = (text[:-1] if held else text).replace("\r\n", "\n")
                if text:
                    yield text
                if not raw:
                    return
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}", param="input") from None


def _lines(path: Path) -> Iterator[str]:
    """Lines of `path` with their "\\n" (the last one may have none)."""
    rest = ""
    for text in _chunks(path):
        lines = (rest + text).split("\n")
        rest = lines.pop()
        for line in lines:
            yield line + "\n"
    if rest:
        yield rest


def _iter_txt(path: Path, doc_split: str) -> Iterator[str]:
    if doc_split == "file":
        text = "".join(_chunks(path))
        if text.strip():
            yield text
        return
    if doc_split == "line":
        for line in _lines(path):
            line = line[:-1] if line.endswith("\n") else line
            if line.strip():
                yield line
        return
    buf = ""
    for text in _chunks(path):
        # a break can only start inside the whitespace the buffer ends with: scan from there
        scan = len(buf.rstrip())
        buf += text
        start = 0
        for m in _PARAGRAPH_BREAK.finditer(buf, scan):
            if m.end() == len(buf):
                break  # the break may go on in the next chunk
            if buf[start:m.start()].strip():
                yield buf[start:m.start()]
            start = m.end()
        buf = buf[start:]
    yield from split_text(buf, "paragraph")


def _need_field(path: Path, field: str | None, fields: list[str]) -> str:
    names = ", ".join(fields) if fields else "none"
    if field is None:
        raise DataError(f"{path}: set --field to the column holding the text (fields: {names})", param="field")
    if field not in fields:
        raise DataError(f"{path}: no field {field!r} (fields: {names})", param="field")
    return field


def _as_text(value: object, where: str, field: str) -> str:
    if value is None:
        return ""  # an empty record is dropped (and counted) by the length filter
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} is {type(value).__name__}, not text", param="field")
    return value


def _iter_jsonl(path: Path, field: str | None) -> Iterator[str]:
    for n, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg})", param="input") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{n}: expected a JSON object per line, got {type(record).__name__}",
                            param="input")
        if field is None:
            _need_field(path, field, list(record))
        if field not in record:
            raise DataError(f"{path}:{n}: no field {field!r} (fields: {', '.join(record) or 'none'})",
                            param="field")
        yield _as_text(record[field], f"{path}:{n}", field)


def _iter_csv(path: Path, field: str | None) -> Iterator[str]:
    # Text cells can be far larger than csv's 128 KiB default limit.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reader = csv.DictReader(_lines(path))
    try:
        header = reader.fieldnames
        if not header:
            return  # an empty file: no records
        field = _need_field(path, field, list(header))
        for row in reader:
            yield _as_text(row.get(field), f"{path}:{reader.line_num}", field)
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: not valid CSV ({e})", param="input") from None


def _iter_parquet(path: Path, field: str | None) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
        schema = file.schema_arrow
        field = _need_field(path, field, list(schema.names))
        kind = schema.field(field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise DataError(f"{path}: field {field!r} is {kind}, not text", param="field")
        batches = file.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[field])
        for batch in batches:
            for v in batch.column(0).to_pylist():
                yield v if v is not None else ""
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"cannot read {path} as Parquet: {str(e).splitlines()[0]}", param="input") from None
