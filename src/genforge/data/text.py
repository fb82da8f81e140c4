"""Text loaders: a file, a folder of files, or a built-in corpus -> a list of documents.

Supported inputs: .txt (split into documents by `doc_split`), .jsonl / .csv / .parquet (one
document per record, text taken from `field`), a folder of those (recursive, sorted, so the same
folder always gives the same documents in the same order) and `builtin:pydoc` (the CPython docs
corpus that ships with Python). Every failure is a `DataError` naming the file and what to do.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

from genforge.common.errors import DataError

TEXT_EXTENSIONS = (".txt", ".jsonl", ".csv", ".parquet")
DOC_SPLITS = ("paragraph", "line", "file")
BUILTINS = ("builtin:pydoc",)

# A blank line is a line holding only whitespace; runs of them are one separator.
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\f\v\r]*\n\s*")


def load_documents(input: str, field: str | None = None, doc_split: str | None = None) -> list[str]:
    """Documents of `input` (file, folder or `builtin:NAME`), in a deterministic order."""
    doc_split = doc_split or "paragraph"
    if doc_split not in DOC_SPLITS:
        raise DataError(f"unknown doc_split {doc_split!r} (choose one of: {', '.join(DOC_SPLITS)})",
                        param="doc_split")
    if input.startswith("builtin:"):
        return _load_builtin(input)
    path = Path(input).expanduser()
    if not path.exists():
        raise DataError(f"input not found: {input} (expected a file, a folder or one of: {', '.join(BUILTINS)})",
                        param="input")
    if path.is_dir():
        return _load_folder(path, field, doc_split)
    if path.suffix.lower() not in TEXT_EXTENSIONS:
        raise DataError(f"{path}: unsupported file type '{path.suffix or '(none)'}' "
                        f"(supported: {', '.join(TEXT_EXTENSIONS)})", param="input")
    docs = _load_file(path, field, doc_split)
    if not docs:
        raise DataError(f"{path}: the file is empty (no text to prepare)", param="input")
    return docs


def _load_builtin(name: str) -> list[str]:
    if name == "builtin:pydoc":
        from pydoc_data.topics import topics

        return [topics[key] for key in sorted(topics)]
    raise DataError(f"unknown built-in text corpus {name!r} (available: {', '.join(BUILTINS)})", param="input")


def _load_folder(folder: Path, field: str | None, doc_split: str) -> list[str]:
    # Hidden files and folders (.git, editor swap files) are never data.
    files = sorted(p for p in folder.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    usable = [p for p in files if p.suffix.lower() in TEXT_EXTENSIONS]
    if not usable:
        found = sorted({p.suffix or "(none)" for p in files})
        detail = f"found only: {', '.join(found)}" if found else "the folder is empty"
        raise DataError(f"{folder}: no {'/'.join(TEXT_EXTENSIONS)} files ({detail})", param="input")
    docs: list[str] = []
    for path in usable:
        docs.extend(_load_file(path, field, doc_split))
    if not docs:
        raise DataError(f"{folder}: all {len(usable)} data files are empty (no text to prepare)", param="input")
    return docs


def _load_file(path: Path, field: str | None, doc_split: str) -> list[str]:
    loaders: dict[str, Callable[[Path, str | None], list[str]]] = {
        ".jsonl": _load_jsonl, ".csv": _load_csv, ".parquet": _load_parquet}
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return split_text(_read_text(path), doc_split)
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


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}", param="input") from None
    try:
        # utf-8-sig drops a byte-order mark, which would otherwise become a character of the corpus.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (invalid byte at offset {e.start}); "
                        "convert it to UTF-8 first", param="input") from None
    return text.replace("\r\n", "\n")


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


def _load_jsonl(path: Path, field: str | None) -> list[str]:
    docs: list[str] = []
    for n, line in enumerate(_read_text(path).split("\n"), start=1):
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
        docs.append(_as_text(record[field], f"{path}:{n}", field))
    return docs


def _load_csv(path: Path, field: str | None) -> list[str]:
    # Text cells can be far larger than csv's 128 KiB default limit.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    text = _read_text(path)
    if not text.strip():
        return []
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = list(reader.fieldnames or [])
        field = _need_field(path, field, header)
        return [_as_text(row.get(field), f"{path}:{reader.line_num}", field) for row in reader]
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: not valid CSV ({e})", param="input") from None


def _load_parquet(path: Path, field: str | None) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        field = _need_field(path, field, list(schema.names))
        if not (pa.types.is_string(schema.field(field).type) or pa.types.is_large_string(schema.field(field).type)):
            raise DataError(f"{path}: field {field!r} is {schema.field(field).type}, not text", param="field")
        column = pq.read_table(path, columns=[field]).column(field)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"cannot read {path} as Parquet: {str(e).splitlines()[0]}", param="input") from None
    return [v if v is not None else "" for v in column.to_pylist()]
