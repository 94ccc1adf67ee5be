"""The replicas of one cascade stage, and dispatch among them.

A request goes to the replica with the least outstanding work, counted in tokens the pool
has sent and not yet seen come back (prompt + max_tokens - tokens received, over its
requests in flight). With more than `POWER_OF_TWO_ABOVE` replicas, two random replicas are
compared instead of all (power of two choices: nearly as balanced, O(1) per request).
When the lightest candidates are close, the one that last served the same prompt prefix
wins, so vLLM's prefix cache on that replica is reused.

The pool holds at most `max_queue` requests at once; beyond that `generate` raises
`PoolFull` before any work starts (the server answers 429).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import zlib
from collections import OrderedDict
from contextlib import aclosing
from dataclasses import dataclass
from typing import AsyncIterator, Sequence

from router.engines.sim import approx_tokens
from router.protocol import Engine, EngineError, GenerateRequest, TokenChunk

POWER_OF_TWO_ABOVE = 8
PREFIX_CHARS = 256  # the prompt prefix that identifies "the same prompt" for affinity
PREFIX_MEMORY = 4096  # prefixes remembered (least recently used forgotten)


class PoolFull(EngineError):
    """The stage holds as many requests as it may; the caller should shed this one."""


@dataclass
class _InFlight:
    replica: int
    outstanding_tokens: int


class ReplicaPool:
    """Dispatch over the replicas of one stage. Implements the `Engine` protocol itself, so
    a stage can treat one replica or many alike."""

    def __init__(self, engines: Sequence[Engine], max_queue: int, *, affinity_slack: float = 0.1,
                 affinity_slack_tokens: int = 64, seed: int = 0):
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

    # ---------------- dispatch ----------------
    @property
    def outstanding_tokens(self) -> tuple[int, ...]:
        return tuple(self._outstanding)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def _prefix_key(self, prompt: str) -> int:
        return zlib.crc32(prompt[:PREFIX_CHARS].encode())

    def _pick_index(self, prompt: str | None = None) -> int:
        n = len(self.engines)
        candidates = range(n) if n <= POWER_OF_TWO_ABOVE else self._rng.sample(range(n), 2)
        best = min(candidates, key=lambda i: (self._outstanding[i], i))
        if prompt is not None:
            owner = self._prefix_owner.get(self._prefix_key(prompt))
            if owner is not None and owner != best:
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
        i = self._pick_index(req.prompt)
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
                async for chunk in stream:
                    finished = finished or chunk.finished
                    done = work if chunk.finished else min(entry.outstanding_tokens, len(chunk.token_ids))
                    self._settle(entry, done)
                    yield chunk
        finally:
            self._settle(entry, entry.outstanding_tokens)
            self._in_flight.pop(req.request_id, None)
            if not finished:
                # the consumer left (closed or cancelled) before the end: abort on the replica
                # that has the request, which only the pool knows -- once the entry is gone a
                # later pool.abort(request_id) could not find it
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.engines[i].abort(req.request_id))

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
        """Healthy while any replica is."""
        return any([await e.health() for e in self.engines])

    async def replica_health(self) -> list[bool]:
        return [await e.health() for e in self.engines]

    async def stats(self) -> dict:
        return {"name": self.name, "replicas": len(self.engines), "in_flight": len(self._in_flight),
                "max_queue": self.max_queue, "rejected": self.rejected,
                "outstanding_tokens": list(self._outstanding),
                "replica_stats": [await e.stats() for e in self.engines]}
