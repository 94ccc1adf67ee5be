"""SIMULATED engine: the router's `Engine` interface with no model behind it.

`SimulatedEngine` runs the offline simulator's continuous-batching scheduler
(`cascadia.sim.engine.SimEngine`) against the wall clock, so that queueing and batching
under live traffic behave as `cascadia simulate` predicts: requests join the engine's
queue when they arrive, the scheduler forms each iteration's batch from what is there,
and every iteration takes the time the calibrated `IterationModel` gives for that batch.
Nothing sleeps a fixed time per request.

- Time dilation: `time_dilation` simulated seconds pass per wall second (10 runs a model
  ten times faster than it would), so a 32-GPU plan can be dry-run on a laptop. Times the
  engine reports (`stats`) are simulated seconds.
- Coalesced chunks: tokens reach the consumer at the end of the iteration that made them,
  at most every `chunk_interval_s` (simulated) per request during long decode runs; a
  request's first and last tokens are never delayed.
- Synthetic output: each request generates exactly `max_tokens` tokens (finish reason
  "length"; `stop` and EOS are not simulated), of made-up words with made-up logprobs,
  deterministic per request id and seed. Each answer has a confidence of its own (a mean
  token logprob drawn per request, tokens scattered around it), so the logprob judge's
  score does not depend on the answer's length: thresholds re-calibrated on short warm-up
  answers escalate the planned share of long ones too.
- Prompt length: the text's length in characters / 4, rounded up (about 4 characters per
  token for English text under BPE tokenizers); `count_tokens` uses the same rule.
- Fault injection: `crash(restart_s)` is the simulated counterpart of a killed replica:
  every request in flight fails with `EngineError`, and the replica refuses work and
  reports unhealthy for `restart_s` wall seconds, then comes back empty.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
import zlib
from dataclasses import dataclass
from typing import AsyncIterator

from cascadia.perf.iteration import IterationModel
from cascadia.sim.config import EngineConfig
from cascadia.sim.engine import SimEngine, SimSeq
from router.protocol import EngineError, GenerateRequest, TokenChunk

CHARS_PER_TOKEN = 4
_WORDS = ("the", "cascade", "model", "answer", "token", "router", "simulated", "batch", "queue", "of",
          "and", "a", "to", "is", "in", "that", "engine", "request", "latency", "plan")


def approx_tokens(text: str) -> int:
    """Tokens of `text` under the ~4 characters per token rule (at least 1)."""
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


_CRASHED = object()  # queued to a request's consumer when its replica crashes


@dataclass
class _Live:
    """A request in flight: its simulator sequence and what its consumer has been sent."""

    req: GenerateRequest
    seq: SimSeq
    engine: "_Virtual"
    queue: asyncio.Queue
    sent: int = 0
    last_sent_sim_s: float = -math.inf
    rng: random.Random | None = None  # token ids
    lp_rng: random.Random | None = None  # logprobs: apart, so chunk boundaries never change them
    mean_logprob: float = -0.25  # this answer's confidence (see the module docstring)


class _Virtual:
    """One SimEngine and the task that drives it (a replica with pp > 1 has pp of them)."""

    def __init__(self, sim: SimEngine):
        self.sim = sim
        self.wake = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.to_drop: list[SimSeq] = []
        self.woken_at_sim_s: float | None = None  # the arrival that woke the idle engine


class SimulatedEngine:
    """A simulated replica implementing the router's `Engine` protocol."""

    def __init__(self, name: str, iteration_model: IterationModel, config: EngineConfig, kv_blocks: int, *,
                 virtual_engines: int = 1, time_dilation: float = 1.0, chunk_interval_s: float = 0.05,
                 max_model_len: int = 8192, seed: int = 0):
        if time_dilation <= 0:
            raise ValueError(f"time_dilation must be > 0, got {time_dilation}")
        self.name = name
        self.max_model_len = max_model_len
        self.time_dilation = time_dilation
        self.chunk_interval_s = chunk_interval_s
        self.seed = seed
        # pp virtual engines share the replica's KV cache, each taking the full pipeline
        # latency per iteration (as cascadia.sim.cluster.build_engines does)
        self._virtual = [_Virtual(SimEngine(iteration_model, config, kv_blocks // virtual_engines,
                                            name=f"{name}/ve{v}")) for v in range(virtual_engines)]
        self._live: dict[str, _Live] = {}
        self._by_seq: dict[int, _Live] = {}  # SimSeq.rid -> its request
        self._t0_wall: float | None = None
        self._next_rid = 0
        self._tokens_out = 0
        self._requests_done = 0
        self._requests_aborted = 0
        self._closed = False
        self._down_until = 0.0  # monotonic; > now while a crashed replica "restarts"
        self.crashes = 0

    @classmethod
    def from_stage(cls, name: str, stage, layout_index: int = 0, **kw) -> "SimulatedEngine":
        """Replica `layout_index` of a `cascadia.sim.cluster.StageDeployment`, sized exactly
        as the offline simulator sizes it."""
        from cascadia.perf.memory import plan_memory

        lay, cfg = stage.layouts[layout_index], stage.engine
        mem = plan_memory(stage.model, stage.gpu, lay, gpu_memory_utilization=cfg.gpu_memory_utilization,
                          max_num_batched_tokens=cfg.max_num_batched_tokens, max_num_seqs=cfg.max_num_seqs,
                          block_size_tokens=cfg.block_size_tokens, kv_cache_bytes=cfg.kv_cache_bytes,
                          min_kv_tokens=cfg.min_kv_tokens)
        im = IterationModel(stage.model, stage.gpu, lay, stage.efficiency, stage.gpus_per_node)
        kw.setdefault("max_model_len", int(stage.model.max_context_tokens))
        return cls(name, im, cfg, mem.kv_blocks, virtual_engines=lay.pp, **kw)

    # ---------------- clock ----------------
    def _sim_now(self) -> float:
        if self._t0_wall is None:
            self._t0_wall = time.monotonic()
        return (time.monotonic() - self._t0_wall) * self.time_dilation

    def _wall_delay(self, sim_t: float) -> float:
        return max(0.0, sim_t - self._sim_now()) / self.time_dilation

    def _ensure_drivers(self) -> None:
        for ve in self._virtual:
            if ve.task is None or ve.task.done():
                ve.task = asyncio.get_running_loop().create_task(self._drive(ve))

    # ---------------- Engine protocol ----------------
    async def generate(self, req: GenerateRequest) -> AsyncIterator[TokenChunk]:
        if self._closed:
            raise EngineError(f"{self.name}: the engine is shut down")
        if time.monotonic() < self._down_until:
            raise EngineError(f"{self.name}: the replica is down (restarting)")
        if req.request_id in self._live:
            raise EngineError(f"{self.name}: request id {req.request_id} is already in flight")
        prompt = approx_tokens(req.prompt)
        if prompt + req.max_tokens > self.max_model_len:
            raise EngineError(f"{self.name}: prompt ({prompt}) + max_tokens ({req.max_tokens}) exceeds "
                              f"max_model_len {self.max_model_len}")
        self._ensure_drivers()
        now = self._sim_now()
        ve = min(self._virtual, key=lambda v: v.sim.outstanding_tokens(now))
        seq = SimSeq(self._next_rid, prompt, req.max_tokens, now)
        self._next_rid += 1
        if not ve.sim.fits(seq):
            raise EngineError(f"{self.name}: request {req.request_id} needs more KV cache than the replica has")
        key = zlib.crc32(req.request_id.encode()) ^ (req.seed or self.seed)
        rng, lp_rng = random.Random(key), random.Random(key + 1)
        live = _Live(req, seq, ve, asyncio.Queue(), rng=rng, lp_rng=lp_rng,
                     mean_logprob=-max(lp_rng.expovariate(4.0), 1e-3))
        self._live[req.request_id] = live
        self._by_seq[seq.rid] = live
        ve.sim.add(seq, now)
        if not ve.sim.busy and ve.woken_at_sim_s is None:
            ve.woken_at_sim_s = now
        ve.wake.set()
        finished = False
        try:
            while True:
                chunk = await live.queue.get()
                if chunk is _CRASHED:
                    finished = True  # nothing left to abort
                    raise EngineError(f"{self.name}: the replica died with request {req.request_id} in flight")
                finished = chunk.finished
                yield chunk
                if finished:
                    return
        finally:
            if not finished:
                await self.abort(req.request_id)

    async def abort(self, request_id: str) -> None:
        """Drop the request; its KV blocks and batch slot are freed once the iteration in
        flight ends (an iteration's batch is fixed when it starts)."""
        live = self._live.pop(request_id, None)
        if live is None:
            return
        self._by_seq.pop(live.seq.rid, None)
        self._requests_aborted += 1
        live.engine.sim.end_run_early(self._sim_now())
        live.engine.to_drop.append(live.seq)
        live.engine.wake.set()
        live.queue.put_nowait(TokenChunk((), "", (), finished=True, finish_reason="abort"))

    def crash(self, restart_s: float) -> int:
        """Kill the replica (see the module docstring); returns how many requests it had."""
        self.crashes += 1
        self._down_until = time.monotonic() + restart_s
        now = self._sim_now()
        lost = list(self._live.values())
        self._live.clear()
        self._by_seq.clear()
        for live in lost:
            live.engine.sim.end_run_early(now)
            live.engine.to_drop.append(live.seq)
            live.engine.wake.set()
            live.queue.put_nowait(_CRASHED)
        return len(lost)

    async def chat_prompt(self, messages: list[dict]) -> str:
        """A ChatML-style rendering (the simulated model has no template of its own)."""
        parts = [f"<|im_start|>{m.get('role', 'user')}\n{m.get('content', '')}<|im_end|>\n" for m in messages]
        return "".join(parts) + "<|im_start|>assistant\n"

    async def count_tokens(self, text: str) -> int:
        return approx_tokens(text)

    async def health(self) -> bool:
        if time.monotonic() < self._down_until:
            return False
        return not self._closed and all(ve.task is None or not ve.task.done() for ve in self._virtual)

    async def stats(self) -> dict:
        now = self._sim_now()
        sims = [ve.sim for ve in self._virtual]
        return {"name": self.name, "simulated": True, "time_dilation": self.time_dilation,
                "running": sum(len(s.running) for s in sims), "waiting": sum(len(s.waiting) for s in sims),
                "outstanding_tokens": sum(s.outstanding_tokens(now) for s in sims),
                "requests_done": self._requests_done, "requests_aborted": self._requests_aborted,
                "tokens_out": self._tokens_out, "iterations": sum(s.iterations for s in sims),
                "busy_sim_s": sum(s.busy_s for s in sims), "sim_now_s": now}

    async def shutdown(self) -> None:
        self._closed = True
        for rid in list(self._live):
            await self.abort(rid)
        for ve in self._virtual:
            if ve.task is not None:
                ve.task.cancel()
        await asyncio.gather(*(ve.task for ve in self._virtual if ve.task is not None), return_exceptions=True)

    # ---------------- the driver ----------------
    async def _drive(self, ve: _Virtual) -> None:
        """Run iterations back to back while there is work; sleep until an arrival otherwise.
        A run starts when the previous one ends in simulated time (as in the offline
        simulator), so delivery lag never stretches the simulated timeline."""
        sim = ve.sim
        start_at: float | None = None
        while True:
            self._drop_aborted(ve)
            if start_at is None:  # idle until now: the schedule happens at the waking arrival
                start_at = self._sim_now() if ve.woken_at_sim_s is None else ve.woken_at_sim_s
            ve.woken_at_sim_s = None
            if not sim.start(start_at):
                start_at = None
                ve.wake.clear()
                await ve.wake.wait()
                continue
            while True:  # until the run ends; an arrival may cut a fast-forwarded run short
                end = sim.run_end_s
                step = min(end, self._sim_now() + self.chunk_interval_s)
                ve.wake.clear()
                try:
                    await asyncio.wait_for(ve.wake.wait(), self._wall_delay(step))
                except asyncio.TimeoutError:
                    pass
                if self._sim_now() >= sim.run_end_s:
                    break
                self._deliver_decoding(ve, self._sim_now())
            end = sim.run_end_s
            for s in sim.finish_run(end):
                self._deliver(s, s.output, end, finished=True)
            self._deliver_decoding(ve, end)
            start_at = end

    def _drop_aborted(self, ve: _Virtual) -> None:
        sim = ve.sim
        for s in ve.to_drop:
            sim.drop(s)
        ve.to_drop.clear()

    def _deliver_decoding(self, ve: _Virtual, now: float) -> None:
        """Send every running request the tokens it has made by simulated time `now`."""
        sim = ve.sim
        done_steps = sim.steps
        if sim.busy and sim.run_steps > 1 and not sim.run_chunks and sim.run_ends is not None:
            done_steps += int((sim.run_ends <= now).sum())
        for s in sim.running:
            generated = done_steps + s.off + 1 - s.prompt if s.decoding else s.generated
            self._deliver(s, min(generated, s.output), now, finished=False)

    def _deliver(self, s: SimSeq, generated: int, now: float, *, finished: bool) -> None:
        live = self._by_seq.get(s.rid)
        if live is None:
            return
        new = generated - live.sent
        if new <= 0 and not finished:
            return
        if not finished and live.sent > 0 and now - live.last_sent_sim_s < self.chunk_interval_s:
            return  # coalesce: the next delivery carries these tokens too
        rng = live.rng
        ids = tuple(rng.randrange(1000, 30000) for _ in range(new))
        words = [_WORDS[t % len(_WORDS)] for t in ids]
        text = "".join((" " if live.sent + i else "") + w for i, w in enumerate(words))
        # gamma(4, 1/4) has mean 1: token logprobs average the answer's mean_logprob
        lps = tuple(live.mean_logprob * live.lp_rng.gammavariate(4.0, 0.25) for _ in range(new)) \
            if live.req.logprobs else ()
        first = live.sent == 0
        live.sent = generated
        live.last_sent_sim_s = now
        self._tokens_out += new
        if finished:
            self._live.pop(live.req.request_id, None)
            self._by_seq.pop(s.rid, None)
            self._requests_done += 1
        live.queue.put_nowait(TokenChunk(ids, text, lps, finished=finished,
                                         finish_reason="length" if finished else None,
                                         prompt_tokens=live.seq.prompt if first else None))
