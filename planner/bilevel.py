"""The bi-level planner: routing thresholds outside, GPU allocation and layouts inside.

``plan`` runs the routing search (planner/routing.py) whose latency for a share vector is
the deployment MILP (planner/milp.py) over per-stage latency tables
(planner/parallelism.py). Tables depend on the traffic a stage sees, so they are built per
(stage, share rounded up to the search's quantum) and kept for the whole run. The best
candidates by J are re-scored by simulating the whole cascade; the chosen one is placed on
nodes, simulated once more as placed (that simulation's end-to-end p95 is the plan's
prediction) and re-checked by ``verify_plan``.

Everything here is a pure function of its inputs; files and printing belong to the CLI.
The lower-level functions come in a ``Backends`` bundle so tests can swap in fakes.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import math
import multiprocessing
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np

from cascadia.perf.layout import Layout
from cascadia.perf.memory import LayoutDoesNotFit, plan_memory
from cascadia.plan import FrontPoint, JudgeInfo, Plan, PlanStage, Prediction, QualityInfo, simulate_plan, trace_hash
from cascadia.quality import QualityProfile, replay
from cascadia.sim.config import EngineConfig
from cascadia.specs.cluster import ClusterSpec
from cascadia.specs.model import ModelSpec
from cascadia.traces import Trace, summarize
from planner.quality_input import QualitySource
from planner.routing import RoutingPoint, RoutingSearchResult, search_routing, threshold_grid

OBJECTIVES = ("max-stage", "end-to-end")


@dataclass(frozen=True)
class Infeasible:
    """No plan: ``reason`` is one line a user can act on."""

    reason: str
    status: str = "infeasible"


@dataclass(frozen=True)
class PlannerOptions:
    objective: str = "max-stage"
    solver: str = "cbc"
    time_limit_s: float = 60.0
    share_quantum: float = 0.05  # tables and MILPs are per share rounded up to this
    max_points_per_stage: int = 64
    coarse_points: int = 9
    stable_rounds: int = 3
    rescore_top: int = 3  # candidates re-scored by a full-cascade simulation
    # The e2e p95 pools this many seeded simulations: which requests escalate is random, and
    # when the escalated share is near 5% the p95 sits on a cliff of the latency
    # distribution, so one seed can land on either side (and re-scoring would pick the lucky one).
    prediction_seeds: int = 3
    solver_threads: int = 2  # MILPs of one routing batch solved at once
    seed: int = 0
    # Also plan every sub-cascade (the cascade's models in order with some left out, down to
    # the last model alone) and keep the one predicted fastest: beyond the paper, whose
    # planner always routes through every stage even when that is slower than skipping one.
    sub_cascades: bool = True
    engine: EngineConfig = field(default_factory=EngineConfig)
    cache_dir: str | None = None
    processes: int | None = None

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")


@dataclass(frozen=True)
class Backends:
    """The deployment-level functions, by the names of docs/planner-contract.md."""

    stage_trace: Callable[..., Trace]
    latency_table: Callable[..., dict]
    problem: Callable[..., Any]  # milp.DeploymentProblem
    solve: Callable[..., Any]
    place: Callable[..., Any]
    verify_plan: Callable[[Plan, ClusterSpec], list[str]]


def default_backends() -> Backends:
    from planner import milp, parallelism, placement, verify

    return Backends(parallelism.stage_trace, parallelism.latency_table, milp.DeploymentProblem, milp.solve,
                    placement.place, verify.verify_plan)


Progress = Callable[[str, int], None]


def _fits_somewhere(model: ModelSpec, cluster: ClusterSpec, engine: EngineConfig) -> bool:
    """Cheap pre-check: some (tp, pp) on one pool holds the model's weights and KV minimum."""
    for pool in cluster.pools:
        for tp in (t for t in range(1, pool.gpus_per_node + 1) if pool.gpus_per_node % t == 0):
            for pp in range(1, pool.n_nodes * pool.gpus_per_node // tp + 1):
                try:
                    plan_memory(model, pool.gpu, Layout(tp, pp), gpu_memory_utilization=engine.gpu_memory_utilization,
                                max_num_batched_tokens=engine.max_num_batched_tokens,
                                max_num_seqs=engine.max_num_seqs, block_size_tokens=engine.block_size_tokens,
                                kv_cache_bytes=engine.kv_cache_bytes, min_kv_tokens=engine.min_kv_tokens)
                    return True
                except LayoutDoesNotFit:
                    continue
    return False


def best_reachable_quality(profile: QualityProfile, max_points_per_stage: int) -> float:
    """The highest mean quality any threshold vector on the search grid reaches."""
    grids = threshold_grid(profile, max_points_per_stage)
    if not grids:
        return float(profile.quality_scores[:, 0].mean())
    mesh = np.stack(np.meshgrid(*grids, indexing="ij"), axis=-1).reshape(-1, len(grids))
    return float(replay(profile, mesh).mean_quality.max())


def check_inputs(models: Sequence[ModelSpec], cluster: ClusterSpec, trace: Trace, profile: QualityProfile,
                 q_min: float, options: PlannerOptions) -> Infeasible | None:
    """The bad inputs a user should hear about before any simulation runs."""
    if cluster.n_gpus <= 0:
        return Infeasible("the cluster has no GPUs")
    if len(trace) == 0:
        return Infeasible("the trace is empty")
    if tuple(profile.models) != tuple(m.name for m in models):
        return Infeasible(f"the quality profile's stages {list(profile.models)} are not the cascade "
                          f"{[m.name for m in models]}")
    for m in models:
        if not _fits_somewhere(m, cluster, options.engine):
            return Infeasible(f"model {m.name} cannot fit the pool {cluster.describe()} (weights "
                              f"{m.weight_bytes() / 1e9:.0f} GB) with any tensor/pipeline layout")
    best = best_reachable_quality(profile, options.max_points_per_stage)
    if q_min > best + 1e-9:
        singles = ", ".join(f"{m} {q:.1f}" for m, q in zip(profile.models, profile.quality_scores.mean(axis=0)))
        return Infeasible(f"q_min {q_min:g} is above the best quality any routing reaches ({best:.1f}; "
                          f"single models: {singles})")
    return None


class _DeploymentLevel:
    """latency_of_shares for the routing search: tables per (stage, share), then the MILP."""

    def __init__(self, models, cluster, trace, options: PlannerOptions, backends: Backends,
                 progress: Progress | None, judge: JudgeInfo | None = None, stage_ids: Sequence[int] | None = None):
        self.models, self.cluster, self.trace = models, cluster, trace
        # Stage sampling is seeded by the model's place in the requested cascade, so a
        # sub-cascade's stage sees the same requests at the same share and reuses its tables.
        self.stage_ids = tuple(stage_ids) if stage_ids is not None else tuple(range(len(models)))
        load = judge.load_on([m.name for m in models]) if judge is not None else None
        self.judge_load = load
        self.options, self.backends, self.progress = options, backends, progress
        self.tables: dict[tuple, tuple[Any, ...]] = {}
        self._min_gpus: dict[int, int] = {}
        self.solves = 0
        # The real latency_table counts its simulations and cache hits into a TableStats.
        self.table_stats = None
        if "stats" in inspect.signature(backends.latency_table).parameters:
            from planner.parallelism import TableStats

            self.table_stats = TableStats()

    def min_gpus(self, stage: int) -> int:
        """GPUs of the smallest replica of the stage's model (single-type clusters), 0 if none fits."""
        if stage not in self._min_gpus:
            from planner.parallelism import replica_shapes

            pool = self.cluster.pools[0]
            shapes = replica_shapes(self.models[stage], pool.gpu, pool.gpus_per_node, self.options.engine,
                                    self.cluster.n_gpus)
            self._min_gpus[stage] = min((s.n_gpus for s in shapes), default=0)
        return self._min_gpus[stage]

    def gpu_cap(self, stage: int, shares: Sequence[float]) -> int | None:
        """On a single-type cluster, the most GPUs `stage` can get: every other stage with
        traffic needs at least its smallest replica. Exact (no MILP solution exceeds it),
        and it shortens the stage's table, whose longest entries cost the most to simulate."""
        if len(self.cluster.pools) != 1:
            return None
        others = sum(self.min_gpus(j) for j, s in enumerate(shares) if j != stage and s > 0)
        return max(0, self.cluster.n_gpus - others)

    def stage_options(self, stage: int, share: float, judged: tuple[float, ...] = (),
                      cap: int | None = None) -> tuple[Any, ...]:
        """Options for `stage` at traffic `share` on at most `cap` GPUs (None: all of each
        type); `judged` (shares of the judged stages) matters only for the stage that
        serves an LLM judge, whose table then includes the judge requests."""
        hosts_judge = self.judge_load is not None and self.judge_load.stage == stage
        key = (stage, share, judged if hosts_judge else (), cap)
        if key not in self.tables:
            opts: list[Any] = []
            if share > 0 or (hosts_judge and any(judged)):
                if hosts_judge:
                    sub = with_judge_requests(self.trace, share, judged, self.options.seed + self.stage_ids[stage],
                                              self.judge_load)
                else:
                    sub = self.backends.stage_trace(self.trace, share, self.options.seed + self.stage_ids[stage])
                seen: set[str] = set()
                for pool in self.cluster.pools:
                    if pool.gpu.name in seen:
                        continue
                    seen.add(pool.gpu.name)
                    count = self.cluster.gpu_counts()[pool.gpu.name]
                    table = self.backends.latency_table(
                        self.models[stage], pool.gpu, sub, max_gpus=count if cap is None else min(cap, count),
                        gpus_per_node=pool.gpus_per_node, engine=self.options.engine,
                        cache_dir=self.options.cache_dir, processes=self.options.processes,
                        **({"stats": self.table_stats} if self.table_stats is not None else {}))
                    opts.extend(table[f] for f in sorted(table))
            self.tables[key] = tuple(opts)
            if self.progress:
                self.progress("table", 1)
        return self.tables[key]

    def _problem(self, shares: tuple[float, ...]) -> Any:
        """The MILP for a share vector (its tables built here, in the calling thread), or
        the final (inf, Infeasible) when a stage with traffic has no layout."""
        judged = tuple(shares[:-1])  # every stage but the last is judged
        busy = tuple(shares)
        if self.judge_load is not None and any(judged):
            # the judge's stage carries load even when no request stops there
            h = self.judge_load.stage
            busy = busy[:h] + (max(busy[h], 1e-9),) + busy[h + 1:]
        per_stage = tuple(self.stage_options(i, s, judged, self.gpu_cap(i, busy)) for i, s in enumerate(shares))
        if any(s > 0 and not o for s, o in zip(busy, per_stage)):
            return math.inf, Infeasible("a stage with traffic has no layout that fits")
        return self.backends.problem(options=per_stage, gpu_counts=self.cluster.gpu_counts(),
                                     stage_shares=busy, objective=self.options.objective)

    def _solve(self, problem: Any) -> tuple[float, Any]:
        solution = self.backends.solve(problem, solver=self.options.solver, time_limit_s=self.options.time_limit_s)
        if not hasattr(solution, "choices"):
            return math.inf, solution
        return float(solution.objective_s), solution

    def prefetch(self, batch: Sequence[tuple[float, ...]]) -> dict[tuple[float, ...], tuple[float, Any]]:
        """(latency, solution) for each share vector of a batch: tables are built one
        after another (each uses the worker processes itself), then the MILPs are solved
        in `solver_threads` threads -- a CBC solve is a subprocess, so two run on two
        cores at once; results do not depend on the order."""
        staged = {shares: self._problem(shares) for shares in dict.fromkeys(batch)}
        pending = [(k, p) for k, p in staged.items() if not isinstance(p, tuple)]
        out = {k: p for k, p in staged.items() if isinstance(p, tuple)}
        threads = max(1, min(self.options.solver_threads, len(pending)))
        if threads > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(threads) as pool:
                solved = list(pool.map(self._solve, [p for _, p in pending]))
        else:
            solved = [self._solve(p) for _, p in pending]
        for (k, _), result in zip(pending, solved):
            out[k] = result
            self.solves += 1
            if self.progress:
                self.progress("milp", 1)
        return out

    def __call__(self, shares: tuple[float, ...]) -> tuple[float, Any]:
        return self.prefetch([tuple(shares)])[tuple(shares)]


def with_judge_requests(trace: Trace, share: float, judged_shares: Sequence[float], seed: int, judge) -> Trace:
    """What the stage serving an LLM judge sees: its own share of the requests plus one
    judge request per answer of every judged stage (prompt = question + answer + the
    grading template, a short rating out). Judge requests are placed at their request's
    arrival time: the planner does not know the stage latencies yet, and the rate, which is
    what sizes the stage, is the same."""
    rng = np.random.default_rng(seed)
    n = len(trace)
    parts = []
    for s, overhead in [(share, None)] + [(j, judge) for j in judged_shares]:
        k = int(round(s * n))
        if k <= 0:
            continue
        idx = np.arange(n) if k >= n else np.sort(rng.choice(n, size=k, replace=False))
        if overhead is None:
            parts.append((trace.arrival_s[idx], trace.input_tokens[idx], trace.output_tokens[idx]))
        else:
            parts.append((trace.arrival_s[idx],
                          trace.input_tokens[idx] + trace.output_tokens[idx] + judge.prompt_overhead_tokens,
                          np.full(idx.size, judge.output_tokens)))
    arrival = np.concatenate([p[0] for p in parts])
    order = np.argsort(arrival, kind="stable")
    arrival = arrival[order] - (arrival[order][0] if arrival.size else 0.0)
    return Trace(f"{trace.name}+judge", arrival, np.concatenate([p[1] for p in parts])[order],
                 np.concatenate([p[2] for p in parts])[order])


def _stages(models, point: RoutingPoint, choices, layouts_by_stage) -> tuple[PlanStage, ...]:
    out = []
    for i, (m, choice) in enumerate(zip(models, choices)):
        last = i == len(models) - 1
        out.append(PlanStage(
            model=m.name, gpu=choice.gpu if choice is not None else "-",
            replicas=tuple(layouts_by_stage[i]), threshold=None if last else point.thresholds[i],
            share=point.stage_shares[i], planned_share=point.planned_shares[i],
            predicted_p95_s=float(choice.p95_latency_s) if choice is not None else None))
    return tuple(out)


def _max_rate(trace: Trace, point: RoutingPoint, choices) -> float | None:
    """The arrival rate at which the first stage to saturate does: each option's capacity
    estimate divided by the fraction of arrivals that reach its stage."""
    rates = [c.max_rate_rps / s for c, s in zip(choices, point.stage_shares)
             if c is not None and s > 0 and math.isfinite(c.max_rate_rps)]
    return float(min(rates)) if rates else None


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _draft(models, cluster, trace, q_min, point, solution, layouts_by_stage, search: RoutingSearchResult,
           quality_source: QualitySource, judge: JudgeInfo, options: PlannerOptions) -> Plan:
    choices = solution.choices
    stage_p95 = [c.p95_latency_s for c in choices if c is not None]
    return Plan(
        models=tuple(models), cluster=cluster, engine=options.engine,
        stages=_stages(models, point, choices, layouts_by_stage), judge=judge,
        quality=QualityInfo(
            predicted=point.quality, target=q_min, all_to_last=search.z1, all_stop_first=search.z2,
            kind=quality_source.kind, source=quality_source.source, stage_to_profile=quality_source.stage_to_profile,
            scale=quality_source.scale, notes=quality_source.notes),
        prediction=Prediction(
            e2e_p95_s=math.nan, max_stage_p95_s=float(max(stage_p95)) if stage_p95 else math.nan,
            max_sustainable_rate_rps=_max_rate(trace, point, choices), objective=options.objective,
            solver=str(getattr(solution, "solver", options.solver)), solver_status=str(solution.status),
            solver_objective_s=float(solution.objective_s), solver_bound_s=float(solution.bound_s),
            solver_gap=float(solution.gap), simulation_seed=options.seed,
            simulation_seeds=options.prediction_seeds),
        workload=summarize(trace),
        input_hashes=(("cascade", _hash([m.to_dict() for m in models])),
                      ("cluster", _hash(cluster.describe())), ("options", _hash(repr(options))),
                      ("quality", quality_source.content_hash), ("trace", trace_hash(trace))),
        front=tuple(FrontPoint(p.thresholds, p.quality, p.latency_s) for p in search.front),
    )


def e2e_p95(plan: Plan, trace: Trace, seed: int, n_seeds: int = 1, processes: int | None = None) -> float:
    """p95 of the end-to-end latency pooled over ``n_seeds`` simulations (seed, seed+1, ...);
    inf when a simulation leaves requests unfinished. The seeds run in up to ``processes``
    worker processes (default 2; 1 runs them here)."""
    seeds = [seed + k for k in range(n_seeds)]
    workers = min(len(seeds), 2 if processes is None else processes)
    if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            runs = pool.starmap(_simulated_e2e, [(plan, trace, s) for s in seeds])
    else:
        runs = [_simulated_e2e(plan, trace, s) for s in seeds]
    if any(r is None for r in runs):
        return math.inf
    return float(np.percentile(np.concatenate(runs), 95))


def _simulated_e2e(plan: Plan, trace: Trace, seed: int) -> np.ndarray | None:
    """Per-request end-to-end latencies of one seeded simulation; None if some request
    never finished."""
    result = simulate_plan(plan, trace, seed)
    return None if result.n_unfinished else np.asarray(result.e2e_s)


def plan(cascade_models: Sequence[ModelSpec], cluster: ClusterSpec, trace: Trace, profile: QualityProfile,
         q_min: float, *, quality_source: QualitySource, judge: JudgeInfo | None = None,
         options: PlannerOptions = PlannerOptions(), backends: Backends | None = None,
         progress: Progress | None = None) -> Plan | Infeasible:
    """The plan that meets ``q_min`` at the lowest latency on ``cluster`` for ``trace``.

    ``profile`` must already be stage-named and on 0-100 (planner/quality_input.py).
    ``progress(event, n)``: events "table", "milp", "eval", "simulate".

    With ``options.sub_cascades`` every sub-cascade that can reach ``q_min`` is planned too
    (a single model needs no judge; a sub-cascade without the model that serves an LLM
    judge is skipped), and the plan with the lowest predicted end-to-end p95 (the
    full-cascade simulation every plan carries, whatever the MILP objective) wins; ties go
    to the longer cascade. The plan's ``alternatives`` lists what each one predicted.
    """
    wall0 = time.perf_counter()
    models = list(cascade_models)
    bad = check_inputs(models, cluster, trace, profile, q_min, options)
    if bad is not None:
        return bad
    backends = backends or default_backends()
    judge = judge or JudgeInfo(name=f"profile judge ({quality_source.kind})", score_low=0.0, score_high=100.0)
    try:
        judge.load_on([m.name for m in models])
    except ValueError as e:
        return Infeasible(str(e))
    if not options.sub_cascades or len(models) == 1:
        return _plan_cascade(models, cluster, trace, profile, q_min, quality_source, judge, options, backends,
                             progress, tuple(range(len(models))), wall0)
    results: list[tuple[str, Plan | Infeasible | str]] = []
    for keep in sub_cascade_indices(len(models)):
        label = " -> ".join(models[i].name for i in keep)
        sub_profile = restrict_profile(profile, keep)
        # the full cascade's reachable quality was checked by check_inputs already
        if len(keep) < len(models) and best_reachable_quality(sub_profile, options.max_points_per_stage) < q_min - 1e-9:
            results.append((label, "cannot reach q_min"))
            continue
        sub_judge = judge
        if len(keep) == 1:
            sub_judge = replace(judge, served_by=None)  # nothing to judge
        elif judge.served_by and judge.served_by not in [models[i].name for i in keep]:
            results.append((label, f"the judge's model {judge.served_by} is not in it"))
            continue
        out = _plan_cascade([models[i] for i in keep], cluster, trace, sub_profile, q_min,
                            restrict_source(quality_source, keep), sub_judge, options, backends, progress, keep,
                            time.perf_counter())
        results.append((label, out))
    return _best_of(results, wall0)


def sub_cascade_indices(n_models: int) -> list[tuple[int, ...]]:
    """Every non-empty ordered subset of the cascade's stages, the full cascade first,
    then longer before shorter (the order ties are broken in)."""
    return [keep for r in range(n_models, 0, -1) for keep in itertools.combinations(range(n_models), r)]


def restrict_profile(profile: QualityProfile, keep: Sequence[int]) -> QualityProfile:
    """The profile of the stages in ``keep`` (columns in that order)."""
    cols = list(keep)
    return replace(profile, models=tuple(profile.models[i] for i in cols),
                   routing_scores=profile.routing_scores[:, cols], quality_scores=profile.quality_scores[:, cols])


def restrict_source(source: QualitySource, keep: Sequence[int]) -> QualitySource:
    pairs = source.stage_to_profile
    return replace(source, stage_to_profile=tuple(pairs[i] for i in keep if i < len(pairs)))


def _best_of(results: list[tuple[str, Any]], wall0: float) -> Plan | Infeasible:
    plans = [(label, p) for label, p in results if isinstance(p, Plan)]
    if not plans:
        reasons = "; ".join(f"{label}: {p if isinstance(p, str) else p.reason}" for label, p in results)
        return Infeasible(f"no cascade or sub-cascade has a plan ({reasons})")
    # ties (within 0.1%) go to the earlier, longer cascade
    best = plans[0][1]
    for _, p in plans[1:]:
        if p.prediction.e2e_p95_s < best.prediction.e2e_p95_s * (1 - 1e-3):
            best = p
    alternatives = tuple((label, float(p.prediction.e2e_p95_s) if isinstance(p, Plan) else math.nan,
                          "" if isinstance(p, Plan) else (p if isinstance(p, str) else p.reason))
                         for label, p in results)
    totals: dict[str, float] = {}
    for _, p in plans:
        for k, v in p.search:
            totals[k] = totals.get(k, 0.0) + v
    totals["sub_cascades_planned"] = float(len(plans))
    totals["planner_wall_s"] = time.perf_counter() - wall0
    return replace(best, alternatives=alternatives, search=tuple(totals.items()))


def _plan_cascade(models: list[ModelSpec], cluster: ClusterSpec, trace: Trace, profile: QualityProfile, q_min: float,
                  quality_source: QualitySource, judge: JudgeInfo, options: PlannerOptions, backends: Backends,
                  progress: Progress | None, stage_ids: Sequence[int], wall0: float) -> Plan | Infeasible:
    """The bi-level search for one cascade (inputs already checked)."""
    level = _DeploymentLevel(models, cluster, trace, options, backends, progress, judge, stage_ids)
    search = search_routing(
        profile, level, q_min, share_quantum=options.share_quantum, max_points_per_stage=options.max_points_per_stage,
        coarse_points=options.coarse_points, stable_rounds=options.stable_rounds,
        progress=(lambda n: progress("eval", n)) if progress else None)
    if search.best is None:
        return Infeasible(f"no deployment of {[m.name for m in models]} fits {cluster.describe()} for any routing")
    if not search.meets_target:
        return Infeasible(f"no routing reaches q_min {q_min:g} with a feasible deployment "
                          f"(best {search.best.quality:.1f})")
    candidates = [p for p in search.ranked() if p.quality >= q_min - 1e-9][: max(1, options.rescore_top)]
    scored: list[tuple[float, float, Plan]] = []
    simulations = 0
    for point in candidates:
        solution = point.solution
        stage_gpus = [c.gpu if c is not None else None for c in solution.choices]
        placed = backends.place(cluster, [c.layouts if c is not None else () for c in solution.choices], stage_gpus)
        if not isinstance(placed, (tuple, list)):
            continue  # Infeasible placement: try the next candidate
        draft = _draft(models, cluster, trace, q_min, point, solution, placed, search, quality_source, judge, options)
        p95 = e2e_p95(draft, trace, options.seed, options.prediction_seeds, options.processes)
        simulations += options.prediction_seeds
        if progress:
            progress("simulate", 1)
        draft = replace(draft, prediction=replace(draft.prediction, e2e_p95_s=p95))
        rank = p95 if options.objective == "end-to-end" else float(solution.objective_s)
        scored.append((rank, p95, draft))
        if options.objective == "max-stage":
            break  # the MILP's order is the objective; the simulation only predicts
    if not scored:
        return Infeasible("the best deployments could not be placed on the cluster's nodes")
    best = min(scored, key=lambda t: (t[0], t[1]))[2]
    best = replace(best, search=(
        ("threshold_grid_points", float(np.prod(search.grid_size)) if search.grid_size else 1.0),
        ("routing_evaluations", float(len(search.evaluated))), ("search_rounds", float(search.rounds)),
        ("milp_solves", float(level.solves)), ("milp_memo_hits", float(search.memo_hits)),
        ("latency_tables", float(len(level.tables))), ("cascade_simulations", float(simulations)),
        *((("table_simulations", float(level.table_stats.simulations)),
           ("table_cache_hits", float(level.table_stats.cache_hits))) if level.table_stats else ()),
        ("planner_wall_s", time.perf_counter() - wall0)))
    problems = backends.verify_plan(best, cluster)
    if problems:
        return Infeasible("the chosen plan failed verification: " + "; ".join(problems))
    return best


@dataclass(frozen=True)
class ReplanDecision:
    """Whether to roll out a new plan for the recent workload, and how (``diff``)."""

    replan: bool
    plan: Plan  # the plan to serve with: the new one, or the current one kept
    diff: Any  # cascadia.plan_diff.PlanDiff; empty when the current plan is kept
    current_p95_s: float  # current plan, simulated on the recent workload
    new_p95_s: float  # re-planned, on the same workload (inf when re-planning failed)
    reason: str


def replan(current: Plan, recent: Trace, profile: QualityProfile, *, quality_source: QualitySource,
           margin: float = 0.15, slo_p95_s: float | None = None, options: PlannerOptions | None = None,
           backends: Backends | None = None, cascade_models: Sequence[ModelSpec] | None = None) -> ReplanDecision:
    """Re-plan for ``recent`` only when it pays: the new plan's predicted end-to-end p95
    beats the current plan's on the same workload by more than ``margin`` (relative), or
    the current plan is predicted to miss ``slo_p95_s`` or to leave requests unfinished
    and the new plan does better. The margin is the hysteresis: going back needs another
    gain of more than ``margin``, so two similar workloads do not make plans flip-flop.
    ``cascade_models`` (with ``profile`` in their order) is the cascade to re-plan, by
    default the plan's own models: pass the requested cascade when the current plan is a
    sub-cascade of it, so a skipped stage can come back."""
    from cascadia.plan_diff import PlanDiff, diff

    opts = options or PlannerOptions(objective=current.prediction.objective, solver=current.prediction.solver
                                     if current.prediction.solver in ("cbc", "highs") else "cbc",
                                     engine=current.engine, seed=current.prediction.simulation_seed)
    keep = PlanDiff((), tuple((i, r) for i, s in enumerate(current.stages) for r in s.replicas))
    now = e2e_p95(current, recent, opts.seed, opts.prediction_seeds, opts.processes)
    target = current.quality.target if current.quality.target is not None else current.quality.predicted
    new = plan(list(cascade_models or current.models), current.cluster, recent, profile, target,
               quality_source=quality_source,
               judge=current.judge, options=opts, backends=backends)
    if isinstance(new, Infeasible):
        return ReplanDecision(False, current, keep, now, math.inf, f"kept: re-planning failed ({new.reason})")
    after = new.prediction.e2e_p95_s
    missing = not math.isfinite(now) or (slo_p95_s is not None and now > slo_p95_s)
    gain = (now - after) / now if math.isfinite(now) and now > 0 else math.inf
    if missing and after < now:
        why = "current plan misses its SLO" if math.isfinite(now) else "current plan leaves requests unfinished"
        return ReplanDecision(True, new, diff(current, new), now, after, f"re-planned: {why}")
    if gain > margin:
        return ReplanDecision(True, new, diff(current, new), now, after,
                              f"re-planned: predicted p95 {now:.2f} s -> {after:.2f} s ({gain:.0%} > {margin:.0%})")
    return ReplanDecision(False, current, keep, now, after,
                          f"kept: gain {gain:.0%} is within the {margin:.0%} margin")
