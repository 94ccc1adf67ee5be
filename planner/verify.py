"""Independent re-checks of a deployment: nothing the solver or the search said is trusted.
Each check returns the problems it found as sentences; an empty list means the deployment
is sound."""

from __future__ import annotations

from typing import Sequence

from cascadia.perf.layout import Layout
from cascadia.perf.memory import LayoutDoesNotFit, plan_memory
from cascadia.sim.config import EngineConfig
from cascadia.specs.cluster import ClusterSpec
from cascadia.specs.model import ModelSpec
from planner.milp import Infeasible
from planner.parallelism import LayoutOption
from planner.placement import node_table, place


def _gpu_counts(cluster: ClusterSpec, choices: Sequence[LayoutOption | None]) -> list[str]:
    have = cluster.gpu_counts()
    canonical = {t.lower(): t for t in have}
    used: dict[str, int] = {}
    problems = []
    for i, c in enumerate(choices):
        if c is None:
            continue
        if c.used_gpus > c.n_gpus:
            problems.append(f"stage {i + 1} ({c.model}): its replicas use {c.used_gpus} GPUs but it is given {c.n_gpus}")
        t = canonical.get(c.gpu.lower(), c.gpu)
        used[t] = used.get(t, 0) + c.n_gpus
    for t, n in sorted(used.items()):
        if n > have.get(t, 0):
            problems.append(f"the stages take {n} {t} GPUs but the cluster has {have.get(t, 0)}")
    return problems


def _memory(cluster: ClusterSpec, model: ModelSpec, choice: LayoutOption, engine: EngineConfig, i: int) -> list[str]:
    pools = [p for p in cluster.pools if p.gpu.name.lower() == choice.gpu.lower()]
    if not pools:
        return [f"stage {i + 1} ({model.name}) runs on {choice.gpu}, which the cluster does not have"]
    problems = []
    for pool in pools:  # the pool's own GPU spec: a cluster file may override its memory
        for r, lay in enumerate(choice.layouts):
            try:
                plan_memory(model, pool.gpu, Layout(lay.tp, lay.pp), gpu_memory_utilization=engine.gpu_memory_utilization,
                            max_num_batched_tokens=engine.max_num_batched_tokens, max_num_seqs=engine.max_num_seqs,
                            block_size_tokens=engine.block_size_tokens, kv_cache_bytes=engine.kv_cache_bytes,
                            min_kv_tokens=engine.min_kv_tokens)
            except LayoutDoesNotFit as e:
                problems.append(f"stage {i + 1} replica {r + 1}: {e}")
    return problems


def _placement(cluster: ClusterSpec, choices: Sequence[LayoutOption | None]) -> list[str]:
    """Given node assignments must be valid (TP inside a node, capacity per node);
    missing ones must be findable by first-fit decreasing."""
    table = node_table(cluster)
    used = [0] * len(table)
    problems, unplaced = [], []
    for i, c in enumerate(choices):
        if c is None:
            continue
        for r, lay in enumerate(c.layouts):
            if lay.stage_nodes is None:
                unplaced.append((i, r))
                continue
            for s, n in enumerate(lay.stage_nodes):
                if not 0 <= n < len(table):
                    problems.append(f"stage {i + 1} replica {r + 1}: pipeline stage {s + 1} is on node {n}, "
                                    f"which does not exist (the cluster has {len(table)})")
                elif table[n][0].lower() != c.gpu.lower():
                    problems.append(f"stage {i + 1} replica {r + 1}: node {n} has {table[n][0]}, not {c.gpu}")
                else:
                    used[n] += lay.tp
    for n, (t, cap) in enumerate(table):
        if used[n] > cap:
            problems.append(f"node {n} ({t}) is given {used[n]} GPUs but has {cap}")
    if unplaced and not problems:
        present = [c for c in choices if c is not None]
        if len(unplaced) < sum(len(c.layouts) for c in present):
            problems.append("some replicas have node assignments and others do not; place all or none")
        else:
            result = place(cluster, [tuple(c.layouts) if c else () for c in choices],
                           [c.gpu if c else "" for c in choices])
            if isinstance(result, Infeasible):
                problems.append(result.reason)
    return problems


def verify_deployment(cluster: ClusterSpec, models: Sequence[ModelSpec], choices: Sequence[LayoutOption | None],
                      engine: EngineConfig = EngineConfig()) -> list[str]:
    """Problems with a deployment (empty = ok): GPUs per type, memory of every replica,
    TP groups within a node, node placement."""
    if len(models) != len(choices):
        return [f"{len(models)} models but {len(choices)} stage choices"]
    problems = _gpu_counts(cluster, choices)
    per_node = {p.gpu.name.lower(): max(q.gpus_per_node for q in cluster.pools if q.gpu.name == p.gpu.name)
                for p in cluster.pools}
    for i, (m, c) in enumerate(zip(models, choices)):
        if c is None:
            continue
        if c.model != m.name:
            problems.append(f"stage {i + 1}: the option is for {c.model} but the stage serves {m.name}")
        for r, lay in enumerate(c.layouts):
            if lay.tp > per_node.get(c.gpu.lower(), 0):
                problems.append(f"stage {i + 1} replica {r + 1} ({lay.describe()}): a TP group of {lay.tp} does not fit "
                                f"in a {c.gpu} node ({per_node.get(c.gpu.lower(), 0)} GPUs)")
        problems += _memory(cluster, m, c, engine, i)
    if not problems:
        problems += _placement(cluster, choices)
    return problems


# ---- verify_plan (owner: planner-route): a plan file re-checked from its own contents ----
def _plan_level(plan) -> list[str]:
    """What a plan claims about routing that must hold whatever the deployment is."""
    problems = []
    shares = [s.share for s in plan.stages]
    if abs(shares[0] - 1.0) > 1e-9 or any(b > a + 1e-9 for a, b in zip(shares, shares[1:])):
        problems.append(f"stage shares must start at 1 and not increase, got {shares}")
    for i, s in enumerate(plan.stages):
        if s.share > 0 and not s.replicas:
            problems.append(f"stage {i + 1} ({s.model}) sees {s.share:.1%} of requests but has no replicas")
        if s.planned_share + 1e-9 < s.share:
            problems.append(f"stage {i + 1} ({s.model}) was sized for {s.planned_share:.1%} of requests but "
                            f"sees {s.share:.1%}")
        if (s.threshold is None) != (i == len(plan.stages) - 1):
            problems.append(f"stage {i + 1} ({s.model}): only the last stage has no threshold")
    if [m.name for m in plan.models] != [s.model for s in plan.stages]:
        problems.append("the plan's stages are not its cascade's models in order")
    return problems


def verify_plan(plan, cluster: ClusterSpec | None = None) -> list[str]:
    """Problems with ``plan`` on ``cluster`` (default: the cluster stored in the plan); empty
    = ok. Converts the plan's stages back to deployment choices and runs
    ``verify_deployment`` on them, so GPU counts, memory and node placement are checked
    from the layouts themselves, never from what the planner reported."""
    cluster = cluster if cluster is not None else plan.cluster
    problems = _plan_level(plan)
    choices = [LayoutOption(s.model, s.gpu, s.n_gpus, tuple(s.replicas), float("nan"), float("nan"), float("nan"))
               if s.replicas else None for s in plan.stages]
    return problems + verify_deployment(cluster, plan.models, choices, plan.engine)
