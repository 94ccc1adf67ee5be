"""Rerun the whole comparison: plan every system on the planning window, simulate each
deployment on the evaluation window with another seed, write JSON, a markdown table and
plots.

    .venv/bin/python -m benchmarks.experiments.run_all --out benchmarks/results/experiments [--quick]

Latency tables go through the planner's on-disk cache ($CASCADIA_CACHE, default
~/.cache/cascadia), so a second run skips the parallelism search.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np

from benchmarks.experiments import metrics, report, scenarios
from benchmarks.experiments.scenarios import Scenario, Settings
from benchmarks.experiments.systems import (SYSTEMS, Deployment, cascadeserve, planned, simulate_deployment,
                                            single_model)
from cascadia.perf.layout import Layout
from cascadia.sim.config import EngineConfig
from cascadia.traces import Trace, scale_time
from planner.bilevel import Infeasible, PlannerOptions

Log = Callable[[str], None]


def planner_options(sc: Scenario, settings: Settings, objective: str, cache_dir: str | None) -> PlannerOptions:
    # 3-stage: a coarser share quantum keeps the number of latency tables (and MILPs) bounded
    quantum = 0.05 if len(sc.models) == 2 else 0.1
    return PlannerOptions(objective=objective, share_quantum=quantum, seed=settings.plan_seed, cache_dir=cache_dir,
                          processes=2)


def build_systems(sc: Scenario, plan_trace: Trace, settings: Settings, objective: str,
                  cache_dir: str | None, log: Log) -> dict[str, Deployment | Infeasible]:
    cluster = scenarios.cluster()
    models = scenarios.cascade_models(sc.cascade)
    profile, source = scenarios.quality(sc.cascade, sc.quality)
    opts = planner_options(sc, settings, objective, cache_dir)
    out: dict[str, Deployment | Infeasible] = {}
    for system in SYSTEMS:
        t0 = time.perf_counter()
        if system == "single":
            dep = single_model(models, cluster, plan_trace, profile, sc.q_min, cache_dir=cache_dir, processes=2,
                               table_requests=settings.table_requests)
        elif system == "cascadeserve":
            dep = cascadeserve(models, cluster, profile, sc.q_min)
        else:
            dep = planned(system, models, cluster, plan_trace, profile, source, sc.q_min, opts,
                          table_requests=settings.table_requests)
        out[system] = dep
        what = dep.describe() if isinstance(dep, Deployment) else f"INFEASIBLE: {dep.reason}"
        log(f"  {system:<14} {time.perf_counter() - t0:6.1f} s  {what}")
    return out


def evaluate(dep: Deployment, trace: Trace, sc: Scenario, unloaded_s: np.ndarray, settings: Settings,
             with_rate: bool) -> dict:
    profile, _ = scenarios.quality(sc.cascade, sc.quality)

    def run(multiplier: float):
        tr = trace if multiplier == 1.0 else scale_time(trace, 1.0 / multiplier)
        return simulate_deployment(dep, tr, profile, settings.eval_seed)

    res = run(1.0)
    out = {
        "deployment": dep.describe(), "n_gpus": dep.n_gpus, "thresholds": list(dep.thresholds),
        "planned_stage_shares": list(dep.stage_shares), "realised_stage_shares": res.stage_shares.tolist(),
        "quality": dep.quality, "predicted_e2e_p95_s": dep.predicted_e2e_p95_s,
        "min_slo_scale": metrics.min_slo_scale(res.e2e_s, unloaded_s),
        "e2e_p95_s": float(np.percentile(np.where(np.isfinite(res.e2e_s), res.e2e_s, np.inf), 95)),
        "unfinished": res.n_unfinished,
        "attainment_at_rate_scale": metrics.slo_attainment(res.e2e_s, unloaded_s, settings.rate_scale),
        "search": dict(dep.search),
    }
    if with_rate:
        base_ok = out["attainment_at_rate_scale"] >= metrics.ATTAINMENT

        def passes(m: float) -> bool:
            if m == 1.0:
                return base_ok  # already simulated
            return metrics.slo_attainment(run(m).e2e_s, unloaded_s, settings.rate_scale) >= metrics.ATTAINMENT

        search = metrics.max_sustained_multiplier(passes, max_probes=settings.rate_probes)
        out["max_rate_multiplier"] = search.multiplier
        out["max_rate_rps"] = search.multiplier * trace.mean_rate_rps
        out["rate_failed_at_multiplier"] = search.failed_at
        out["rate_probes"] = [list(p) for p in search.probes]
    return out


def _finite(x):
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def ratios(systems: dict) -> dict:
    """Cascadia's advantage: other system's min SLO scale / Cascadia's (> 1: tighter), and
    Cascadia's max rate / the other's."""
    ours = systems.get("cascadia", {})
    out = {}
    for other in ("single", "cascadeserve", "no-par-search", "uniform"):
        theirs = systems.get(other, {})
        a, b = _finite(ours.get("min_slo_scale")), theirs.get("min_slo_scale")
        if a and b is not None:
            out[f"slo_vs_{other}"] = b / a if math.isfinite(b) else math.inf
        ra, rb = ours.get("max_rate_rps"), theirs.get("max_rate_rps")
        if ra is not None and rb:
            out[f"rate_vs_{other}"] = ra / rb
    return out


def run(settings: Settings, objective: str, cache_dir: str | None, log: Log) -> dict:
    cluster = scenarios.cluster()
    pool = cluster.pools[0]
    unloaded: dict[tuple[str, str], np.ndarray] = {}
    rows = []
    t_start = time.perf_counter()
    for sc in scenarios.scenarios(settings):
        t0 = time.perf_counter()
        plan_trace = scenarios.workload(sc.trace, settings.plan_window_s)
        eval_trace = scenarios.workload(sc.trace, settings.eval_window_s)
        largest = scenarios.cascade_models(sc.cascade)[-1]
        if (sc.cascade, sc.trace) not in unloaded:
            unloaded[(sc.cascade, sc.trace)] = metrics.unloaded_latency_s(
                largest, pool.gpu, Layout(pool.gpus_per_node), eval_trace, EngineConfig())
        base = unloaded[(sc.cascade, sc.trace)]
        log(f"{sc.key}: q_min {sc.q_min:.2f} (z2 {sc.z2:.2f}, z1 {sc.z1:.2f})")
        deps = build_systems(sc, plan_trace, settings, objective, cache_dir, log)
        results = {}
        for system, dep in deps.items():
            if isinstance(dep, Infeasible):
                results[system] = {"infeasible": dep.reason}
                continue
            results[system] = evaluate(dep, eval_trace, sc, base, settings, sc.quality in settings.rate_qualities)
        row = {"scenario": asdict(sc), "key": sc.key, "kind": scenarios.quality(sc.cascade, sc.quality)[1].kind,
               "plan_workload": scenarios.describe_workload(plan_trace),
               "eval_workload": scenarios.describe_workload(eval_trace),
               "unloaded_p50_s": float(np.median(base)), "systems": results, "ratios": ratios(results),
               "wall_s": time.perf_counter() - t0}
        rows.append(row)
        log("  " + "  ".join(f"{s}={r.get('min_slo_scale', float('nan')):.2f}" for s, r in results.items())
            + f"  ({row['wall_s']:.0f} s)")
    return {
        "settings": asdict(settings), "objective": objective, "cluster": cluster.describe(),
        "speedup": scenarios.SPEEDUP, "synthetic_means": scenarios.SYNTHETIC_MEANS,
        "deadline": ("deadline_i = scale x unloaded_i; unloaded_i = e2e latency of request i alone on one "
                     f"replica of the cascade's largest model at tp={pool.gpus_per_node} (simulated); "
                     "min SLO scale = smallest scale at which >= 95% of requests meet their deadline"),
        "scenarios": rows, "wall_s": time.perf_counter() - t_start,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/experiments", help="directory for JSON, table and plots")
    ap.add_argument("--quick", action="store_true", help="smoke version: one trace, one target, short windows")
    ap.add_argument("--objective", default="max-stage", choices=("max-stage", "end-to-end"),
                    help="Cascadia's deployment objective (the paper's is max-stage)")
    ap.add_argument("--cache-dir", default=None, help="latency-table cache (default: the planner's)")
    ap.add_argument("--table-requests", type=int, default=None,
                    help="requests per stage trace in the latency tables (default 2048; the planner's own default is "
                         "20 s of traffic, 256-1024 requests)")
    args = ap.parse_args(argv)
    settings = Settings.quick_settings() if args.quick else Settings()
    if args.table_requests:
        settings = dataclasses.replace(settings, table_requests=args.table_requests)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = run(settings, args.objective, args.cache_dir, lambda s: print(s, file=sys.stderr, flush=True))
    name = "results_quick" if args.quick else "results"
    (out / f"{name}.json").write_text(json.dumps(report.json_safe(doc), indent=1) + "\n")
    table = report.markdown(doc)
    (out / f"{name}.md").write_text(table)
    report.plot(doc, out / f"{name}_slo.png", out / f"{name}_rate.png")
    print(table)
    print(f"wrote {out / name}.json, .md, _slo.png, _rate.png in {doc['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
