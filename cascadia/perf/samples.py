"""Measured engine iterations: what profiling produces and calibration consumes.

Kept apart from both the profiler (which needs a real engine) and the performance model
(which must not know how numbers were measured), so each side can change alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable


@dataclass(frozen=True)
class IterationSample:
    """One engine iteration whose batch shape is known and whose wall time was measured.

    prefill_chunks: (chunk_tokens, context_tokens_before_chunk) for every sequence that
        prefills in this iteration (chunked prefill may split a prompt over iterations).
    decode_context_tokens: for every sequence that decodes one token in this iteration,
        the tokens already in its KV cache (prompt + tokens generated so far).
    """

    prefill_chunks: tuple[tuple[int, int], ...]
    decode_context_tokens: tuple[int, ...]
    measured_s: float
    label: str = ""

    @property
    def prefill_tokens(self) -> int:
        return sum(c for c, _ in self.prefill_chunks)

    @property
    def n_decode(self) -> int:
        return len(self.decode_context_tokens)

    def to_dict(self) -> dict:
        return {
            "prefill_chunks": [list(c) for c in self.prefill_chunks],
            "decode_context_tokens": list(self.decode_context_tokens),
            "measured_s": self.measured_s,
            "label": self.label,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "IterationSample":
        return cls(
            prefill_chunks=tuple((int(a), int(b)) for a, b in d["prefill_chunks"]),
            decode_context_tokens=tuple(int(x) for x in d["decode_context_tokens"]),
            measured_s=float(d["measured_s"]),
            label=str(d.get("label", "")),
        )


@dataclass(frozen=True)
class ProfileRun:
    """Samples from one profiling run plus the engine settings they were taken under."""

    model: str
    device: str
    engine_config: dict = field(default_factory=dict)
    samples: tuple[IterationSample, ...] = ()

    def save(self, path: str | Path) -> None:
        doc = {
            "model": self.model,
            "device": self.device,
            "engine_config": self.engine_config,
            "samples": [s.to_dict() for s in self.samples],
        }
        Path(path).write_text(json.dumps(doc, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "ProfileRun":
        doc = json.loads(Path(path).read_text())
        return cls(
            model=doc["model"],
            device=doc["device"],
            engine_config=dict(doc.get("engine_config", {})),
            samples=tuple(IterationSample.from_dict(s) for s in doc["samples"]),
        )


def split_by_label(samples: Iterable[IterationSample], held_out_prefix: str) -> tuple[list, list]:
    """Split samples into (fit, held_out) by label prefix: evaluation shapes stay unseen."""
    fit, held = [], []
    for s in samples:
        (held if s.label.startswith(held_out_prefix) else fit).append(s)
    return fit, held
