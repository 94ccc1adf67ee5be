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


@dataclass(frozen=True)
class JudgeLoad:
    """An LLM judge served by one of the cascade's own stages: every judged answer becomes a
    request to that stage (the prompt and answer inside a grading template, and a short
    rating out), queueing with its normal traffic; the verdict waits for it."""

    stage: int
    prompt_overhead_tokens: int = 200  # grading instructions around the question and answer
    output_tokens: int = 8  # "[[n]]" and little else (the judge is asked for the rating only)


def simulate(trace: Trace, stages: Sequence[StageDeployment] | StageDeployment, *,
             visits: np.ndarray | None = None, judge_latency_s: float = 0.0, judge: JudgeLoad | None = None,
             fast_forward: bool = True) -> SimResult:
    """Run every request of `trace` through the cascade `stages`.

    visits[i] (1..C) is how many stages request i goes through (from replaying a quality
    profile against thresholds, or from shares); default: only the first. Every stage a
    request visits generates the traced output length. A request's latency is the sum over
    the stages it visits plus `judge_latency_s` after every stage that is judged (every
    stage but the last), plus, with `judge`, the time its judge request takes on the stage
    that serves the judge.
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
    if judge is not None and not 0 <= judge.stage < n_stages:
        raise ValueError(f"judge stage must be in 0..{n_stages - 1}, got {judge.stage}")
    pools = [build_engines(st, i, fast_forward, trace.hash_block_tokens) for i, st in enumerate(stages)]
    prompts = trace.input_tokens.astype(np.int64)
    outputs = trace.output_tokens.astype(np.int64)
    hashes = trace.hash_ids
    arrivals = trace.arrival_s.astype(np.float64)

    # per (request, stage) records
    stage_first = np.full((n, n_stages), np.nan)
    stage_finish = np.full((n, n_stages), np.nan)
    stage_start = np.full((n, n_stages), np.nan)
    stage_released = np.full((n, n_stages), np.nan)  # when the judge's verdict on the stage's answer is in
    preempted = np.zeros(n, dtype=np.int64)
    rejected = np.zeros(n, dtype=bool)
    judged_stage: dict[int, int] = {}  # request -> stage whose answer its judge request grades

    heap: list = []
    seq = 0
    for i in range(n):
        heap.append((float(arrivals[i]), ARRIVAL, seq, 0, i))
        seq += 1
    heapq.heapify(heap)
    engine_version: dict[int, int] = {}
    pop, push = heapq.heappop, heapq.heappush
    events = 0

    def run_next(eng: SimEngine, stage: int, now: float) -> None:
        nonlocal seq
        if eng.start(now):
            engine_version[id(eng)] = eng.version
            push(heap, (eng.run_end_s, RUN_END, seq, stage, eng))
            seq += 1

    def verdict(i: int, stage: int, at: float) -> None:
        """The judge has graded request i's answer at `stage`: escalate or release it."""
        nonlocal seq
        stage_released[i, stage] = at
        if stage + 1 < visits[i]:
            push(heap, (at, ARRIVAL, seq, stage + 1, i))
            seq += 1

    while heap:
        now, kind, _, a, b = pop(heap)
        events += 1
        if kind == ARRIVAL:
            # b >= 0: request b reaches stage a; b < 0: the judge request grading request
            # -b-1's answer at stage a reaches the stage that serves the judge
            stage, i = a, b
            host = stage if i >= 0 else judge.stage
            pool = pools[host]
            eng = pool[0] if len(pool) == 1 else min(pool, key=lambda e: e.outstanding_tokens(now))
            if i >= 0:
                s = SimSeq(i, int(prompts[i]), int(outputs[i]), now, hashes[i] if hashes is not None else None)
                stage_start[i, stage] = now
            else:
                r = -i - 1
                s = SimSeq(i, int(prompts[r] + outputs[r]) + judge.prompt_overhead_tokens, judge.output_tokens, now)
                judged_stage[r] = stage
            if not eng.fits(s):
                rejected[i if i >= 0 else -i - 1] = True
                continue
            eng.add(s, now)
            if eng.busy:
                if engine_version.get(id(eng)) != eng.version:  # the run was cut short
                    engine_version[id(eng)] = eng.version
                    push(heap, (eng.run_end_s, RUN_END, seq, host, eng))
                    seq += 1
            elif not eng.wake_pending:
                eng.wake_pending = True
                push(heap, (now, WAKE, seq, host, eng))
                seq += 1
        elif kind == WAKE:
            stage, eng = a, b
            eng.wake_pending = False
            if not eng.busy:
                run_next(eng, stage, now)
        else:
            stage, eng = a, b
            if engine_version.get(id(eng)) != eng.version or not eng.busy or eng.run_end_s != now:
                continue  # superseded by a truncated run
            for s in eng.finish_run(now):
                i = s.rid
                if i < 0:  # a judge request finished
                    r = -i - 1
                    verdict(r, judged_stage.pop(r), now + judge_latency_s)
                    continue
                stage_first[i, stage] = s.first_token_s
                stage_finish[i, stage] = s.finish_s
                preempted[i] += s.preemptions
                if stage == n_stages - 1:
                    continue  # the last stage always answers, unjudged
                if judge is not None:
                    push(heap, (now, ARRIVAL, seq, stage, -i - 1))
                    seq += 1
                else:
                    verdict(i, stage, now + judge_latency_s)
            run_next(eng, stage, now)
    engines = [e for pool in pools for e in pool]
    return SimResult.build(
        trace=trace, visits=visits, n_stages=n_stages,
        stage_start=stage_start, stage_first=stage_first, stage_finish=stage_finish,
        stage_released=stage_released, preempted=preempted,
        rejected=rejected,
        engine_names=[e.name for e in engines], engine_busy_s=np.array([e.busy_s for e in engines]),
        engine_stage=np.array([int(e.name.split("/")[0][5:]) for e in engines]),
        iterations=sum(e.iterations for e in engines), events=events,
        prefix_hit_tokens=sum(e.prefix_hit_tokens for e in engines),
        wall_s=time.perf_counter() - wall0,
    )
