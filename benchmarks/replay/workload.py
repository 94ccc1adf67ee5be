"""What to send and when: the arrival schedule (separate from the send loop) and the
request bodies' contents, built from a trace."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from benchmarks.replay.prompts import PromptSource
from cascadia.traces import Trace, poisson_arrivals


@dataclass(frozen=True)
class ReplayRequest:
    index: int
    scheduled_s: float  # since the replay's start
    prompt: str
    input_tokens: int  # as the prompt source counts the prompt
    max_tokens: int


def arrival_schedule(trace: Trace, rate_rps: float | None = None, burstiness: float = 1.0,
                     seed: int = 0) -> np.ndarray:
    """The trace's own (already time-scaled) arrival times, or a gamma renewal process at
    ``rate_rps`` (burstiness 1 = Poisson; see cascadia.traces.poisson_arrivals)."""
    if rate_rps is None:
        return np.asarray(trace.arrival_s, dtype=np.float64)
    return poisson_arrivals(len(trace), rate_rps, seed, burstiness)


def build_requests(trace: Trace, schedule_s: np.ndarray, prompts: PromptSource) -> list[ReplayRequest]:
    """One request per trace record: prompt of the traced input length (or a real prompt),
    max_tokens = the traced output length."""
    if len(schedule_s) != len(trace):
        raise ValueError(f"{len(schedule_s)} arrival times for {len(trace)} requests")
    out = []
    for i, (at, n_in, n_out) in enumerate(zip(schedule_s, trace.input_tokens, trace.output_tokens)):
        text = prompts.text(i, int(n_in))
        out.append(ReplayRequest(i, float(at), text, prompts.count(text), int(n_out)))
    return out
