"""The workload monitor: what live traffic looks like over a sliding window, and how far it
has drifted from what the running plan was made for.

`WorkloadMonitor` is fed by the server (one call when a cascade request arrives, one when
it finishes) and keeps the last ``window_s`` seconds of requests. Times are *plan
seconds*: wall seconds times ``time_scale`` (the simulated engines' time dilation in a dry
run, 1 otherwise), so window, hold time and the trace handed to the planner are on the
plan's clock.

A `WorkloadSample` summarises the window: arrival rate, prompt lengths (of every arrival),
answer lengths (finished requests', estimated for those in flight), the share of requests reaching each stage, each judged stage's
escalation rate and mean judge score. `drift_values` compares a sample with a `Baseline` -- the
plan's own workload summary and stage shares, plus the judge scores seen in the first full
window after the plan started serving (a plan carries no expectation in the live judge's
units); `shifts` keeps the signals beyond their thresholds. Pure functions over plain numbers;
the controller (router/replanner.py) decides what to do about it.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from cascadia.traces.trace import Trace


@dataclass
class _Request:
    arrival_s: float  # plan seconds
    input_tokens: int  # the first stage's prompt
    max_tokens: int
    output_tokens: int | None = None  # the answer's, once finished
    stage_index: int | None = None  # the answering stage, once finished
    scores: tuple[float, ...] = ()  # one per judged stage visited; NaN: the judge failed


@dataclass(frozen=True)
class WorkloadSample:
    """The window ending at ``t_s`` (plan seconds since the monitor started). Rate and prompt
    length are over every arrival in the window; answer length also counts those in flight
    (estimated, `_answer_tokens`); stage figures are over the finished ones (0 / empty when
    none)."""

    t_s: float
    window_s: float  # the part of the window the monitor has seen (shorter at start)
    arrivals: int
    finished: int
    rate_rps: float
    input_tokens_mean: float
    output_tokens_mean: float
    stage_shares: tuple[float, ...]  # share of finished requests that reached stage i (stage 0: 1.0)
    escalation_rates: tuple[float, ...]  # per judged stage: escalated / judged there (NaN: none judged)
    score_means: tuple[float, ...]  # per judged stage: mean finite judge score (NaN: none)


@dataclass(frozen=True)
class Baseline:
    """What the running plan expects: its planning workload and stage shares, and the mean
    judge score per judged stage seen in the first full window it served (None until then)."""

    rate_rps: float
    input_tokens_mean: float
    output_tokens_mean: float
    stage_shares: tuple[float, ...]
    score_means: tuple[float, ...] | None = None

    @classmethod
    def of_plan(cls, plan) -> "Baseline":
        w = plan.workload
        return cls(w.mean_rate_rps, w.input_tokens_mean, w.output_tokens_mean, tuple(plan.stage_shares))

    @classmethod
    def of_sample(cls, sample: WorkloadSample) -> "Baseline":
        """The live window as the new normal (after a re-plan evaluation kept the plan)."""
        return cls(sample.rate_rps, sample.input_tokens_mean, sample.output_tokens_mean, sample.stage_shares,
                   sample.score_means)


@dataclass(frozen=True)
class DriftThresholds:
    """How far a signal may move before it counts as a shift. Relative for rate and mean
    lengths (0.5: up by half or down to two thirds -- see `_relative`), absolute for stage
    shares (fraction of requests) and judge scores (points on 0-100)."""

    rate: float = 0.5
    input_length: float = 0.5
    output_length: float = 0.5
    stage_share: float = 0.2
    judge_score: float = 10.0

    def __post_init__(self) -> None:
        for name in ("rate", "input_length", "output_length", "stage_share", "judge_score"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"drift threshold {name} must be a positive number, got {value}")


def _relative(now: float, before: float) -> float:
    """Symmetric relative change: max(now/before, before/now) - 1, so halving and doubling
    both read 1.0 (a plain (now-before)/before would treat a drop of 2/3 as smaller than a
    rise of 1.0). 0 when both are 0; inf when only one is."""
    if before <= 0 or now <= 0:
        return 0.0 if before <= 0 and now <= 0 else math.inf
    return max(now / before, before / now) - 1.0


def drift_values(sample: WorkloadSample, baseline: Baseline) -> dict[str, float]:
    """How far each signal is from the baseline: relative (`_relative`) for the rate and the
    mean lengths, absolute for the share reaching each later stage and each judged stage's
    mean score. Signals that need finished requests (output length, shares, scores) are
    left out of a window with none; scores until the baseline has them."""
    out = {"rate": _relative(sample.rate_rps, baseline.rate_rps)}
    if sample.arrivals:
        out["input_length"] = _relative(sample.input_tokens_mean, baseline.input_tokens_mean)
    if sample.finished:
        out["output_length"] = _relative(sample.output_tokens_mean, baseline.output_tokens_mean)
        for i, (now, before) in enumerate(zip(sample.stage_shares[1:], baseline.stage_shares[1:]), start=1):
            out[f"stage_share_{i}"] = abs(now - before)
        if baseline.score_means is not None:
            for i, (now, before) in enumerate(zip(sample.score_means, baseline.score_means)):
                if math.isfinite(now) and math.isfinite(before):
                    out[f"judge_score_{i}"] = abs(now - before)
    return out


def shifts(values: dict[str, float], limits: DriftThresholds) -> dict[str, float]:
    """The signals of `drift_values` beyond their limits."""
    def limit(name: str) -> float:
        if name.startswith("stage_share_"):
            return limits.stage_share
        if name.startswith("judge_score_"):
            return limits.judge_score
        return getattr(limits, name)

    return {k: v for k, v in values.items() if v > limit(k)}


def _answer_tokens(requests: Sequence[_Request]) -> list[int]:
    """Each request's answer tokens: its own once finished; while in flight, its max_tokens
    times the median answer/max_tokens ratio of the finished ones. Finished requests alone
    would be biased short: in a window, the long answers are the ones still running."""
    done = [r for r in requests if r.output_tokens is not None]
    ratio = float(np.median([r.output_tokens / max(1, r.max_tokens) for r in done])) if done else 1.0
    return [r.output_tokens if r.output_tokens is not None else max(1, round(ratio * r.max_tokens)) for r in requests]


@dataclass
class WorkloadMonitor:
    """Sliding window over the cascade's live requests (see the module docstring).
    ``max_requests`` bounds memory whatever the rate: the oldest records go first."""

    n_stages: int
    window_s: float = 60.0
    time_scale: float = 1.0
    clock: Callable[[], float] = time.monotonic
    max_requests: int = 100_000
    _t0: float = field(init=False)
    _requests: OrderedDict = field(init=False)  # request id -> _Request, in arrival order

    def __post_init__(self) -> None:
        if not self.window_s > 0:
            raise ValueError(f"window_s must be > 0, got {self.window_s}")
        if not self.time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {self.time_scale}")
        self._t0 = self.clock()
        self._requests = OrderedDict()

    def now(self) -> float:
        """Plan seconds since the monitor started."""
        return (self.clock() - self._t0) * self.time_scale

    def arrived(self, request_id: str, input_tokens: int, max_tokens: int) -> None:
        self._requests[request_id] = _Request(self.now(), int(input_tokens), int(max_tokens))
        while len(self._requests) > self.max_requests:
            self._requests.popitem(last=False)

    def finished(self, request_id: str, result) -> None:
        """``result``: the request's `router.cascade.CascadeResult`."""
        rec = self._requests.get(request_id)
        if rec is None:  # arrived before the monitor started, or already out of the window
            return
        rec.output_tokens = int(result.usage.completion_tokens)
        rec.stage_index = int(result.stage_index)
        rec.scores = tuple(v.score for v in result.visits if v.score is not None)

    def _window(self) -> tuple[float, float, list[_Request]]:
        now = self.now()
        start = now - self.window_s
        while self._requests:
            first = next(iter(self._requests.values()))
            if first.arrival_s > start:  # the window is (now - window_s, now]
                break
            self._requests.popitem(last=False)
        return now, min(self.window_s, now), list(self._requests.values())

    def sample(self) -> WorkloadSample:
        now, span, arrived = self._window()
        done = [r for r in arrived if r.stage_index is not None]
        reach = [sum(1 for r in done if r.stage_index >= i) / len(done) if done else (1.0 if i == 0 else 0.0)
                 for i in range(self.n_stages)]
        esc, means = [], []
        for i in range(self.n_stages - 1):
            judged = [r for r in done if len(r.scores) > i]
            esc.append(sum(1 for r in judged if r.stage_index > i) / len(judged) if judged else math.nan)
            finite = [r.scores[i] for r in judged if math.isfinite(r.scores[i])]
            means.append(float(np.mean(finite)) if finite else math.nan)
        return WorkloadSample(
            t_s=now, window_s=span, arrivals=len(arrived), finished=len(done),
            rate_rps=len(arrived) / span if span > 0 else 0.0,
            input_tokens_mean=float(np.mean([r.input_tokens for r in arrived])) if arrived else 0.0,
            output_tokens_mean=float(np.mean(_answer_tokens(arrived))) if done else 0.0,
            stage_shares=tuple(reach), escalation_rates=tuple(esc), score_means=tuple(means))

    def scores(self, stage: int) -> list[float]:
        """The finite judge scores stage ``stage`` gave in the window (for re-deriving a
        threshold from live scores)."""
        _, _, arrived = self._window()
        return [r.scores[stage] for r in arrived if len(r.scores) > stage and math.isfinite(r.scores[stage])]

    def recent_trace(self, name: str = "live window", horizon_s: float | None = None) -> Trace:
        """Every request that arrived in the window, as a trace for the planner: arrivals in
        plan seconds from the first, the first stage's prompt tokens, and the
        answer's tokens (in flight: estimated, see `_answer_tokens` -- under overload many
        are, and a backlog must not be left out of the load the planner sizes for).

        ``horizon_s``: the window repeated back to back until it covers that long. The
        planner predicts a plan's p95 by simulating the trace it is given; over a window of
        a few seconds even an overrun plan barely builds a queue, so a short window makes a
        plan that cannot keep up look fine. Repeating it asks the question re-planning is
        about: how does each plan do if the shifted workload goes on?"""
        _, _, arrived = self._window()
        done = sum(1 for r in arrived if r.output_tokens is not None)
        first = arrived[0].arrival_s if arrived else 0.0
        arrival = np.array([r.arrival_s - first for r in arrived], dtype=np.float64)
        inputs = np.array([max(1, r.input_tokens) for r in arrived], dtype=np.int64)
        outputs = np.array(_answer_tokens(arrived), dtype=np.int64)
        copies = max(1, math.ceil(horizon_s / self.window_s)) if horizon_s else 1
        notes = [f"{len(arrived)} requests of the last {self.window_s:g} s of live traffic, "
                 f"{len(arrived) - done} still in flight (answer length estimated)"]
        if copies > 1:
            notes.append(f"repeated {copies} times to cover {copies * self.window_s:g} s")
        return Trace(name, np.concatenate([arrival + k * self.window_s for k in range(copies)]),
                     np.tile(inputs, copies), np.tile(outputs, copies), notes=tuple(notes))


def describe_drift(signals: dict[str, float]) -> str:
    """One line for the log, e.g. 'rate 2.90x, stage_share_1 +0.25, judge_score_0 12.0 points'."""
    parts = []
    for k, v in signals.items():
        if k in ("rate", "input_length", "output_length"):
            parts.append(f"{k} {v + 1:.2f}x")
        elif k.startswith("stage_share"):
            parts.append(f"{k} {v:+.2f}")
        else:
            parts.append(f"{k} {v:.1f} points")
    return ", ".join(parts) or "none"
