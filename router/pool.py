"""The replicas of one cascade stage, and dispatch among them.

A request goes to the replica with the least outstanding work, counted in tokens the pool
has sent and not yet seen come back (prompt + max_tokens - tokens received, over its
requests in flight). With more than `POWER_OF_TWO_ABOVE` replicas, two random replicas are
compared instead of all (power of two choices: nearly as balanced, O(1) per request).
When the lightest candidates are close, the one that last served the same prompt prefix
wins, so vLLM's prefix cache on that replica is reused.

The pool holds at most `max_queue` requests at once; beyond that `generate` raises
`PoolFull` before any work starts (the server answers 429).

Retiring a replica (rolling updates, router/rollout.py): it gets no new requests; the
requests it has not sent anything back for yet (queued, or in prefill) move to the other
replicas (aborted there first; `moved` counts them), the rest finish where they are.

Replica failure: a replica whose `generate` raises `EngineError` is marked down and gets no
new requests; a background healer probes it (`recover()` when the engine has one -- a Ray
replica restarts its engine in the restarted actor -- else `health()`) every
`HEAL_POLL_S` until it answers, and records the time it took (`heal_times_s`). While every
replica of the pool is down, a new request is held up to `hold_s` for one to come back
before it fails. The error itself propagates: the cascade decides whether the request can be
retried (nothing of it reached the client yet) -- router/cascade.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import zlib
from collections import OrderedDict
from contextlib import aclosing
from dataclasses import dataclass
from typing import AsyncIterator, Sequence

from router.engines.sim import approx_tokens
from router.protocol import Engine, EngineError, GenerateRequest, TokenChunk

log = logging.getLogger("cascadia.router")

POWER_OF_TWO_ABOVE = 8
HEAL_POLL_S = 0.5  # between probes of a replica that is down
HEAL_GIVE_UP_S = 900.0  # a replica down this long is left down (the healer stops probing)
PREFIX_CHARS = 256  # the prompt prefix that identifies "the same prompt" for affinity
PREFIX_MEMORY = 4096  # prefixes remembered (least recently used forgotten)


class PoolFull(EngineError):
    """The stage holds as many requests as it may; the caller should shed this one."""


@dataclass
class _InFlight:
    replica: int
    outstanding_tokens: int
    started: bool = False  # the replica has sent something back
    moving: bool = False  # its replica is retired and it has sent nothing: it goes elsewhere
    first_read: asyncio.Future | None = None  # the pending read of the first chunk (retire cancels it)


class ReplicaPool:
    """Dispatch over the replicas of one stage. Implements the `Engine` protocol itself, so
    a stage can treat one replica or many alike."""

    def __init__(self, engines: Sequence[Engine], max_queue: int, *, affinity_slack: float = 0.1,
                 affinity_slack_tokens: int = 64, seed: int = 0, hold_s: float = 120.0,
                 layouts: Sequence[object] | None = None):
        if not engines:
            raise ValueError("a pool needs at least one engine")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        names = {e.name for e in engines}
        if len(names) != 1:
            raise ValueError(f"a pool's replicas serve one model, got {sorted(names)}")
        self.engines = list(engines)
        self.name = self.engines[0].name
        self.max_model_len = min(e.max_model_len for e in self.engines)
        self.max_queue = max_queue
        self.affinity_slack = affinity_slack
        self.affinity_slack_tokens = affinity_slack_tokens
        self._outstanding = [0] * len(self.engines)
        self._in_flight: dict[str, _InFlight] = {}
        self._prefix_owner: OrderedDict[int, int] = OrderedDict()
        self._rng = random.Random(seed)
        self.rejected = 0
        self.moved = 0  # requests moved off a retiring replica before it started them
        self.hold_s = hold_s
        self._down: dict[int, float] = {}  # replica index -> monotonic time it went down
        self._healers: dict[int, asyncio.Task] = {}
        self._any_up = asyncio.Event()
        self._any_up.set()
        self.heal_times_s: list[float] = []  # down -> serving again, per recovery
        self.failures = 0
        # the plan layout each replica was started for (rolling updates find replicas by it)
        self.layouts: list[object] = list(layouts) if layouts is not None else [None] * len(self.engines)
        if len(self.layouts) != len(self.engines):
            raise ValueError(f"{len(self.layouts)} layouts for {len(self.engines)} replicas")
        self._retired: set[int] = set()  # drained or draining: never picked again

    # ---------------- dispatch ----------------
    @property
    def outstanding_tokens(self) -> tuple[int, ...]:
        return tuple(self._outstanding)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def _prefix_key(self, prompt: str) -> int:
        return zlib.crc32(prompt[:PREFIX_CHARS].encode())

    @property
    def down(self) -> tuple[int, ...]:
        """Indices of the replicas that are down (not given new requests)."""
        return tuple(sorted(self._down))

    @property
    def active(self) -> tuple[int, ...]:
        """Indices of the replicas that take new requests (not retired, not down)."""
        return tuple(i for i in range(len(self.engines)) if i not in self._retired and i not in self._down)

    def _pick_index(self, prompt: str | None = None) -> int:
        up = self.active
        candidates = up if len(up) <= POWER_OF_TWO_ABOVE else self._rng.sample(up, 2)
        best = min(candidates, key=lambda i: (self._outstanding[i], i))
        if prompt is not None:
            owner = self._prefix_owner.get(self._prefix_key(prompt))
            if owner is not None and owner != best and owner in up:
                load, least = self._outstanding[owner], self._outstanding[best]
                if load <= least + max(self.affinity_slack * least, self.affinity_slack_tokens):
                    return owner
        return best

    def pick(self, prompt: str | None = None) -> Engine:
        """The replica the next request (with this prompt, if given) would go to."""
        return self.engines[self._pick_index(prompt)]

    # ---------------- Engine protocol ----------------
    async def generate(self, req: GenerateRequest) -> AsyncIterator[TokenChunk]:
        if len(self._in_flight) >= self.max_queue:
            self.rejected += 1
            raise PoolFull(f"stage {self.name}: {len(self._in_flight)} requests in flight (max_queue "
                           f"{self.max_queue})")
        if req.request_id in self._in_flight:
            raise EngineError(f"stage {self.name}: request id {req.request_id} is already in flight")
        if not self.active:
            # every replica is down: hold the request while one restarts
            try:
                await asyncio.wait_for(self._any_up.wait(), self.hold_s)
            except asyncio.TimeoutError:
                raise EngineError(f"stage {self.name}: no replica came back within {self.hold_s:g} s") from None
        while True:
            moved = False
            async with aclosing(self._generate_on(self._pick_index(req.prompt), req)) as chunks:
                async for chunk in chunks:
                    if chunk is None:  # its replica is being retired and had sent nothing
                        moved = True
                        break
                    yield chunk
            if not moved:
                return
            if not self.active:
                raise EngineError(f"stage {self.name}: request {req.request_id} left a retiring replica and no "
                                  f"other replica is up")
            self.moved += 1
            log.info("stage %s: request %s moved off a retiring replica before it started", self.name,
                     req.request_id)

    async def _generate_on(self, i: int, req: GenerateRequest) -> AsyncIterator[TokenChunk | None]:
        """`req` on replica i, counted in its outstanding work; ends with None (after
        aborting it there) when the replica is retired before sending anything back."""
        key = self._prefix_key(req.prompt)
        self._prefix_owner[key] = i
        self._prefix_owner.move_to_end(key)
        if len(self._prefix_owner) > PREFIX_MEMORY:
            self._prefix_owner.popitem(last=False)
        # the prompt's tokens are estimated (the engine's count arrives with the first chunk)
        work = approx_tokens(req.prompt) + req.max_tokens
        entry = _InFlight(i, work)
        self._in_flight[req.request_id] = entry
        self._outstanding[i] += work
        finished = False
        try:
            async with aclosing(self.engines[i].generate(req)) as stream:
                chunks = stream.__aiter__()
                while True:
                    try:
                        chunk = await self._next_unless_moved(chunks, entry)
                    except StopAsyncIteration:
                        break
                    if chunk is None:
                        yield None
                        return
                    entry.started = True
                    finished = finished or chunk.finished
                    done = work if chunk.finished else min(entry.outstanding_tokens, len(chunk.token_ids))
                    self._settle(entry, done)
                    yield chunk
        except EngineError as e:
            # a request-level failure leaves a healthy replica up; a dead one is marked down
            if not await self._answers(i):
                self.mark_down(i, str(e))
            raise
        finally:
            self._settle(entry, entry.outstanding_tokens)
            self._in_flight.pop(req.request_id, None)
            if not finished:
                # the consumer left (closed or cancelled) before the end, or the request moves:
                # abort on the replica that has the request, which only the pool knows -- once
                # the entry is gone a later pool.abort(request_id) could not find it
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.engines[i].abort(req.request_id))

    @staticmethod
    async def _next_unless_moved(chunks, entry: _InFlight) -> TokenChunk | None:
        """The stream's next chunk, or None if, before the first one, the replica is retired:
        `retire` then cancels the pending read (our own cancellation is told apart by
        `cancelling()`), which also ends the engine's stream."""
        if entry.started:
            return await chunks.__anext__()
        if entry.moving:
            return None
        entry.first_read = asyncio.ensure_future(chunks.__anext__())
        try:
            return await entry.first_read
        except asyncio.CancelledError:
            cancelling = getattr(asyncio.current_task(), "cancelling", None)  # Python >= 3.11
            if entry.moving and not (cancelling and cancelling()):
                return None  # (on 3.10 a consumer cancelled at that very moment would be missed)
            raise
        finally:
            entry.first_read = None

    # ---------------- failure and healing ----------------
    async def _answers(self, i: int, timeout_s: float = 2.0) -> bool:
        try:
            return bool(await asyncio.wait_for(self.engines[i].health(), timeout_s))
        except Exception:
            return False

    def mark_down(self, i: int, why: str = "") -> None:
        """Replica i failed: no new requests until the healer sees it answer again."""
        self.failures += 1
        if i in self._down:
            return
        log.warning("stage %s: replica %d down (%s); healing", self.name, i, why[:200])
        self._down[i] = time.monotonic()
        if not self.active:
            self._any_up.clear()
        if i not in self._healers or self._healers[i].done():
            self._healers[i] = asyncio.get_running_loop().create_task(self._heal(i))

    async def _heal(self, i: int) -> None:
        engine = self.engines[i]
        probe = getattr(engine, "recover", None) or engine.health
        since = self._down[i]
        while time.monotonic() - since < HEAL_GIVE_UP_S:
            try:
                ok = bool(await probe())
            except Exception:  # still dead
                ok = False
            if ok:
                healed = time.monotonic() - since
                self.heal_times_s.append(healed)
                self._down.pop(i, None)
                self._any_up.set()
                log.warning("stage %s: replica %d serving again after %.1f s", self.name, i, healed)
                return
            await asyncio.sleep(HEAL_POLL_S)
        log.error("stage %s: replica %d still down after %.0f s; no longer probed", self.name, i, HEAL_GIVE_UP_S)

    def _settle(self, entry: _InFlight, tokens: int) -> None:
        tokens = min(tokens, entry.outstanding_tokens)
        entry.outstanding_tokens -= tokens
        self._outstanding[entry.replica] -= tokens

    async def abort(self, request_id: str) -> None:
        entry = self._in_flight.get(request_id)
        if entry is not None:
            await self.engines[entry.replica].abort(request_id)

    async def chat_prompt(self, messages: list[dict]) -> str:
        return await self.engines[0].chat_prompt(messages)

    async def count_tokens(self, text: str) -> int:
        return await self.engines[0].count_tokens(text)

    async def health(self) -> bool:
        """Healthy while any replica that takes requests is."""
        return any([await self.engines[i].health() for i in self.active])

    # ---------------- rolling updates ----------------
    def add_replica(self, engine: Engine, layout: object = None) -> int:
        """Put a started, healthy replica into service; returns its index."""
        if engine.name != self.name:
            raise ValueError(f"a pool of {self.name} cannot take a replica of {engine.name}")
        self.engines.append(engine)
        self.layouts.append(layout)
        self._outstanding.append(0)
        self._any_up.set()
        return len(self.engines) - 1

    def find_replica(self, layout: object) -> int | None:
        """An active replica started for `layout` (the least loaded of them), else None."""
        matches = [i for i in range(len(self.engines)) if i not in self._retired and self.layouts[i] == layout]
        return min(matches, key=lambda i: self._outstanding[i]) if matches else None

    async def retire(self, i: int, drain_timeout_s: float = 60.0) -> tuple[float, int]:
        """Take replica i out of service: no new requests; requests it has sent nothing back
        for yet go to the other replicas; wait (at most `drain_timeout_s`) for the rest to
        finish, then shut it down. Returns (drain seconds, requests still running at the
        deadline, which the shutdown then aborts)."""
        if i in self._retired:
            raise ValueError(f"replica {i} of {self.name} is already retired")
        if len(self.active) <= 1 and i in self.active:
            raise ValueError(f"replica {i} is the last one serving {self.name}: start its successor first")
        self._retired.add(i)
        if self.active:
            # what it has not started on goes to the replicas that stay: a retired replica with
            # a backlog (the reason for a re-plan, often) would otherwise hold it to the end
            for entry in self._in_flight.values():
                if entry.replica == i and not entry.started:
                    entry.moving = True
                    if entry.first_read is not None:
                        entry.first_read.cancel()
        t0 = time.monotonic()
        while any(e.replica == i for e in self._in_flight.values()) and time.monotonic() - t0 < drain_timeout_s:
            await asyncio.sleep(0.02)
        left = sum(e.replica == i for e in self._in_flight.values())
        shutdown = getattr(self.engines[i], "shutdown", None)
        if shutdown is not None:
            await shutdown()
        return time.monotonic() - t0, left

    async def stats(self) -> dict:
        return {"name": self.name, "replicas": len(self.engines), "in_flight": len(self._in_flight),
                "max_queue": self.max_queue, "rejected": self.rejected, "moved": self.moved, "down": list(self.down),
                "retired": sorted(self._retired),
                "failures": self.failures, "heal_times_s": list(self.heal_times_s),
                "outstanding_tokens": list(self._outstanding),
                "replica_stats": [await e.stats() for e in self.engines]}
