"""How each compared system deploys a cascade on the cluster, and how a deployment is
simulated.

- ``cascadia``: the bi-level planner (planner.bilevel.plan).
- ``single``: the best single model that meets the target on its own, on all GPUs with the
  best layout the parallelism search finds (planner.parallelism.latency_table at N GPUs).
- ``cascadeserve``: a CascadeServe-style baseline, *our re-implementation of the policy*:
  the thresholds with the least escalation (sum of the shares of stages 2..C) that meet
  the target, one fixed replica shape per model (the smallest TP that fits, pp = 1), GPUs
  split in proportion to the stage shares (see ``proportional_replicas``).
- ``no-par-search``: Cascadia with every model on that same fixed shape (replicated): the
  routing search and the MILP still choose thresholds and replica counts.
- ``uniform``: Cascadia with the GPUs split evenly between the stages (N // C each, the
  remainder to the largest models); the parallelism search still picks layouts inside each
  stage's share.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cascadia.perf.layout import Layout
from cascadia.plan import Plan
from cascadia.quality import QualityProfile, replay
from cascadia.sim.cluster import StageDeployment, simulate
from cascadia.sim.config import EngineConfig
from cascadia.sim.results import SimResult
from cascadia.sim.routing import visits_from_profile
from cascadia.specs.cluster import ClusterSpec
from cascadia.specs.gpu import GPUSpec
from cascadia.specs.model import ModelSpec
from cascadia.traces import Trace
from planner import milp, parallelism
from planner.bilevel import Infeasible, PlannerOptions, default_backends, plan, restrict_profile
from planner.parallelism import LayoutOption, TableStats, replica_shapes
from planner.quality_input import QualitySource
from planner.routing import threshold_grid

SYSTEMS = ("cascadia", "single", "cascadeserve", "no-par-search", "uniform")


@dataclass(frozen=True)
class Deployment:
    """A system's decision: replicas per stage, thresholds, and what the profile predicts."""

    system: str
    models: tuple[ModelSpec, ...]
    gpu: GPUSpec
    gpus_per_node: int
    stage_layouts: tuple[tuple[Layout, ...], ...]  # () for a stage that gets no GPUs
    thresholds: tuple[float, ...]
    stage_shares: tuple[float, ...]  # replayed on the profile
    quality: float  # replayed mean quality (0-100)
    predicted_e2e_p95_s: float | None = None
    search: tuple[tuple[str, float], ...] = ()

    @property
    def n_gpus(self) -> int:
        return sum(lay.n_gpus for lays in self.stage_layouts for lay in lays)

    def describe(self) -> str:
        parts = []
        for m, lays in zip(self.models, self.stage_layouts):
            counts: dict[str, int] = {}
            for lay in lays:
                counts[lay.describe()] = counts.get(lay.describe(), 0) + 1
            parts.append(f"{m.name}: " + (" + ".join(f"{n}x{k}" for k, n in counts.items()) or "-"))
        return " | ".join(parts)


def simulate_deployment(dep: Deployment, trace: Trace, profile: QualityProfile | None, seed: int,
                        engine: EngineConfig = EngineConfig()) -> SimResult:
    """Serve ``trace``: which requests escalate comes from replaying ``profile`` under the
    deployment's thresholds, each request borrowing a profile row (seeded)."""
    stages = [StageDeployment(m, dep.gpu, lays, engine, None, dep.gpus_per_node)
              for m, lays in zip(dep.models, dep.stage_layouts)]
    visits = None
    if len(dep.models) > 1:
        names = [m.name for m in dep.models]
        if profile is not None and tuple(profile.models) != tuple(names):  # a sub-cascade of the profile's
            profile = restrict_profile(profile, [profile.models.index(n) for n in names])
        visits = visits_from_profile(profile, dep.thresholds, len(trace), seed)
        reached = int(visits.max()) if len(visits) else 0
        empty = [i for i in range(reached) if not dep.stage_layouts[i]]
        if empty:
            raise ValueError(f"{dep.system}: requests reach stage {empty[0] + 1}, which has no GPUs")
    return simulate(trace, stages, visits=visits)


def fixed_shape(model: ModelSpec, gpu: GPUSpec, gpus_per_node: int, engine: EngineConfig, max_gpus: int) -> Layout:
    """The smallest replica shape that holds the model (smallest TP, pp only if needed)."""
    shapes = replica_shapes(model, gpu, gpus_per_node, engine, max_gpus)
    if not shapes:
        raise ValueError(f"{model.name} fits no replica shape on {gpu.name}")
    return min(shapes, key=lambda s: s.n_gpus)


# ---- Cascadia and its ablations ----
def _from_plan(system: str, p: Plan, gpu: GPUSpec, gpus_per_node: int) -> Deployment:
    return Deployment(system, tuple(p.models), gpu, gpus_per_node, tuple(s.replicas for s in p.stages),
                      p.thresholds, p.stage_shares, p.quality.predicted, p.prediction.e2e_p95_s, p.search)


def planned(system: str, models: Sequence[ModelSpec], cluster: ClusterSpec, trace: Trace, profile: QualityProfile,
            source: QualitySource, q_min: float, options: PlannerOptions,
            table_requests: int = parallelism.DEFAULT_MAX_REQUESTS) -> Deployment | Infeasible:
    """Cascadia (``system == "cascadia"``) or one of its ablations, through the planner.
    ``table_requests``: how many requests of each stage's trace the latency tables simulate
    (a fixed count, set as both the planner's ``min_requests`` and ``max_requests``)."""
    backends = dataclasses.replace(default_backends(), latency_table=functools.partial(
        parallelism.latency_table, min_requests=table_requests, max_requests=table_requests))
    if system == "no-par-search":
        backends = dataclasses.replace(backends, latency_table=FixedShapeTable(max_requests=table_requests))
    elif system == "uniform":
        backends = dataclasses.replace(backends, solve=uniform_solve)
    elif system != "cascadia":
        raise ValueError(f"not a planned system: {system}")
    out = plan(models, cluster, trace, profile, q_min, quality_source=source, options=options, backends=backends)
    if isinstance(out, Infeasible):
        return out
    pool = cluster.pools[0]
    return _from_plan(system, out, pool.gpu, pool.gpus_per_node)


class FixedShapeTable:
    """A drop-in for planner.parallelism.latency_table without the parallelism search:
    f GPUs hold floor(f / size) replicas of the model's fixed shape. Same simulator, same
    stage-trace cut and the same overload rule as the real table; memoised per instance."""

    def __init__(self, min_gain: float = 0.02, max_requests: int = parallelism.DEFAULT_MAX_REQUESTS):
        self.min_gain = min_gain
        self.max_requests = max_requests
        self.memo: dict[str, dict[int, LayoutOption]] = {}

    def __call__(self, model: ModelSpec, gpu: GPUSpec, trace_for_stage: Trace, *, max_gpus: int, gpus_per_node: int,
                 engine: EngineConfig = EngineConfig(), cache_dir=None, processes=None,
                 stats: TableStats | None = None) -> dict[int, LayoutOption]:
        cap = self.max_requests
        trace = trace_for_stage.select(slice(0, cap)) if len(trace_for_stage) > cap else trace_for_stage
        key = parallelism.table_key(model, gpu, trace, gpus_per_node=gpus_per_node, engine=engine,
                                    efficiency=None, min_gain=self.min_gain) + f"/{max_gpus}"
        if key in self.memo:
            if stats is not None:
                stats.cache_hits += 1
            return self.memo[key]
        shape = fixed_shape(model, gpu, gpus_per_node, engine, max_gpus)
        self.memo[key] = table = self._build(model, gpu, shape, trace, max_gpus, gpus_per_node, engine, stats)
        return table

    def _build(self, model, gpu, shape, trace, max_gpus, gpus_per_node, engine, stats) -> dict[int, LayoutOption]:
        """Add replicas until the p95 is within min_gain of the shape's unloaded floor (every
        request served alone), the planner's stopping rule; fewer GPUs fill the rest."""
        table: dict[int, LayoutOption] = {}
        floor, alone_s = 0.0, np.ones(len(trace))
        if len(trace):
            alone = Trace("alone", np.arange(len(trace)) * 1e6, trace.input_tokens, trace.output_tokens)
            alone_s = simulate(alone, StageDeployment(model, gpu, (shape,), engine, None, gpus_per_node)).e2e_s
            floor = float(np.percentile(alone_s, 95))
        best: LayoutOption | None = None
        for k in range(1, max_gpus // shape.n_gpus + 1):
            if best is None or best.overloaded or best.p95_latency_s > floor * (1 + self.min_gain):
                layouts = (shape,) * k
                if len(trace) == 0:
                    option = LayoutOption(model.name, gpu.name, k * shape.n_gpus, layouts, 0.0, 0.0, math.nan)
                else:
                    option = _simulated_option(model, gpu, layouts, trace, gpus_per_node, engine, alone_s)
                    if stats is not None:
                        stats.simulations += 1
                if best is None or option.p95_latency_s < best.p95_latency_s:
                    best = option
            for f in range(k * shape.n_gpus, min((k + 1) * shape.n_gpus, max_gpus + 1)):
                table[f] = dataclasses.replace(best, n_gpus=f)
        return table


def _simulated_option(model, gpu, layouts, trace, gpus_per_node, engine, alone_s) -> LayoutOption:
    """One layout simulated on the stage trace, with the planner's overload rules
    (unfinished requests; `parallelism.backlogged` on delays and slowdowns)."""
    res = simulate(trace, StageDeployment(model, gpu, layouts, engine, None, gpus_per_node))
    n = sum(lay.n_gpus for lay in layouts)
    if res.n_unfinished:
        penalty = parallelism.OVERLOADED_LATENCY_S * (1.0 + res.n_unfinished / len(trace)) * 2
        return LayoutOption(model.name, gpu.name, n, layouts, penalty, penalty, math.nan, True)
    e2e = res.e2e_s
    p95, mean = float(np.percentile(e2e, 95)), float(np.mean(e2e))
    if parallelism.backlogged(e2e, alone_s, trace.duration_s):
        return LayoutOption(model.name, gpu.name, n, layouts, parallelism.OVERLOADED_LATENCY_S + p95,
                            parallelism.OVERLOADED_LATENCY_S + mean, math.nan, True)
    return LayoutOption(model.name, gpu.name, n, layouts, p95, mean, math.nan)


def uniform_caps(total_gpus: int, n_stages: int) -> list[int]:
    """N // C GPUs per stage; the remainder goes one each to the last (largest) stages."""
    base, extra = divmod(total_gpus, n_stages)
    return [base + (1 if i >= n_stages - extra else 0) for i in range(n_stages)]


def uniform_solve(problem: milp.DeploymentProblem, solver: str = "cbc",
                  time_limit_s: float = 60) -> milp.DeploymentSolution | milp.Infeasible:
    """A drop-in for milp.solve that gives each stage its uniform share of the GPUs and the
    best table option within it (a stage without traffic is left without GPUs)."""
    caps = uniform_caps(sum(problem.gpu_counts.values()), problem.n_stages)
    choices: list[LayoutOption | None] = []
    for i, opts in enumerate(problem.options):
        if problem.may_skip(i):
            choices.append(None)
            continue
        fit = [o for o in opts if o.n_gpus <= caps[i]]
        if not fit:
            return milp.Infeasible(f"{problem.stage_name(i)} has no layout within its uniform {caps[i]} GPUs",
                                   "uniform")
        choices.append(min(fit, key=lambda o: (o.p95_latency_s, o.n_gpus)))
    obj = milp.objective_value(problem, choices)
    return milp.DeploymentSolution(tuple(choices), obj, obj, 0.0, "optimal", "uniform", 0.0, problem.objective,
                                   problem.objective == "end-to-end")


# ---- single model ----
def single_model(models: Sequence[ModelSpec], cluster: ClusterSpec, trace: Trace, profile: QualityProfile,
                 q_min: float, *, engine: EngineConfig = EngineConfig(), cache_dir: str | None = None,
                 processes: int | None = None,
                 table_requests: int = parallelism.DEFAULT_MAX_REQUESTS) -> Deployment | Infeasible:
    """Of the cascade's models whose own mean quality meets ``q_min``, the one with the
    lowest predicted p95 on all the cluster's GPUs with its best layout."""
    means = profile.quality_scores.mean(axis=0)
    pool = cluster.pools[0]
    best: tuple[float, int, LayoutOption] | None = None
    for i, m in enumerate(models):
        if means[i] < q_min - 1e-9:
            continue
        table = parallelism.latency_table(m, pool.gpu, trace, max_gpus=cluster.n_gpus,
                                          gpus_per_node=pool.gpus_per_node, engine=engine, cache_dir=cache_dir,
                                          processes=processes, min_requests=table_requests,
                                          max_requests=table_requests)
        option = table.get(cluster.n_gpus)
        if option is not None and (best is None or option.p95_latency_s < best[0]):
            best = (option.p95_latency_s, i, option)
    if best is None:
        return Infeasible(f"no single model reaches q_min {q_min:g} (means {np.round(means, 1).tolist()})")
    _, i, option = best
    return Deployment("single", (models[i],), pool.gpu, pool.gpus_per_node, (option.layouts,), (), (1.0,),
                      float(means[i]), option.p95_latency_s)


# ---- CascadeServe-style ----
def least_escalation_thresholds(profile: QualityProfile, q_min: float,
                                max_points_per_stage: int = 64) -> tuple[tuple[float, ...], float, tuple[float, ...]]:
    """(thresholds, quality, shares) on the planner's threshold grid that meet ``q_min``
    with the fewest stage visits beyond the first; ties: higher quality."""
    grids = threshold_grid(profile, max_points_per_stage)
    mesh = np.stack(np.meshgrid(*grids, indexing="ij"), axis=-1).reshape(-1, len(grids))
    r = replay(profile, mesh)
    ok = np.flatnonzero(r.mean_quality >= q_min - 1e-9)
    if ok.size == 0:
        raise ValueError(f"no threshold vector reaches q_min {q_min:g}")
    escalation = r.stage_shares[ok, 1:].sum(axis=1)
    k = ok[np.lexsort((-r.mean_quality[ok], escalation))[0]]
    return tuple(float(t) for t in mesh[k]), float(r.mean_quality[k]), tuple(float(s) for s in r.stage_shares[k])


def proportional_replicas(shares: Sequence[float], sizes: Sequence[int], total_gpus: int) -> list[int]:
    """Replicas per stage with GPUs in proportion to the stage shares: every stage with
    traffic gets at least one replica and floor(N * share / sum / size) otherwise (trimmed
    from the stage most above its proportion when the minimums overflow); spare
    GPUs then go, a replica at a time, to the stage furthest below its proportional GPUs
    among those whose shape still fits. Stages without traffic get none."""
    shares = [max(0.0, float(s)) for s in shares]
    total_share = sum(shares)
    target = [total_gpus * s / total_share for s in shares]
    k = [max(1, int(t // size)) if s > 0 else 0 for s, t, size in zip(shares, target, sizes)]
    while sum(n * size for n, size in zip(k, sizes)) > total_gpus:  # minimums pushed us over: trim
        over = [i for i in range(len(k)) if k[i] > 1]
        if not over:
            raise ValueError(f"one replica per stage with traffic needs more than {total_gpus} GPUs")
        k[max(over, key=lambda j: k[j] * sizes[j] - target[j])] -= 1
    while True:
        left = total_gpus - sum(n * size for n, size in zip(k, sizes))
        fits = [i for i, (s, size) in enumerate(zip(shares, sizes)) if s > 0 and size <= left]
        if not fits:
            return k
        i = max(fits, key=lambda j: (target[j] - k[j] * sizes[j]) / sizes[j])
        k[i] += 1


def cascadeserve(models: Sequence[ModelSpec], cluster: ClusterSpec, profile: QualityProfile, q_min: float, *,
                 engine: EngineConfig = EngineConfig(), max_points_per_stage: int = 64) -> Deployment:
    pool = cluster.pools[0]
    thresholds, quality, shares = least_escalation_thresholds(profile, q_min, max_points_per_stage)
    shapes = [fixed_shape(m, pool.gpu, pool.gpus_per_node, engine, cluster.n_gpus) for m in models]
    counts = proportional_replicas(shares, [s.n_gpus for s in shapes], cluster.n_gpus)
    return Deployment("cascadeserve", tuple(models), pool.gpu, pool.gpus_per_node,
                      tuple((s,) * n for s, n in zip(shapes, counts)), thresholds, shares, quality)
