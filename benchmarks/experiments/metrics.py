"""SLO metrics of the comparison: pure functions of per-request latencies.

Deadline of request i at SLO scale s: ``s * unloaded_s[i]``, where ``unloaded_s[i]`` is
the end-to-end latency of request i's shape (its input and output token counts) served
alone by the stand-alone largest model of the cascade on one replica at tensor
parallelism = GPUs per node (8 on H100 nodes), computed by the simulator (each request
simulated with nothing else in the engine). The same deadlines are used for every system.

A request meets its deadline when ``e2e_s[i] <= s * unloaded_s[i]``; unfinished requests
(e2e inf or nan) never do. The *minimum SLO scale* is the smallest s at which at least
95% of the requests meet their deadline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from cascadia.metrics import ATTAINMENT, min_slo_scale, slo_attainment, slowdowns  # noqa: F401 (shared)
from cascadia.perf.layout import Layout
from cascadia.sim.cluster import StageDeployment, simulate
from cascadia.sim.config import EngineConfig
from cascadia.specs.gpu import GPUSpec
from cascadia.specs.model import ModelSpec
from cascadia.traces import Trace

_ALONE_GAP_S = 1e6  # far longer than any request: each one runs with nothing else


def unloaded_latency_s(model: ModelSpec, gpu: GPUSpec, layout: Layout, trace: Trace,
                       engine: EngineConfig = EngineConfig()) -> np.ndarray:
    """Per request of ``trace``: its end-to-end latency served alone by one replica of
    ``model`` with ``layout``."""
    alone = Trace(f"{trace.name}-alone", np.arange(len(trace)) * _ALONE_GAP_S, trace.input_tokens,
                  trace.output_tokens)
    result = simulate(alone, StageDeployment(model, gpu, (layout,), engine))
    return np.asarray(result.e2e_s, dtype=np.float64)


@dataclass(frozen=True)
class RateSearch:
    """Outcome of ``max_sustained_multiplier``: the highest multiplier seen to pass
    (0 when none did), the lowest seen to fail (inf when none did) and every probe."""

    multiplier: float
    failed_at: float
    probes: tuple[tuple[float, bool], ...]

    @property
    def simulations(self) -> int:
        return len(self.probes)


def max_sustained_multiplier(passes: Callable[[float], bool], *, start: float = 1.0, max_probes: int = 6,
                             grow: float = 2.0, rel_tol: float = 0.05) -> RateSearch:
    """Highest rate multiplier m with ``passes(m)`` (attainment holds at m x the base rate),
    assuming it is monotone: bracket by growing/shrinking ``start`` by ``grow``, then
    bisect geometrically; at most ``max_probes`` calls, fewer once the bracket is within
    ``rel_tol``."""
    probes: list[tuple[float, bool]] = []

    def probe(m: float) -> bool:
        ok = bool(passes(m))
        probes.append((m, ok))
        return ok

    lo, hi = 0.0, math.inf
    m = start
    while len(probes) < max_probes and (lo == 0.0 or not math.isfinite(hi)):
        if probe(m):
            lo = m
            if math.isfinite(hi):
                break
            m = m * grow
        else:
            hi = m
            if lo > 0.0:
                break
            m = m / grow
    while len(probes) < max_probes and lo > 0.0 and math.isfinite(hi) and hi / lo > 1.0 + rel_tol:
        m = math.sqrt(lo * hi)
        if probe(m):
            lo = m
        else:
            hi = m
    return RateSearch(lo, hi, tuple(probes))
