"""Paths of the traces that ship inside the package (see cascadia/data/traces/README.md)."""

from __future__ import annotations

from pathlib import Path

_DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "traces"

BUILTIN_TRACES: dict[str, str] = {
    "azure-conv": "azure_llm_2023_conv.csv",
    "azure-code": "azure_llm_2023_code.csv",
}


def builtin_trace_path(name: str) -> Path:
    """Path of a shipped trace by short name, e.g. ``"azure-conv"``."""
    if name not in BUILTIN_TRACES:
        raise KeyError(f"no built-in trace {name!r}; available: {sorted(BUILTIN_TRACES)}")
    return _DATA_DIR / BUILTIN_TRACES[name]
