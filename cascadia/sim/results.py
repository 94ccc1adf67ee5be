"""What a simulation returns: per-request latencies and the aggregates users compare."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cascadia.metrics import RequestTimings, percentiles
from cascadia.traces import Trace


@dataclass(frozen=True)
class SimResult:
    arrival_s: np.ndarray
    ttft_s: np.ndarray  # to the first token the client sees (held output waits for the judge)
    tpot_s: np.ndarray  # mean gap between output tokens of the answering stage
    e2e_s: np.ndarray
    final_stage: np.ndarray
    input_tokens: np.ndarray
    output_tokens: np.ndarray
    preemptions: np.ndarray
    stage_shares: np.ndarray  # fraction of requests visiting each stage
    stage_utilisation: np.ndarray  # mean busy fraction of the stage's engines
    engine_names: tuple[str, ...]
    engine_busy_s: np.ndarray
    makespan_s: float
    iterations: int
    events: int
    prefix_hit_tokens: int
    n_unfinished: int  # rejected (longer than a replica's KV cache) or never completed
    n_rejected: int
    wall_s: float

    @classmethod
    def build(cls, *, trace: Trace, visits, n_stages, stage_start, stage_first, stage_finish, stage_released,
              preempted, rejected, engine_names, engine_busy_s, engine_stage, iterations, events, prefix_hit_tokens,
              wall_s) -> "SimResult":
        n = len(trace)
        idx = np.arange(n)
        final = visits - 1
        first = stage_first[idx, final]
        finish = stage_finish[idx, final]
        held = final < n_stages - 1  # answered by a judged stage: released after the judge
        release = np.where(held, stage_released[idx, final], finish)
        arrival = trace.arrival_s.astype(np.float64)
        ttft = np.where(held, release, first) - arrival
        e2e = release - arrival
        out = trace.output_tokens.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            tpot = np.where(out > 1, (finish - first) / np.maximum(out - 1, 1), 0.0)
        unfinished = int(np.count_nonzero(~np.isfinite(e2e)))
        end = np.nanmax(release) if n and unfinished < n else 0.0
        makespan = float(end - (arrival.min() if n else 0.0))
        shares = np.array([(visits > s).mean() if n else 0.0 for s in range(n_stages)])
        util = np.array([
            engine_busy_s[engine_stage == s].mean() / makespan if makespan > 0 and np.any(engine_stage == s) else 0.0
            for s in range(n_stages)
        ])
        return cls(arrival, ttft, tpot, e2e, final, trace.input_tokens.copy(), trace.output_tokens.copy(),
                   preempted, shares, util, tuple(engine_names), engine_busy_s, makespan, iterations, events,
                   prefix_hit_tokens, unfinished, int(rejected.sum()), wall_s)

    @property
    def n_requests(self) -> int:
        return len(self.arrival_s)

    def timings(self) -> RequestTimings:
        """Per-request timings for the shared metrics (cascadia.metrics); no token times."""
        ok = np.isfinite(self.e2e_s)
        return RequestTimings(start_s=self.arrival_s, end_s=np.where(ok, self.arrival_s + self.e2e_s, np.nan),
                              ttft_s=np.where(ok, self.ttft_s, np.nan),
                              tpot_s=np.where(ok & (self.output_tokens > 1), self.tpot_s, np.nan),
                              e2e_s=self.e2e_s, output_tokens=self.output_tokens, ok=ok,
                              final_stage=self.final_stage)

    def throughput_rps(self) -> float:
        return (self.n_requests - self.n_unfinished) / self.makespan_s if self.makespan_s > 0 else 0.0

    def output_tokens_per_s(self) -> float:
        ok = np.isfinite(self.e2e_s)
        return float(self.output_tokens[ok].sum() / self.makespan_s) if self.makespan_s > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.n_requests,
            "unfinished": self.n_unfinished,
            "rejected": self.n_rejected,
            "makespan_s": self.makespan_s,
            "throughput_rps": self.throughput_rps(),
            "output_tokens_per_s": self.output_tokens_per_s(),
            "ttft_s": percentiles(self.ttft_s),
            "tpot_s": percentiles(self.tpot_s[self.output_tokens > 1]),
            "e2e_s": percentiles(self.e2e_s),
            "stage_shares": self.stage_shares.tolist(),
            "stage_utilisation": self.stage_utilisation.tolist(),
            "preemptions": int(self.preemptions.sum()),
            "prefix_hit_tokens": self.prefix_hit_tokens,
            "iterations": self.iterations,
            "events": self.events,
            "sim_wall_s": self.wall_s,
            "sim_requests_per_wall_s": self.n_requests / self.wall_s if self.wall_s > 0 else float("inf"),
        }
