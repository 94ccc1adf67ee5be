"""Parallelism search: the best replica layout of one model on f GPUs of one type, for the
workload its cascade stage sees, as the table l_i(f) -> (p95 latency, layouts) that the
deployment MILP chooses from.

Enumeration (bounded on purpose, so a 32-GPU table takes seconds):
- replica shapes: tp divides the attention heads and fits in a node (tp <= gpus_per_node),
  pp = 1. Only when no such shape holds the model does a replica span nodes: then it is
  the widest in-node tp with the fewest pipeline stages that fit (tp * pp > gpus_per_node);
- a layout is at most two distinct shapes: replicas of a main shape A plus a remainder of a
  smaller shape B that fills fewer GPUs than one more A would;
- memory-infeasible shapes (plan_memory raises LayoutDoesNotFit) never enter;
- layouts are enumerated by the GPUs they use exactly; the table at f is the best layout
  using <= f GPUs (spare GPUs may stay idle), so a layout is never simulated twice and the
  table is non-increasing in f.

Pruning before simulating (each rule saves simulations, none changes a table entry by more
than `min_gain`): a layout whose estimated capacity is below the offered rate is
overloaded without simulating; a layout whose unloaded p95 floor (its fastest shape serving
every request alone) cannot beat the best layout on fewer GPUs by more than `min_gain` is
skipped, and the search stops once the best is within `min_gain` of the floor of every shape.

Overload rule: a layout is *overloaded* when the offered rate exceeds its estimated capacity
(the sum of its replicas' flood throughput; such a layout is not simulated), when the
simulation leaves requests unfinished, or when a backlog builds over the window. Backlog is
judged on queueing delay and slowdown, not raw latency: a request's delay is its latency
minus its unloaded latency (served alone on the layout's fastest shape, simulated once per
shape) and its slowdown their ratio, so a window whose later requests are merely longer is
not mistaken for one that queues. The layout is backlogged when the median delay of the
last quarter of arrivals is over twice that of the first quarter and has grown by more
than BACKLOG_MIN_RISE of the window's duration, while the last quarter's median slowdown
is above BACKLOG_MIN_SLOWDOWN (a steady, busy layout is not backlogged). Overloaded
options carry `overloaded=True` and a large but finite latency, OVERLOADED_LATENCY_S times
the load ratio (at least 1), so the MILP only picks one when nothing else fits and then the
least overloaded.

Window length: tables simulate the stage's first requests, at least `min_requests` and
enough to cover `min_window_s` of traffic (at most `max_requests`). Too short a window hides
queues that would build (a layout near capacity looks fine for a few seconds) and the
planner under-provisions. The defaults: 20 s of traffic, at least 256 and at most 1,024
requests (a bound on planning time; the experiments use 2,048).
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cascadia.perf.iteration import Efficiency
from cascadia.perf.layout import Layout
from cascadia.perf.memory import LayoutDoesNotFit, plan_memory
from cascadia.sim.cluster import StageDeployment, simulate
from cascadia.sim.config import EngineConfig
from cascadia.specs.gpu import GPUSpec
from cascadia.specs.model import ModelSpec
from cascadia.traces import Trace

TABLE_CODE_VERSION = "parallelism-3"  # bump when the search or the simulator changes results
OVERLOADED_LATENCY_S = 1000.0
OVERLOAD_CAPACITY_FACTOR = 1.0  # offered rate / estimated capacity above which a layout is overloaded
DEFAULT_MAX_REQUESTS = 1024
DEFAULT_MIN_REQUESTS = 256
DEFAULT_MIN_WINDOW_S = 20.0
BACKLOG_MIN_SLOWDOWN = 1.5
BACKLOG_MIN_RISE = 0.05


@dataclass(frozen=True)
class LayoutOption:
    model: str
    gpu: str
    n_gpus: int  # f: GPUs the stage is given; the layouts may leave some idle
    layouts: tuple[Layout, ...]
    p95_latency_s: float
    mean_latency_s: float
    max_rate_rps: float
    overloaded: bool = False

    @property
    def used_gpus(self) -> int:
        return sum(lay.n_gpus for lay in self.layouts)


@dataclass
class TableStats:
    """Counters a caller passes in to learn what `latency_table` did (it only adds)."""

    simulations: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    pruned: int = 0


def stage_trace(trace: Trace, share: float, seed: int) -> Trace:
    """The requests a stage sees: round(share * n) of them, chosen at random (seeded)."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"stage share must be in [0, 1], got {share}")
    n = len(trace)
    k = int(round(share * n))
    if k >= n:
        return trace
    idx = np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))
    return trace.select(idx)


def _fits(model: ModelSpec, gpu: GPUSpec, layout: Layout, engine: EngineConfig) -> bool:
    try:
        plan_memory(model, gpu, layout, gpu_memory_utilization=engine.gpu_memory_utilization,
                    max_num_batched_tokens=engine.max_num_batched_tokens, max_num_seqs=engine.max_num_seqs,
                    block_size_tokens=engine.block_size_tokens, kv_cache_bytes=engine.kv_cache_bytes,
                    min_kv_tokens=engine.min_kv_tokens)
    except LayoutDoesNotFit:
        return False
    return True


def replica_shapes(model: ModelSpec, gpu: GPUSpec, gpus_per_node: int, engine: EngineConfig,
                   max_gpus: int) -> list[Layout]:
    """Memory-feasible replica shapes, largest first (see the module docstring)."""
    tps = [t for t in range(1, min(gpus_per_node, model.n_heads) + 1) if model.n_heads % t == 0]
    in_node = [Layout(t, 1) for t in tps if t <= max_gpus and _fits(model, gpu, Layout(t, 1), engine)]
    if in_node:
        return sorted(in_node, key=lambda lay: -lay.n_gpus)
    tp = max(tps)
    for pp in range(2, min(model.n_layers, max_gpus // tp) + 1):
        lay = Layout(tp, pp)
        if lay.n_gpus > gpus_per_node and _fits(model, gpu, lay, engine):
            return [lay]
    return []


def _layouts_using(shapes: Sequence[Layout], n_gpus: int) -> list[tuple[Layout, ...]]:
    out = []
    for a_shape in shapes:
        a_size = a_shape.n_gpus
        if n_gpus % a_size == 0:
            out.append((a_shape,) * (n_gpus // a_size))
        for b_shape in shapes:
            b_size = b_shape.n_gpus
            if b_size >= a_size:
                continue
            for b in range(1, (a_size - 1) // b_size + 1):
                rest = n_gpus - b * b_size
                if rest >= a_size and rest % a_size == 0:
                    out.append((a_shape,) * (rest // a_size) + (b_shape,) * b)
    return out


def candidate_layouts(model: ModelSpec, gpu: GPUSpec, n_gpus: int, gpus_per_node: int,
                      engine: EngineConfig = EngineConfig()) -> list[tuple[Layout, ...]]:
    """Layouts (one Layout per replica) that use exactly `n_gpus` GPUs; fewer-GPU layouts
    are the candidates of smaller counts (the table takes the best over <= f)."""
    return _layouts_using(replica_shapes(model, gpu, gpus_per_node, engine, n_gpus), n_gpus)


# ---- simulation (runs in worker processes; the context is set once per worker) ----
_CTX: dict = {}


def _init_worker(ctx: dict) -> None:
    _CTX.clear()
    _CTX.update(ctx)


def _deployment(layouts: tuple[Layout, ...]) -> StageDeployment:
    c = _CTX
    return StageDeployment(c["model"], c["gpu"], layouts, c["engine"], c["efficiency"], c["gpus_per_node"])


def _simulate_layout(task: tuple[tuple[Layout, ...], np.ndarray]) -> tuple[float, float, bool]:
    """(p95 s, mean s, overloaded by the simulation rule) on the stage trace; `unloaded_s`
    is each request's latency served alone on the layout's fastest shape."""
    layouts, unloaded_s = task
    trace: Trace = _CTX["trace"]
    res = simulate(trace, _deployment(layouts))
    e2e = res.e2e_s
    if res.n_unfinished:
        return float("nan"), float("nan"), True
    return float(np.percentile(e2e, 95)), float(np.mean(e2e)), backlogged(e2e, unloaded_s, trace.duration_s)


def backlogged(e2e_s: np.ndarray, unloaded_s: np.ndarray, duration_s: float) -> bool:
    """True when a queue builds over the window (module docstring: the overload rule).
    Requests are in arrival order."""
    n = len(e2e_s)
    quarter = max(1, n // 4)
    delay = e2e_s - unloaded_s
    late_slowdown = float(np.median(e2e_s[-quarter:] / np.maximum(unloaded_s[-quarter:], 1e-9)))
    early, late = float(np.median(delay[:quarter])), float(np.median(delay[-quarter:]))
    return late > 2.0 * early and late - early > BACKLOG_MIN_RISE * duration_s and late_slowdown > BACKLOG_MIN_SLOWDOWN


def _shape_profile(shape: Layout) -> tuple[float, float, np.ndarray]:
    """(unloaded p95 floor s, capacity rps, per-request unloaded latency s) of one replica
    of `shape`. The floor serves every request alone; the capacity is the completion rate
    in the middle of a flood of at least three full batches (the head and tail of a flood
    are not steady)."""
    trace: Trace = _CTX["trace"]
    n = len(trace)
    alone = Trace("alone", np.arange(n) * 1e6, trace.input_tokens, trace.output_tokens)
    floor = simulate(alone, _deployment((shape,))).e2e_s
    reps = max(1, math.ceil(3 * _CTX["engine"].max_num_seqs / n))
    flood = Trace("flood", np.zeros(n * reps), np.tile(trace.input_tokens, reps), np.tile(trace.output_tokens, reps))
    res = simulate(flood, _deployment((shape,)))
    done = np.sort(res.e2e_s[np.isfinite(res.e2e_s)])
    lo, hi = int(0.2 * len(done)), int(0.8 * len(done))
    capacity = (hi - lo) / (done[hi] - done[lo]) if hi > lo and done[hi] > done[lo] else float("nan")
    p95 = float(np.nanpercentile(floor, 95)) if np.isfinite(floor).any() else float("inf")
    return p95, float(capacity), np.asarray(floor, dtype=float)


def _run(tasks: list, fn: Callable, pool) -> list:
    if pool is None:
        return [fn(t) for t in tasks]
    return pool.map(fn, tasks, chunksize=1)


# ---- cache ----
def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    base = os.environ.get("CASCADIA_CACHE")
    return Path(base) / "tables" if base else Path.home() / ".cache" / "cascadia" / "tables"


def table_key(model: ModelSpec, gpu: GPUSpec, trace: Trace, *, gpus_per_node: int,
              engine: EngineConfig, efficiency: Efficiency | None, min_gain: float) -> str:
    """Hash of everything a table depends on but its length: a cached table for more GPUs
    serves a request for fewer (its first entries), so `max_gpus` is not in the key."""
    h = hashlib.sha256()
    doc = {"code": TABLE_CODE_VERSION, "model": model.to_dict(), "gpu": gpu.to_dict(), "engine": engine.to_dict(),
           "efficiency": efficiency.to_dict() if efficiency else None,
           "gpus_per_node": gpus_per_node, "min_gain": min_gain, "hash_block_tokens": trace.hash_block_tokens}
    h.update(json.dumps(doc, sort_keys=True, default=str).encode())
    for arr in (trace.arrival_s, trace.input_tokens, trace.output_tokens):
        h.update(np.ascontiguousarray(arr).tobytes())
    if trace.hash_ids is not None:
        h.update(repr(trace.hash_ids).encode())
    return h.hexdigest()[:32]


def _option_to_json(o: LayoutOption) -> dict:
    return {"n_gpus": o.n_gpus, "layouts": [[lay.tp, lay.pp] for lay in o.layouts], "p95": o.p95_latency_s,
            "mean": o.mean_latency_s, "max_rate": o.max_rate_rps, "overloaded": o.overloaded}


def _load_cached(path: Path, model: str, gpu: str, max_gpus: int) -> tuple[dict[int, LayoutOption], int] | None:
    """(the cached table's entries up to `max_gpus`, the GPU count it was built for), or
    None when there is no readable cached table (rebuild)."""
    try:
        doc = json.loads(path.read_text())
        built_for = int(doc["max_gpus"])
        return {int(e["n_gpus"]): LayoutOption(model, gpu, int(e["n_gpus"]),
                                               tuple(Layout(tp, pp) for tp, pp in e["layouts"]), float(e["p95"]),
                                               float(e["mean"]), float(e["max_rate"]), bool(e["overloaded"]))
                for e in doc["options"] if int(e["n_gpus"]) <= max_gpus}, built_for
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _store(path: Path, table: dict[int, LayoutOption], max_gpus: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"code": TABLE_CODE_VERSION, "max_gpus": max_gpus,
                               "options": [_option_to_json(o) for o in table.values()]}))
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one


# ---- the table ----
def table_window(trace: Trace, *, min_requests: int = DEFAULT_MIN_REQUESTS, min_window_s: float = DEFAULT_MIN_WINDOW_S,
                 max_requests: int = DEFAULT_MAX_REQUESTS) -> int:
    """How many of the stage's first requests a table simulates: enough to span
    `min_window_s` of arrivals, at least `min_requests`, at most `max_requests` (which wins)."""
    covering = int(np.searchsorted(trace.arrival_s, trace.arrival_s[0] + min_window_s, side="right")) if len(trace) else 0
    return min(len(trace), max_requests, max(min_requests, covering))


def latency_table(model: ModelSpec, gpu: GPUSpec, trace_for_stage: Trace, *, max_gpus: int, gpus_per_node: int,
                  engine: EngineConfig = EngineConfig(), efficiency: Efficiency | None = None,
                  cache_dir: str | os.PathLike | None = None, processes: int | None = None,
                  progress: Callable[[int, int], None] | None = None, max_requests: int = DEFAULT_MAX_REQUESTS,
                  min_requests: int = DEFAULT_MIN_REQUESTS, min_window_s: float = DEFAULT_MIN_WINDOW_S,
                  min_gain: float = 0.02, use_cache: bool = True,
                  stats: TableStats | None = None) -> dict[int, LayoutOption]:
    """f -> the best option on at most f GPUs, for f = 1..max_gpus; f that cannot hold the
    model are absent. The stage trace is cut to its first requests (`table_window`).
    `progress(f_done, max_gpus)` is called as GPU counts complete."""
    stats = stats if stats is not None else TableStats()
    n = table_window(trace_for_stage, min_requests=min_requests, min_window_s=min_window_s, max_requests=max_requests)
    trace = trace_for_stage.select(slice(0, n)) if len(trace_for_stage) > n else trace_for_stage
    key = table_key(model, gpu, trace, gpus_per_node=gpus_per_node, engine=engine,
                    efficiency=efficiency, min_gain=min_gain)
    path = _cache_root(cache_dir) / f"{model.name}--{gpu.name}--{key}.json"
    prefix: dict[int, LayoutOption] = {}
    if use_cache:
        cached = _load_cached(path, model.name, gpu.name, max_gpus)
        if cached is not None and cached[1] >= max_gpus:
            stats.cache_hits += 1
            return cached[0]
        stats.cache_misses += 1
        if cached is not None:  # built for fewer GPUs: extend it rather than start over
            prefix = cached[0]
    shapes = replica_shapes(model, gpu, gpus_per_node, engine, max_gpus)
    ctx = {"model": model, "gpu": gpu, "engine": engine, "efficiency": efficiency, "gpus_per_node": gpus_per_node,
           "trace": trace}
    processes = 2 if processes is None else processes
    pool = None
    if shapes and len(trace) and processes > 1:
        mp = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
        pool = mp.Pool(processes, initializer=_init_worker, initargs=(ctx,))
    else:
        _init_worker(ctx)
    try:
        table = _search(model, gpu, shapes, trace, max_gpus, min_gain, pool, stats, progress, prefix,
                        workers=processes if pool is not None else 1)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    if use_cache:
        _store(path, table, max_gpus)
    return table


def _search(model, gpu, shapes, trace, max_gpus, min_gain, pool, stats, progress,
            prefix: dict[int, LayoutOption] | None = None, workers: int = 1) -> dict[int, LayoutOption]:
    """The table for f = 1..max_gpus; `prefix` (a table built for fewer GPUs, f = 1..k)
    is kept and the search resumes at k + 1 from its best option. `workers`: the pool's
    processes (1 without a pool)."""
    table: dict[int, LayoutOption] = {}
    if not shapes:
        return table
    if len(trace) == 0:  # a stage nobody visits: any layout serves it instantly
        smallest = min(shapes, key=lambda s: s.n_gpus)
        return {f: LayoutOption(model.name, gpu.name, f, (smallest,), 0.0, 0.0, float("nan"))
                for f in range(smallest.n_gpus, max_gpus + 1)}
    profiles = dict(zip(shapes, _run(shapes, _shape_profile, pool)))
    stats.simulations += 2 * len(shapes)
    offered = trace.mean_rate_rps if len(trace) > 1 else 0.0
    floor_all = min(p[0] for p in profiles.values())
    # GPU counts are evaluated in blocks whose simulations run as one batch, so both cores
    # stay busy; pruning uses the best option found before the block (a few more
    # simulations than strictly sequential pruning, the same table).
    want_tasks = 2 * workers if pool is not None else 1
    best: LayoutOption | None = None
    f = 1
    if prefix:
        table.update(prefix)
        f = max(prefix) + 1
        best = prefix[max(prefix)]
    while f <= max_gpus:
        if best is not None and not best.overloaded and best.p95_latency_s <= floor_all * (1 + min_gain):
            stats.pruned += len(_layouts_using(shapes, f))
            block = [(f, [], [])]
        else:
            block = []
            n_tasks = 0
            while f + len(block) <= max_gpus and (not block or n_tasks < want_tasks):
                to_sim, fixed = _candidates(model, gpu, shapes, profiles, offered, f + len(block), best, min_gain,
                                            stats)
                block.append((f + len(block), to_sim, fixed))
                n_tasks += len(to_sim)
            tasks = [t[0] for _, to_sim, _ in block for t in to_sim]
            results = iter(_run(tasks, _simulate_layout, pool))
            stats.simulations += len(tasks)
            block = [(g, [(t, next(results)) for t in to_sim], fixed) for g, to_sim, fixed in block]
        for g, simulated, fixed in block:
            top = _top(model, gpu, g, simulated, fixed)
            if top is not None and (best is None or top.p95_latency_s < best.p95_latency_s):
                best = top
            if best is not None:
                table[g] = LayoutOption(model.name, gpu.name, g, best.layouts, best.p95_latency_s,
                                        best.mean_latency_s, best.max_rate_rps, best.overloaded)
            if progress is not None:
                progress(g, max_gpus)
        f += len(block)
    return table


def _candidates(model, gpu, shapes, profiles, offered, f, best, min_gain, stats) -> tuple[list, list]:
    """Layouts on exactly f GPUs that could beat `best`: (to simulate, options settled
    without simulating because their estimated capacity is below the offered rate)."""
    to_sim, fixed = [], []
    for layouts in _layouts_using(shapes, f):
        capacity = sum(profiles[s][1] for s in layouts)
        floor = min(profiles[s][0] for s in layouts)
        if best is not None and not best.overloaded and floor * (1 + min_gain) >= best.p95_latency_s:
            stats.pruned += 1
            continue
        load = offered / capacity if capacity > 0 else float("inf")
        if np.isfinite(load) and load > OVERLOAD_CAPACITY_FACTOR:
            stats.pruned += 1
            penalty = OVERLOADED_LATENCY_S * load
            fixed.append(LayoutOption(model.name, gpu.name, f, layouts, penalty, penalty, capacity, True))
            continue
        unloaded = np.min([profiles[s][2] for s in set(layouts)], axis=0)
        to_sim.append(((layouts, unloaded), capacity, load))
    return to_sim, fixed


def _top(model, gpu, f, simulated, fixed) -> LayoutOption | None:
    """The best option on exactly f GPUs, from simulated candidates and settled ones."""
    options = list(fixed)
    for ((layouts, _), capacity, load), (p95, mean, overloaded) in simulated:
        if overloaded:
            p95 = mean = OVERLOADED_LATENCY_S * max(1.0, load if np.isfinite(load) else 1.0) + (
                p95 if np.isfinite(p95) else OVERLOADED_LATENCY_S)
        options.append(LayoutOption(model.name, gpu.name, f, layouts, p95, mean, capacity, overloaded))
    return min(options, key=lambda o: (o.p95_latency_s, o.mean_latency_s, len(o.layouts))) if options else None
