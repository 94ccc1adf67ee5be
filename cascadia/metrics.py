"""Latency and SLO metrics: pure functions of per-request timings, shared by simulated
results (cascadia.sim.results) and live replay records (benchmarks.replay).

Definitions (times in seconds; percentiles by numpy's linear interpolation, as vLLM's
benchmark client computes them):

- **TTFT**: first output token received - request sent. Undefined (NaN) for a failed
  request and for one that finished with no output token.
- **TPOT**: (E2E - TTFT) / (output tokens - 1), the mean gap after the first token;
  undefined for fewer than 2 output tokens.
- **ITL**: every gap between consecutive output tokens, pooled over requests (a chunk
  that carries several tokens counts as one arrival: what the client saw).
- **E2E**: last byte of the answer - request sent; +inf for a failed request. Latency
  percentiles cover completed requests; failures are counted, and count as misses for
  every SLO.
- **Throughput**: completed requests (and their output tokens) per second of the run's
  span, from the first send to the last answer or failure.
- **SLO attainment** (absolute SLOs): share of *all* requests that completed within every
  given bound (TTFT, TPOT, E2E). A completed request without a first token is held to the
  TTFT bound by its E2E (it waited that long for anything); one with < 2 tokens meets any
  TPOT bound. **Goodput**: such requests per second of the span.
- **Relative deadlines**: request i meets scale s when ``e2e_i <= s * unloaded_i``, its
  latency served alone; the **minimum SLO scale** is the smallest s with >= 95% of the
  requests meeting it (paper's metric).
- **Stage shares**: fraction of requests that visited stage k (answered at stage >= k,
  the planner's ``stage_shares``), and fraction answered at stage k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

ATTAINMENT = 0.95
PERCENTILES = (50, 90, 95, 99)


def percentiles(x: np.ndarray, qs: Sequence[int] = PERCENTILES) -> dict[str, float]:
    """mean and p<q> of the finite values of ``x``; NaN for all when there are none."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return {f"p{q}": float("nan") for q in qs} | {"mean": float("nan")}
    out = {f"p{q}": float(np.percentile(x, q)) for q in qs}
    out["mean"] = float(x.mean())
    return out


def tpot_s(e2e_s: np.ndarray, ttft_s: np.ndarray, output_tokens: np.ndarray) -> np.ndarray:
    """(e2e - ttft) / (n - 1) per request; NaN where n < 2 or either time is undefined."""
    e2e = np.asarray(e2e_s, dtype=np.float64)
    ttft = np.asarray(ttft_s, dtype=np.float64)
    n = np.asarray(output_tokens, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (e2e - ttft) / (n - 1.0)
    return np.where((n >= 2) & np.isfinite(out), out, np.nan)


def inter_token_latencies_s(token_times_s: Iterable[Sequence[float]]) -> np.ndarray:
    """All consecutive gaps of every request's token arrival times, pooled."""
    gaps = [np.diff(np.asarray(t, dtype=np.float64)) for t in token_times_s if len(t) >= 2]
    return np.concatenate(gaps) if gaps else np.zeros(0)


@dataclass(frozen=True)
class SLO:
    """Absolute per-request bounds in seconds; None: not constrained."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tpot_s", "e2e_s"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ValueError(f"SLO {name} must be a positive number of seconds, got {v}")

    @property
    def empty(self) -> bool:
        return self.ttft_s is None and self.tpot_s is None and self.e2e_s is None

    def scaled(self, factor: float) -> "SLO":
        f = lambda v: None if v is None else v * factor  # noqa: E731
        return SLO(f(self.ttft_s), f(self.tpot_s), f(self.e2e_s))

    def describe(self) -> str:
        parts = [f"{k} {v * 1e3:g} ms" for k, v in (("TTFT", self.ttft_s), ("TPOT", self.tpot_s),
                                                      ("E2E", self.e2e_s)) if v is not None]
        return ", ".join(parts) or "none"


# eq=False: numpy arrays have no single truth value, so generated __eq__ would raise.
@dataclass(frozen=True, eq=False)
class RequestTimings:
    """Per-request timings of one run, live or simulated, in request order.

    ``start_s``: when each request was sent (simulated: its arrival); ``end_s``: when its
    answer completed or it failed (NaN when never known, e.g. a simulated request that was
    never finished). ``ok``: completed. ``final_stage``: the stage that answered, -1 when
    unknown. ``itl_s``: pooled inter-token gaps, empty when token times were not kept.
    """

    start_s: np.ndarray
    end_s: np.ndarray
    ttft_s: np.ndarray
    tpot_s: np.ndarray
    e2e_s: np.ndarray
    output_tokens: np.ndarray
    ok: np.ndarray
    final_stage: np.ndarray
    itl_s: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __post_init__(self) -> None:
        n = len(np.asarray(self.start_s).reshape(-1))
        conv = {"start_s": np.float64, "end_s": np.float64, "ttft_s": np.float64, "tpot_s": np.float64,
                "e2e_s": np.float64, "output_tokens": np.int64, "ok": bool, "final_stage": np.int64}
        for name, dtype in conv.items():
            arr = np.array(getattr(self, name), dtype=dtype, copy=True).reshape(-1)
            if arr.shape[0] != n:
                raise ValueError(f"RequestTimings.{name} has {arr.shape[0]} values for {n} requests")
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        e2e = np.where(self.ok, self.e2e_s, np.inf)  # a failure never has a latency
        e2e.setflags(write=False)
        object.__setattr__(self, "e2e_s", e2e)
        itl = np.array(self.itl_s, dtype=np.float64, copy=True).reshape(-1)
        itl.setflags(write=False)
        object.__setattr__(self, "itl_s", itl)

    def __len__(self) -> int:
        return int(self.start_s.shape[0])

    @property
    def n_failed(self) -> int:
        return int(np.count_nonzero(~self.ok))


def span_s(t: RequestTimings) -> float:
    """From the first send to the last known end (0.0 when nothing is known)."""
    if len(t) == 0:
        return 0.0
    ends = t.end_s[np.isfinite(t.end_s)]
    if ends.size == 0:
        return 0.0
    return float(max(ends.max() - t.start_s.min(), 0.0))


def throughput(t: RequestTimings) -> dict[str, float]:
    """Completed requests and output tokens per second of the span (0 for an empty span)."""
    span = span_s(t)
    if span <= 0:
        return {"requests_per_s": 0.0, "output_tokens_per_s": 0.0}
    return {"requests_per_s": float(np.count_nonzero(t.ok)) / span,
            "output_tokens_per_s": float(t.output_tokens[t.ok].sum()) / span}


def meets_slo(t: RequestTimings, slo: SLO) -> np.ndarray:
    """Per request: completed and within every bound of ``slo`` (see the module docstring)."""
    ok = t.ok.copy()
    if slo.ttft_s is not None:
        ttft = np.where(np.isfinite(t.ttft_s), t.ttft_s, t.e2e_s)
        ok &= ttft <= slo.ttft_s
    if slo.tpot_s is not None:
        ok &= ~(t.tpot_s > slo.tpot_s)  # NaN (fewer than 2 tokens) compares False: met
    if slo.e2e_s is not None:
        ok &= t.e2e_s <= slo.e2e_s
    return ok


def slo_attainment_abs(t: RequestTimings, slo: SLO) -> float:
    """Share of all requests meeting ``slo`` (1.0 for no requests)."""
    return float(meets_slo(t, slo).mean()) if len(t) else 1.0


def goodput_rps(t: RequestTimings, slo: SLO) -> float:
    """Requests meeting ``slo`` per second of the span."""
    span = span_s(t)
    return float(np.count_nonzero(meets_slo(t, slo))) / span if span > 0 else 0.0


def slowdowns(e2e_s: np.ndarray, unloaded_s: np.ndarray) -> np.ndarray:
    """e2e / unloaded per request; inf for an unfinished request."""
    e2e = np.asarray(e2e_s, dtype=np.float64)
    base = np.asarray(unloaded_s, dtype=np.float64)
    if e2e.shape != base.shape:
        raise ValueError(f"{e2e.shape[0]} latencies for {base.shape[0]} deadlines")
    if np.any(~np.isfinite(base)) or np.any(base <= 0):
        raise ValueError("unloaded latencies must be finite and positive")
    return np.where(np.isfinite(e2e), e2e / base, np.inf)


def slo_attainment(e2e_s: np.ndarray, unloaded_s: np.ndarray, scale: float) -> float:
    """Fraction of requests whose e2e latency is within ``scale`` x their unloaded latency."""
    ratio = slowdowns(e2e_s, unloaded_s)
    return float(np.mean(ratio <= scale)) if ratio.size else 1.0


def attainment_curve(e2e_s: np.ndarray, unloaded_s: np.ndarray, scales: Sequence[float]) -> np.ndarray:
    """slo_attainment at every scale of ``scales``."""
    ratio = slowdowns(e2e_s, unloaded_s)
    if ratio.size == 0:
        return np.ones(len(scales))
    return np.array([float(np.mean(ratio <= s)) for s in scales])


def min_slo_scale(e2e_s: np.ndarray, unloaded_s: np.ndarray, attainment: float = ATTAINMENT) -> float:
    """The smallest s with slo_attainment(s) >= attainment: the k-th smallest slowdown,
    k = ceil(attainment * n) (inf when that request is unfinished)."""
    ratio = np.sort(slowdowns(e2e_s, unloaded_s))
    if ratio.size == 0:
        return 0.0
    k = math.ceil(attainment * ratio.size - 1e-9)
    return float(ratio[max(k, 1) - 1])


def stage_shares(final_stage: np.ndarray, n_stages: int) -> tuple[np.ndarray, np.ndarray]:
    """(visited, answered): per stage k, the fraction of requests that reached stage k
    (answered at >= k) and the fraction answered at k. Requests with an unknown stage
    (-1) are left out; both are zeros when none is known."""
    stages = np.asarray(final_stage, dtype=np.int64)
    known = stages[stages >= 0]
    if known.size == 0 or n_stages < 1:
        return np.zeros(max(n_stages, 0)), np.zeros(max(n_stages, 0))
    visited = np.array([np.mean(known >= k) for k in range(n_stages)])
    answered = np.array([np.mean(known == k) for k in range(n_stages)])
    return visited, answered


def summarize(t: RequestTimings, slo: SLO | None = None, unloaded_s: np.ndarray | None = None,
              attainment: float = ATTAINMENT) -> dict:
    """Every metric of the module docstring as one plain dict (seconds; NaN = n/a)."""
    n_stages = int(t.final_stage.max()) + 1 if len(t) and t.final_stage.max() >= 0 else 0
    visited, answered = stage_shares(t.final_stage, n_stages)
    out = {
        "requests": len(t),
        "completed": int(np.count_nonzero(t.ok)),
        "failed": t.n_failed,
        "span_s": span_s(t),
        **throughput(t),
        "ttft_s": percentiles(t.ttft_s[t.ok]),
        "tpot_s": percentiles(t.tpot_s[t.ok]),
        "itl_s": percentiles(t.itl_s),
        "e2e_s": percentiles(t.e2e_s[t.ok]),
        "stage_visited_shares": visited.tolist(),
        "stage_answered_shares": answered.tolist(),
    }
    if slo is not None and not slo.empty:
        out["slo"] = {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s, "e2e_s": slo.e2e_s}
        out["slo_attainment"] = slo_attainment_abs(t, slo)
        out["goodput_rps"] = goodput_rps(t, slo)
    if unloaded_s is not None:
        out["min_slo_scale"] = min_slo_scale(t.e2e_s, unloaded_s, attainment)
    return out
