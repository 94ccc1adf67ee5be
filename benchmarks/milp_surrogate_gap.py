"""How much the end-to-end objective loses by optimising a linear surrogate in the MILP.

The deployment MILP's `end-to-end` objective minimises sum_i share_i * p95_i (a surrogate:
the p95 of a request's latency summed over the stages it visits is not linear in the
choices). On small instances -- the 2-stage Llama-3 8B -> 70B cascade on 6 and 8 H100 of one
node and 16 H100 in two nodes, Azure conv and code windows, stage-2 shares 0.2, 0.35 and
0.5 -- this compares, by the end-to-end p95 of a full-cascade simulation (pooled over 3
seeds, as the planner predicts):

- surrogate: the MILP's optimum (what the planner takes for a share vector);
- top-3 + re-score: the MILP's 3 best distinct deployments, each simulated, the best kept;
- brute force: every feasible combination of the stages' table options (deduplicated by
  the replicas actually deployed), each simulated, the best kept.

    .venv/bin/python benchmarks/milp_surrogate_gap.py [--window 0:120]

Shares are fixed per instance (this isolates the deployment level; the routing search
above it is not part of the comparison).
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import tempfile
import time

import numpy as np

from cascadia.catalog import get_model
from cascadia.sim.cluster import StageDeployment, simulate
from cascadia.sim.routing import visits_from_shares
from cascadia.specs.cluster import parse_cluster
from cascadia.traces import builtin_trace_path, load_trace, scale_time, window
from planner import milp
from planner.parallelism import latency_table, stage_trace

CASCADE = ("llama-3-8b", "llama-3-70b")
CLUSTERS = ("1x6xH100", "1x8xH100", "2x8xH100")
TRACES = {"azure-conv": 2.0, "azure-code": 1.5}  # arrival speedup for 8 GPUs (scaled by GPUs / 8)
SHARES = (0.2, 0.35, 0.5)
SEEDS = 3


def e2e_p95(models, gpu, gpus_per_node, layouts_by_stage, trace, shares, seed=0) -> float:
    stages = [StageDeployment(m, gpu, lays, gpus_per_node=gpus_per_node) for m, lays in zip(models, layouts_by_stage)]
    pooled = []
    for k in range(SEEDS):
        res = simulate(trace, stages, visits=visits_from_shares(shares, len(trace), seed + k))
        if res.n_unfinished:
            return math.inf
        pooled.append(res.e2e_s)
    return float(np.percentile(np.concatenate(pooled), 95))


def instance(cluster_text: str, trace_name: str, share2: float, span: tuple[float, float], cache: str) -> dict:
    cluster = parse_cluster(cluster_text)
    pool = cluster.pools[0]
    models = [get_model(m) for m in CASCADE]
    speedup = TRACES[trace_name] * cluster.n_gpus / 8
    trace = scale_time(window(load_trace(builtin_trace_path(trace_name)), *span), 1.0 / speedup)
    shares = (1.0, share2)
    options = []
    for i, (m, s) in enumerate(zip(models, shares)):
        table = latency_table(m, pool.gpu, stage_trace(trace, s, 11 + i), max_gpus=cluster.n_gpus,
                              gpus_per_node=pool.gpus_per_node, cache_dir=cache, processes=2)
        options.append(tuple(table[f] for f in sorted(table)))
    problem = milp.DeploymentProblem(tuple(options), cluster.gpu_counts(), shares, "end-to-end")
    memo: dict[tuple, float] = {}

    def score(choices) -> float:
        key = tuple(c.layouts for c in choices)
        if key not in memo:
            memo[key] = e2e_p95(models, pool.gpu, pool.gpus_per_node, key, trace, shares)
        return memo[key]

    t0 = time.perf_counter()
    top = milp.solve_top_k(problem, 3)
    milp_s = time.perf_counter() - t0
    surrogate = score(top[0].choices)
    rescored = min(score(s.choices) for s in top)
    brute, n_feasible = math.inf, 0
    for combo in itertools.product(*options):
        if sum(c.n_gpus for c in combo) > cluster.n_gpus:
            continue
        n_feasible += 1
        brute = min(brute, score(combo))
    best_key = min(memo, key=memo.get)
    return {"cluster": cluster_text, "trace": trace_name, "share2": share2, "requests": len(trace),
            "rate_rps": trace.mean_rate_rps, "surrogate_p95_s": surrogate, "rescored_p95_s": rescored,
            "brute_p95_s": brute, "feasible_combos": n_feasible, "distinct_deployments": len(memo),
            "milp_top3_s": milp_s,
            "surrogate_choice": " / ".join("+".join(l.describe() for l in c.layouts) for c in top[0].choices),
            "brute_choice": " / ".join("+".join(l.describe() for l in lays) for lays in best_key)}


def gap(x: float, best: float) -> float:
    if math.isinf(x) and math.isinf(best):
        return 0.0
    return (x - best) / best if math.isfinite(x) else math.inf


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--window", default="0:120", help="original trace seconds START:END")
    ap.add_argument("--cache-dir", default=None, help="latency-table cache (default: a temporary directory)")
    args = ap.parse_args(argv)
    span = tuple(float(x) for x in args.window.split(":"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="cascadia-gap-") as tmp:
        for cluster_text, trace_name, share2 in itertools.product(CLUSTERS, TRACES, SHARES):
            t0 = time.perf_counter()
            r = instance(cluster_text, trace_name, share2, span, args.cache_dir or tmp)
            r["wall_s"] = time.perf_counter() - t0
            rows.append(r)
            print(f"  {cluster_text} {trace_name} share {share2}: {r['wall_s']:.1f} s", file=sys.stderr, flush=True)
    print(f"2-stage {' -> '.join(CASCADE)}; window {args.window} s; end-to-end p95 pooled over {SEEDS} seeds")
    print("| GPUs | trace | req/s | stage-2 share | feasible combos | distinct deployments | brute-force p95 s | "
          "surrogate p95 s (gap) | top-3 re-scored p95 s (gap) | surrogate's choice | brute force's choice |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        g1, g3 = gap(r["surrogate_p95_s"], r["brute_p95_s"]), gap(r["rescored_p95_s"], r["brute_p95_s"])
        print(f"| {r['cluster']} | {r['trace']} | {r['rate_rps']:.1f} | {r['share2']:g} | {r['feasible_combos']} | "
              f"{r['distinct_deployments']} | {r['brute_p95_s']:.2f} | {r['surrogate_p95_s']:.2f} ({g1:+.1%}) | "
              f"{r['rescored_p95_s']:.2f} ({g3:+.1%}) | {r['surrogate_choice']} | {r['brute_choice']} |")
    g1s = [gap(r["surrogate_p95_s"], r["brute_p95_s"]) for r in rows]
    g3s = [gap(r["rescored_p95_s"], r["brute_p95_s"]) for r in rows]
    print(f"surrogate gap: max {max(g1s):+.1%}, mean {np.mean(g1s):+.1%}, "
          f"zero in {sum(g == 0 for g in g1s)}/{len(rows)}; "
          f"top-3 re-scored gap: max {max(g3s):+.1%}, mean {np.mean(g3s):+.1%}, zero in "
          f"{sum(g == 0 for g in g3s)}/{len(rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
