"""Errors shared by the file readers."""

from __future__ import annotations

from typing import Any


class FileFormatError(ValueError):
    """A file could not be read; the message is ``"<file>:<line>: <what is wrong>"``."""

    def __init__(self, path: Any, line: int | None, what: str):
        self.path = str(path)
        self.line = line
        self.what = what
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {what}")
