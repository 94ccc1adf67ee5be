"""Event loop: requests arrive, a dispatcher sends each to the engine of its stage with the
least outstanding work, engines run iterations, finished stage visits either answer or,
after the judge, go to the next stage of the cascade.

Events sit in a heap ordered by (time, priority, sequence number); at one instant,
arrivals come first, then run ends, then wake-ups of idle engines, so an engine sees
every request that has arrived by the time it schedules (requests sent together are
batched together, as a real engine's next schedule would).
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from cascadia.perf.iteration import Efficiency, IterationModel
from cascadia.perf.layout import Layout
from cascadia.perf.memory import plan_memory
from cascadia.sim.config import EngineConfig
from cascadia.sim.engine import SimEngine, SimSeq
from cascadia.sim.results import SimResult
from cascadia.specs.gpu import GPUSpec
from cascadia.specs.model import ModelSpec
from cascadia.traces import Trace

ARRIVAL, RUN_END, WAKE = 0, 1, 2


@dataclass(frozen=True)
class StageDeployment:
    """One cascade stage: a model on replicas of given layouts, all of one GPU type."""

    model: ModelSpec
    gpu: GPUSpec
    layouts: tuple[Layout, ...]
    engine: EngineConfig = field(default_factory=EngineConfig)
    efficiency: Efficiency | None = None
    gpus_per_node: int | None = None

    @property
    def n_gpus(self) -> int:
        return sum(lay.n_gpus for lay in self.layouts)


def build_engines(stage: StageDeployment, stage_index: int, fast_forward: bool,
                  hash_block_tokens: int) -> list[SimEngine]:
    """Engines of a stage. A replica with pp > 1 runs pp virtual engines (vLLM's way of
    keeping every pipeline stage busy), each with its share of the KV cache and the full
    pipeline latency per iteration; staggered, they do not contend for a stage."""
    engines = []
    cfg = stage.engine
    for r, lay in enumerate(stage.layouts):
        mem = plan_memory(stage.model, stage.gpu, lay, gpu_memory_utilization=cfg.gpu_memory_utilization,
                          max_num_batched_tokens=cfg.max_num_batched_tokens, max_num_seqs=cfg.max_num_seqs,
                          block_size_tokens=cfg.block_size_tokens, kv_cache_bytes=cfg.kv_cache_bytes,
                          min_kv_tokens=cfg.min_kv_tokens)
        im = IterationModel(stage.model, stage.gpu, lay, stage.efficiency, stage.gpus_per_node)
        for v in range(lay.pp):
            engines.append(SimEngine(im, cfg, mem.kv_blocks // lay.pp, fast_forward=fast_forward,
                                     hash_block_tokens=hash_block_tokens,
                                     name=f"stage{stage_index}/replica{r}" + (f"/ve{v}" if lay.pp > 1 else "")))
    return engines


def simulate(trace: Trace, stages: Sequence[StageDeployment] | StageDeployment, *,
             visits: np.ndarray | None = None, judge_latency_s: float = 0.0,
             fast_forward: bool = True) -> SimResult:
    """Run every request of `trace` through the cascade `stages`.

    visits[i] (1..C) is how many stages request i goes through (from replaying a quality
    profile against thresholds, or from shares); default: only the first. Every stage a
    request visits generates the traced output length. A request's latency is the sum over
    the stages it visits plus `judge_latency_s` after every stage that is judged.
    """
    wall0 = time.perf_counter()
    if isinstance(stages, StageDeployment):
        stages = [stages]
    n = len(trace)
    n_stages = len(stages)
    if visits is None:
        visits = np.ones(n, dtype=np.int64)
    visits = np.asarray(visits, dtype=np.int64)
    if visits.shape != (n,):
        raise ValueError(f"visits must have one entry per request ({n}), got shape {visits.shape}")
    if n and (visits.min() < 1 or visits.max() > n_stages):
        raise ValueError(f"visits must be in 1..{n_stages}")
    pools = [build_engines(st, i, fast_forward, trace.hash_block_tokens) for i, st in enumerate(stages)]
    prompts = trace.input_tokens.astype(np.int64)
    outputs = trace.output_tokens.astype(np.int64)
    hashes = trace.hash_ids
    arrivals = trace.arrival_s.astype(np.float64)

    # per (request, stage) records
    stage_first = np.full((n, n_stages), np.nan)
    stage_finish = np.full((n, n_stages), np.nan)
    stage_start = np.full((n, n_stages), np.nan)
    preempted = np.zeros(n, dtype=np.int64)
    rejected = np.zeros(n, dtype=bool)

    heap: list = []
    seq = 0
    for i in range(n):
        heap.append((float(arrivals[i]), ARRIVAL, seq, 0, i))
        seq += 1
    heapq.heapify(heap)
    engine_version: dict[int, int] = {}
    pop, push = heapq.heappop, heapq.heappush
    events = 0
    while heap:
        now, kind, _, a, b = pop(heap)
        events += 1
        if kind == ARRIVAL:
            stage, i = a, b
            pool = pools[stage]
            eng = pool[0] if len(pool) == 1 else min(pool, key=lambda e: e.outstanding_tokens(now))
            s = SimSeq(i, int(prompts[i]), int(outputs[i]), now, hashes[i] if hashes is not None else None)
            stage_start[i, stage] = now
            if not eng.fits(s):
                rejected[i] = True
                continue
            eng.add(s, now)
            if eng.busy:
                if engine_version.get(id(eng)) != eng.version:  # the run was cut short
                    engine_version[id(eng)] = eng.version
                    push(heap, (eng.run_end_s, RUN_END, seq, stage, eng))
                    seq += 1
            elif not eng.wake_pending:
                eng.wake_pending = True
                push(heap, (now, WAKE, seq, stage, eng))
                seq += 1
        elif kind == WAKE:
            stage, eng = a, b
            eng.wake_pending = False
            if not eng.busy and eng.start(now):
                engine_version[id(eng)] = eng.version
                push(heap, (eng.run_end_s, RUN_END, seq, stage, eng))
                seq += 1
        else:
            stage, eng = a, b
            if engine_version.get(id(eng)) != eng.version or not eng.busy or eng.run_end_s != now:
                continue  # superseded by a truncated run
            for s in eng.finish_run(now):
                i = s.rid
                stage_first[i, stage] = s.first_token_s
                stage_finish[i, stage] = s.finish_s
                preempted[i] += s.preemptions
                if stage + 1 < visits[i]:
                    push(heap, (now + judge_latency_s, ARRIVAL, seq, stage + 1, i))
                    seq += 1
            if eng.start(now):
                engine_version[id(eng)] = eng.version
                push(heap, (eng.run_end_s, RUN_END, seq, stage, eng))
                seq += 1
    engines = [e for pool in pools for e in pool]
    return SimResult.build(
        trace=trace, visits=visits, n_stages=n_stages, judge_latency_s=judge_latency_s,
        stage_start=stage_start, stage_first=stage_first, stage_finish=stage_finish, preempted=preempted,
        rejected=rejected,
        engine_names=[e.name for e in engines], engine_busy_s=np.array([e.busy_s for e in engines]),
        engine_stage=np.array([int(e.name.split("/")[0][5:]) for e in engines]),
        iterations=sum(e.iterations for e in engines), events=events,
        prefix_hit_tokens=sum(e.prefix_hit_tokens for e in engines),
        wall_s=time.perf_counter() - wall0,
    )
