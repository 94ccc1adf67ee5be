"""Each request's unloaded latency under a plan: the deadline unit of relative SLOs.

Request i served alone (nothing else in any engine) by the plan's deployment, through the
stages it visited: 1..(answering stage + 1) when its record says which stage answered,
every stage when unknown (the slowest path: a generous deadline). Same idea as the
experiments' deadlines (benchmarks/experiments/metrics.py), taken on the plan at hand.
"""

from __future__ import annotations

import numpy as np

from cascadia.traces import Trace

_ALONE_GAP_S = 1e6  # far longer than any request: each one runs with nothing else


def unloaded_latencies_s(plan, input_tokens: np.ndarray, output_tokens: np.ndarray,
                         final_stage: np.ndarray) -> np.ndarray:
    from cascadia.plan import simulate_plan

    n_stages = len(plan.stages)
    inputs = np.maximum(np.asarray(input_tokens, dtype=np.int64), 1)
    outputs = np.maximum(np.asarray(output_tokens, dtype=np.int64), 1)
    stages = np.asarray(final_stage, dtype=np.int64)
    visits = np.where((stages >= 0) & (stages < n_stages), stages + 1, n_stages)
    out = np.full(len(inputs), np.nan)
    for k in range(1, n_stages + 1):  # one simulation per path length
        idx = np.flatnonzero(visits == k)
        if idx.size == 0:
            continue
        alone = Trace(f"alone-{k}", np.arange(idx.size) * _ALONE_GAP_S, inputs[idx], outputs[idx])
        shares = tuple(1.0 if s < k else 0.0 for s in range(n_stages))
        out[idx] = simulate_plan(plan, alone, shares=shares).e2e_s
    return out
