"""The `Trace` record and the pure functions that reshape one (window, scaling, summary).

A trace is what a benchmark replays and what the planner sizes a deployment for: when
each request arrives and how many tokens go in and come out. Arrival times are kept
relative to the first request so that windows and rescaled traces compose without
anyone having to remember an epoch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cascadia.errors import FileFormatError


class TraceFormatError(FileFormatError):
    """A trace file could not be read; the message is ``"<file>:<line>: <what is wrong>"``."""


def _frozen_array(values: Any, dtype: Any) -> np.ndarray:
    # Copy so that freezing never flips the flag on an array the caller still owns.
    arr = np.array(values, dtype=dtype, copy=True)
    arr.setflags(write=False)
    return arr


# eq=False: numpy arrays have no single truth value, so generated __eq__ would raise.
@dataclass(frozen=True, eq=False)
class Trace:
    """Requests of one workload, in arrival order.

    ``n_dropped`` counts source records that were read but not turned into requests
    (e.g. BurstGPT failures with 0 response tokens); ``notes`` says why, so that no
    loss is silent.
    """

    name: str
    arrival_s: np.ndarray
    input_tokens: np.ndarray
    output_tokens: np.ndarray
    prompts: tuple[str, ...] | None = None
    hash_ids: tuple[tuple[int, ...], ...] | None = None
    hash_block_tokens: int = 512
    n_dropped: int = 0
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        arrival = _frozen_array(self.arrival_s, np.float64).reshape(-1)
        inputs = _frozen_array(self.input_tokens, np.int64).reshape(-1)
        outputs = _frozen_array(self.output_tokens, np.int64).reshape(-1)
        n = arrival.shape[0]
        if inputs.shape[0] != n or outputs.shape[0] != n:
            raise ValueError(
                f"trace {self.name!r}: arrival_s, input_tokens and output_tokens differ in "
                f"length ({n}, {inputs.shape[0]}, {outputs.shape[0]})"
            )
        if n:
            if not np.all(np.isfinite(arrival)):
                raise ValueError(f"trace {self.name!r}: arrival_s has non-finite values")
            if arrival[0] != 0.0:
                raise ValueError(
                    f"trace {self.name!r}: arrival_s must start at 0.0 (got {arrival[0]}); "
                    "times are relative to the first request"
                )
            if np.any(np.diff(arrival) < 0):
                raise ValueError(f"trace {self.name!r}: arrival_s must be non-decreasing")
            if inputs.min() < 1 or outputs.min() < 1:
                raise ValueError(f"trace {self.name!r}: token counts must be >= 1")
        if self.prompts is not None and len(self.prompts) != n:
            raise ValueError(f"trace {self.name!r}: {len(self.prompts)} prompts for {n} requests")
        if self.hash_ids is not None and len(self.hash_ids) != n:
            raise ValueError(f"trace {self.name!r}: {len(self.hash_ids)} hash lists for {n} requests")
        if self.hash_block_tokens < 1:
            raise ValueError(f"trace {self.name!r}: hash_block_tokens must be >= 1")
        object.__setattr__(self, "arrival_s", arrival)
        object.__setattr__(self, "input_tokens", inputs)
        object.__setattr__(self, "output_tokens", outputs)
        if self.prompts is not None:
            object.__setattr__(self, "prompts", tuple(self.prompts))
        if self.hash_ids is not None:
            object.__setattr__(self, "hash_ids", tuple(tuple(h) for h in self.hash_ids))
        object.__setattr__(self, "notes", tuple(self.notes))

    def __len__(self) -> int:
        return int(self.arrival_s.shape[0])

    @property
    def duration_s(self) -> float:
        """Time from the first to the last arrival (0.0 for fewer than two requests)."""
        return float(self.arrival_s[-1]) if len(self) else 0.0

    @property
    def mean_rate_rps(self) -> float:
        """(n - 1) / duration_s: the inverse of the mean inter-arrival gap.

        n - 1 rather than n because n arrivals span n - 1 gaps; with this definition a
        Poisson process at rate r gives mean_rate_rps ~= r and scale_rate is exact.
        0.0 for fewer than two requests, inf when they all arrive at once.
        """
        n = len(self)
        if n < 2:
            return 0.0
        duration = self.duration_s
        return float("inf") if duration == 0.0 else (n - 1) / duration

    def select(self, idx: Any) -> "Trace":
        """The requests at ``idx`` (index array, boolean mask or slice), re-based to 0.

        Index arrays are taken in the order given but must keep arrivals non-decreasing.
        """
        if isinstance(idx, slice):
            positions = np.arange(len(self))[idx]
        else:
            positions = np.asarray(idx)
            if positions.dtype == bool:
                positions = np.flatnonzero(positions)
            positions = positions.astype(np.int64, copy=False).reshape(-1)
        arrival = self.arrival_s[positions]
        if arrival.size:
            arrival = arrival - arrival[0]
        return dataclasses.replace(
            self,
            arrival_s=arrival,
            input_tokens=self.input_tokens[positions],
            output_tokens=self.output_tokens[positions],
            prompts=None if self.prompts is None else tuple(self.prompts[i] for i in positions),
            hash_ids=None if self.hash_ids is None else tuple(self.hash_ids[i] for i in positions),
        )


def window(trace: Trace, start_s: float, end_s: float) -> Trace:
    """Requests with ``start_s <= arrival < end_s``, re-based so the first one is at 0."""
    if end_s < start_s:
        raise ValueError(f"window end {end_s} is before its start {start_s}")
    # The arrivals are sorted, so two binary searches find the half-open range.
    lo = int(np.searchsorted(trace.arrival_s, start_s, side="left"))
    hi = int(np.searchsorted(trace.arrival_s, end_s, side="left"))
    return trace.select(slice(lo, hi))


def scale_time(trace: Trace, factor: float) -> Trace:
    """Multiply every arrival time by ``factor`` (> 1 slows the trace down)."""
    if not np.isfinite(factor) or factor <= 0:
        raise ValueError(f"time scale factor must be a positive number, got {factor}")
    return dataclasses.replace(trace, arrival_s=trace.arrival_s * factor)


def scale_rate(trace: Trace, rate_rps: float) -> Trace:
    """Stretch or compress arrivals so that ``mean_rate_rps == rate_rps``.

    The shape of the arrival process (bursts, diurnal drift) is kept; only the clock
    runs faster or slower.
    """
    if not np.isfinite(rate_rps) or rate_rps <= 0:
        raise ValueError(f"rate must be a positive number of requests/s, got {rate_rps}")
    current = trace.mean_rate_rps
    if len(trace) < 2 or not np.isfinite(current):
        raise ValueError(
            f"trace {trace.name!r} has no measurable rate ({len(trace)} requests over "
            f"{trace.duration_s} s), so it cannot be rescaled to {rate_rps} req/s"
        )
    return scale_time(trace, current / rate_rps)


def scale_lengths(
    trace: Trace,
    factor: float,
    *,
    max_input: int | None = None,
    max_output: int | None = None,
) -> Trace:
    """Multiply token counts by ``factor``, round half up, keep >= 1, then clip to the maxima.

    Half-up rounding (not numpy's round-half-to-even) so that 2.5 tokens becomes 3 as a
    reader would expect.
    """
    if not np.isfinite(factor) or factor <= 0:
        raise ValueError(f"length scale factor must be a positive number, got {factor}")
    for label, cap in (("max_input", max_input), ("max_output", max_output)):
        if cap is not None and cap < 1:
            raise ValueError(f"{label} must be >= 1, got {cap}")

    def _scaled(tokens: np.ndarray, cap: int | None) -> np.ndarray:
        out = np.maximum(np.floor(tokens * float(factor) + 0.5).astype(np.int64), 1)
        return out if cap is None else np.minimum(out, cap)

    return dataclasses.replace(
        trace,
        input_tokens=_scaled(trace.input_tokens, max_input),
        output_tokens=_scaled(trace.output_tokens, max_output),
    )


def poisson_arrivals(n: int, rate_rps: float, seed: int, burstiness: float = 1.0) -> np.ndarray:
    """``n`` arrival times (first at 0.0) of a gamma renewal process with mean rate ``rate_rps``.

    Gaps are Gamma(shape=burstiness, scale=1 / (rate_rps * burstiness)): their mean is
    always 1 / rate_rps and their coefficient of variation is 1 / sqrt(burstiness).
    burstiness = 1 is a Poisson process; < 1 is burstier, > 1 more regular (the same
    definition as vLLM's benchmark client, so numbers are comparable).
    """
    if n < 0:
        raise ValueError(f"number of arrivals must be >= 0, got {n}")
    if not np.isfinite(rate_rps) or rate_rps <= 0:
        raise ValueError(f"rate must be a positive number of requests/s, got {rate_rps}")
    if not np.isfinite(burstiness) or burstiness <= 0:
        raise ValueError(f"burstiness must be a positive number, got {burstiness}")
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate_rps * burstiness), size=max(n - 1, 0))
    return np.concatenate([np.zeros(min(n, 1)), np.cumsum(gaps)]).astype(np.float64)


@dataclass(frozen=True)
class TraceSummary:
    """Size and shape of a trace; token statistics are 0.0 for an empty trace."""

    name: str
    n_requests: int
    n_dropped: int
    duration_s: float
    mean_rate_rps: float
    input_tokens_mean: float
    input_tokens_p50: float
    input_tokens_p95: float
    input_tokens_p99: float
    input_tokens_max: int
    output_tokens_mean: float
    output_tokens_p50: float
    output_tokens_p95: float
    output_tokens_p99: float
    output_tokens_max: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _token_stats(prefix: str, tokens: np.ndarray) -> dict[str, Any]:
    if tokens.size == 0:
        return {f"{prefix}_{k}": 0.0 for k in ("mean", "p50", "p95", "p99")} | {f"{prefix}_max": 0}
    p50, p95, p99 = np.percentile(tokens, [50, 95, 99])
    return {
        f"{prefix}_mean": float(tokens.mean()),
        f"{prefix}_p50": float(p50),
        f"{prefix}_p95": float(p95),
        f"{prefix}_p99": float(p99),
        f"{prefix}_max": int(tokens.max()),
    }


def summarize(trace: Trace) -> TraceSummary:
    """Count, duration, rate and token-length percentiles (linear interpolation)."""
    return TraceSummary(
        name=trace.name,
        n_requests=len(trace),
        n_dropped=trace.n_dropped,
        duration_s=trace.duration_s,
        mean_rate_rps=trace.mean_rate_rps,
        **_token_stats("input_tokens", trace.input_tokens),
        **_token_stats("output_tokens", trace.output_tokens),
    )
