"""Reading a JSON-lines file of records (labelled sets, question files): one object per line."""

from __future__ import annotations

import json
from pathlib import Path

from genforge.common.errors import DataError


def read_records(path: str | Path, what: str, param: str | None = None) -> list[tuple[int, dict]]:
    """(line number, object) for each non-empty line; a missing file or a bad line is a DataError
    naming `what` and the line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{what} {p} does not exist", param=param)
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{n}: not valid JSON ({e.msg}); {what} has one JSON object per line",
                            param=param) from None
        if not isinstance(row, dict):
            raise DataError(f"{p}:{n}: expected a JSON object, got {type(row).__name__}", param=param)
        out.append((n, row))
    return out
