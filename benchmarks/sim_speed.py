"""Simulator speed: the full Azure conversation trace (19,366 requests) through 4 replicas
of Llama-3-70B at TP=4 on H100, at the trace's own rate and at 4x its rate.

    .venv/bin/python benchmarks/sim_speed.py [--check-slice 500]

Prints wall time, simulated requests per second and engine iterations simulated; with
--check-slice N it also runs the first N requests step by step and reports the largest
per-request difference from the fast-forwarded run.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from cascadia.catalog import get_model
from cascadia.perf.layout import Layout
from cascadia.sim.cluster import StageDeployment, simulate
from cascadia.specs.gpu import get_gpu
from cascadia.traces import builtin_trace_path, load_trace, scale_time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="runs per setting; the best is reported too")
    ap.add_argument("--check-slice", type=int, default=0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    trace = load_trace(builtin_trace_path("azure-conv"))
    load_s = time.perf_counter() - t0
    stage = StageDeployment(get_model("llama-3-70b"), get_gpu("H100"), (Layout(4),) * 4)
    print(f"trace: {len(trace)} requests over {trace.duration_s:.0f} s, loaded in {load_s:.2f} s")
    print(f"{'rate':<8}{'wall s (min/median/max)':>26}{'sim req/s':>12}{'iterations':>12}{'events':>10}"
          f"{'p95 E2E s':>11}{'p95 TTFT s':>12}")
    for label, factor in (("1x", 1.0), ("4x", 0.25)):
        tr = scale_time(trace, factor)
        walls, res = [], None
        for _ in range(args.repeats):
            res = simulate(tr, stage)
            walls.append(res.wall_s)
        w = sorted(walls)
        s = res.summary()
        print(f"{label:<8}{w[0]:>8.2f} /{w[len(w) // 2]:>6.2f} /{w[-1]:>6.2f}{len(tr) / w[len(w) // 2]:>16.0f}"
              f"{res.iterations:>12}{res.events:>10}{s['e2e_s']['p95']:>11.2f}{s['ttft_s']['p95']:>12.3f}")
    if args.check_slice:
        sub = trace.select(slice(0, args.check_slice))
        ff = simulate(sub, stage, fast_forward=True)
        step = simulate(sub, stage, fast_forward=False)
        diff = max(np.nanmax(np.abs(ff.e2e_s - step.e2e_s)), np.nanmax(np.abs(ff.ttft_s - step.ttft_s)))
        print(f"fast-forward vs step-by-step on {args.check_slice} requests: max |difference| {diff:.2e} s, "
              f"iterations {ff.iterations} vs {step.iterations}, events {ff.events} vs {step.events}, "
              f"wall {ff.wall_s:.3f} s vs {step.wall_s:.3f} s")


if __name__ == "__main__":
    main()
