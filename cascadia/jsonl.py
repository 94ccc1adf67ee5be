"""Reading JSON-lines files with errors that name the file and the line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator


def read_jsonl(path: Path, error: Callable[[Path, int, str], Exception]) -> Iterator[tuple[int, Any]]:
    """(line number, decoded value) for every non-blank line; bad JSON raises
    `error(path, line, what)` so each format keeps its own error type."""
    with open(path, encoding="utf-8-sig") as fh:
        for line, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                yield line, json.loads(text)
            except json.JSONDecodeError as err:
                raise error(path, line, f"bad JSON: {err.msg}") from None
