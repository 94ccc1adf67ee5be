"""One JSON line per replayed request, and turning records into the shared metrics' input.

Times are seconds since the replay's clock started (the arrival schedule's zero), so a
record file alone gives send times, TTFT, every token time and E2E. Failed requests are
records with ``status: "error"``, never left out.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from cascadia.errors import FileFormatError
from cascadia.jsonl import read_jsonl
from cascadia.metrics import RequestTimings, inter_token_latencies_s, tpot_s

OK, ERROR = "ok", "error"


class RecordsFormatError(FileFormatError):
    """A records file could not be read; the message is ``"<file>:<line>: <what is wrong>"``."""


@dataclass
class ReplayRecord:
    """What the client saw of one request. ``token_times_s``: when each chunk carrying
    text arrived; ``output_tokens``: the server's usage count when it sent one, else the
    number of such chunks; ``stage``/``stage_name``/``scores``: the answering stage and
    judge scores when the server says (Cascadia does), else None/[]."""

    index: int
    request_id: str
    scheduled_s: float
    input_tokens: int
    max_tokens: int
    send_s: float | None = None
    end_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None
    status: str = ERROR
    http_status: int | None = None
    error: str | None = None
    stage: int | None = None
    stage_name: str | None = None
    scores: list = field(default_factory=list)
    answer_score: float | None = None  # the server judge's score of the answer (Cascadia's judge_answer)
    logprob_sum: float | None = None  # of the answer's sampled tokens, when the server streamed them
    logprob_tokens: int = 0

    def judge_score(self) -> float | None:
        """The server judge's score of the answer, else the logprob judge's formula on the
        streamed logprobs (router.judges.logprob_score), else None."""
        if self.status != OK:
            return None
        if self.answer_score is not None:
            return float(self.answer_score)
        if self.logprob_sum is not None and self.logprob_tokens > 0:
            from router.judges import logprob_score

            return logprob_score([self.logprob_sum / self.logprob_tokens])
        return None

    @property
    def ttft_s(self) -> float | None:
        if self.status != OK or self.send_s is None or not self.token_times_s:
            return None
        return self.token_times_s[0] - self.send_s

    @property
    def e2e_s(self) -> float | None:
        if self.status != OK or self.send_s is None or self.end_s is None:
            return None
        return self.end_s - self.send_s

    def to_dict(self) -> dict:
        return asdict(self) | {"ttft_s": self.ttft_s, "e2e_s": self.e2e_s}


_REQUIRED = {"index": int, "request_id": str, "scheduled_s": (int, float), "input_tokens": int, "max_tokens": int,
             "status": str}


def record_from_dict(doc: object, path: Path, line: int) -> ReplayRecord:
    if not isinstance(doc, dict):
        raise RecordsFormatError(path, line, "expected a JSON object per line (a `cascadia replay` record)")
    for key, kind in _REQUIRED.items():
        if key not in doc:
            raise RecordsFormatError(path, line, f"missing field {key!r}: not a `cascadia replay` record")
        if not isinstance(doc[key], kind) or isinstance(doc[key], bool):
            raise RecordsFormatError(path, line, f"field {key!r} has the wrong type: {doc[key]!r}")
    if doc["status"] not in (OK, ERROR):
        raise RecordsFormatError(path, line, f"status must be {OK!r} or {ERROR!r}, got {doc['status']!r}")
    known = {f for f in ReplayRecord.__dataclass_fields__}
    rec = ReplayRecord(**{k: v for k, v in doc.items() if k in known})
    if rec.status == OK and (rec.send_s is None or rec.end_s is None):
        raise RecordsFormatError(path, line, "an ok record needs send_s and end_s")
    return rec


def read_records(path: str | Path) -> list[ReplayRecord]:
    path = Path(path)
    records = [record_from_dict(doc, path, line) for line, doc in read_jsonl(path, RecordsFormatError)]
    if not records:
        raise RecordsFormatError(path, None, "no records")
    return records


def write_records(records: Iterable[ReplayRecord], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec.to_dict(), separators=(",", ":")) + "\n")


def _nan(x: float | None) -> float:
    return math.nan if x is None else float(x)


def timings(records: Sequence[ReplayRecord]) -> RequestTimings:
    """The shared metrics' view of live records (see cascadia.metrics for definitions)."""
    ok = np.array([r.status == OK for r in records], dtype=bool)
    ttft = np.array([_nan(r.ttft_s) for r in records])
    e2e = np.array([_nan(r.e2e_s) for r in records])
    out = np.array([r.output_tokens for r in records], dtype=np.int64)
    # a failure ends when the client gave up on it; one that never got sent ends at its schedule
    ends = np.array([_nan(r.end_s if r.end_s is not None else r.send_s) for r in records])
    starts = np.array([r.send_s if r.send_s is not None else r.scheduled_s for r in records], dtype=np.float64)
    stage = np.array([-1 if r.stage is None else r.stage for r in records], dtype=np.int64)
    itl = inter_token_latencies_s(r.token_times_s for r in records if r.status == OK)
    return RequestTimings(start_s=starts, end_s=ends, ttft_s=ttft, tpot_s=tpot_s(e2e, ttft, out), e2e_s=e2e,
                          output_tokens=out, ok=ok, final_stage=stage, itl_s=itl)
