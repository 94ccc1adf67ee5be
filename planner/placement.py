"""Replicas onto the nodes of a cluster: first-fit decreasing per GPU type.

Nodes are numbered across the whole cluster in pool order (pool 0's nodes first). A
replica whose GPUs fit in one node stays in one node (all its pipeline stages there); a
larger one, or one that no node has room for, is split at pipeline-stage boundaries, each
TP group inside one node, consecutive stages kept on the same node when it has room. A TP
group never spans nodes.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from cascadia.perf.layout import Layout
from cascadia.specs.cluster import ClusterSpec
from planner.milp import Infeasible


def node_table(cluster: ClusterSpec) -> list[tuple[str, int]]:
    """(GPU type, GPUs) of every node, indexed by the global node number."""
    return [(pool.gpu.name, pool.gpus_per_node) for pool in cluster.pools for _ in range(pool.n_nodes)]


def _place_replica(layout: Layout, nodes: list[int], free: list[int]) -> tuple[int, ...] | None:
    """Node of each pipeline stage, taking GPUs from `free`; None (and `free` untouched)
    when the replica does not fit."""
    whole = next((n for n in nodes if free[n] >= layout.n_gpus), None)
    if whole is not None:
        free[whole] -= layout.n_gpus
        return (whole,) * layout.pp
    if layout.pp == 1:
        return None
    taken: list[int] = []
    for _ in range(layout.pp):
        here = taken[-1] if taken and free[taken[-1]] >= layout.tp else None
        if here is None:
            here = next((n for n in nodes if free[n] >= layout.tp), None)
        if here is None:
            for n in taken:
                free[n] += layout.tp
            return None
        free[here] -= layout.tp
        taken.append(here)
    return tuple(taken)


def place(cluster: ClusterSpec, stage_layouts: Sequence[tuple[Layout, ...]],
          stage_gpus: Sequence[str]) -> tuple[tuple[Layout, ...], ...] | Infeasible:
    """The same layouts with `stage_nodes` filled, or Infeasible naming the replica that
    does not fit. Biggest replicas are placed first (first-fit decreasing)."""
    if len(stage_layouts) != len(stage_gpus):
        raise ValueError(f"{len(stage_layouts)} stages of layouts but {len(stage_gpus)} GPU types")
    table = node_table(cluster)
    free = [gpus for _, gpus in table]
    order = sorted(((i, r) for i, lays in enumerate(stage_layouts) for r in range(len(lays))),
                   key=lambda ir: (-stage_layouts[ir[0]][ir[1]].n_gpus, -stage_layouts[ir[0]][ir[1]].tp, ir))
    placed: dict[tuple[int, int], tuple[int, ...]] = {}
    for i, r in order:
        lay = stage_layouts[i][r]
        gpu = stage_gpus[i]
        nodes = [n for n, (t, _) in enumerate(table) if t.lower() == gpu.lower()]
        if not nodes:
            return Infeasible(f"stage {i + 1} runs on {gpu} but the cluster ({cluster.describe()}) has no {gpu} nodes",
                              "placement")
        where = _place_replica(lay, nodes, free)
        if where is None:
            most = max(free[n] for n in nodes)
            per_node = max(table[n][1] for n in nodes)
            if lay.tp > per_node:
                why = f"its TP group of {lay.tp} is larger than a {gpu} node ({per_node} GPUs)"
            else:
                need = lay.n_gpus if lay.pp == 1 else lay.tp
                why = (f"it needs {need} free {gpu} in one node but the most left in any {gpu} node is {most} "
                       f"({sum(free[n] for n in nodes)} {gpu} free in all)")
            return Infeasible(f"stage {i + 1} replica {r + 1} ({lay.describe()}) does not fit: {why}", "placement")
        placed[(i, r)] = where
    return tuple(tuple(replace(lay, stage_nodes=placed[(i, r)]) for r, lay in enumerate(lays))
                 for i, lays in enumerate(stage_layouts))
