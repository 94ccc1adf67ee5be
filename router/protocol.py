"""The engine interface every serving backend implements (see docs/router-contract.md).

A request goes in as text already rendered by the model's chat template; tokens come back
as a stream of `TokenChunk`s, each holding only what is new since the previous one, with
the log-probability of every sampled token (the `logprob` judge scores answers from them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Protocol, runtime_checkable

FINISH_REASONS = ("stop", "length", "abort")


@dataclass(frozen=True)
class GenerateRequest:
    request_id: str
    prompt: str  # text after the chat template (the engine tokenizes)
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: bool = True  # per-token logprob of each sampled token (the logprob judge needs it)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class TokenChunk:
    """New tokens of one request since its previous chunk."""

    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[float, ...]  # aligned with token_ids; () if not asked
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.logprobs and len(self.logprobs) != len(self.token_ids):
            raise ValueError(f"{len(self.logprobs)} logprobs for {len(self.token_ids)} tokens")
        if self.finish_reason is not None and self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {self.finish_reason!r}")


class EngineError(RuntimeError):
    """The engine died or failed the request; the message says which and why."""


@runtime_checkable
class Engine(Protocol):
    """A served model. `generate` is an async generator: a consumer that stops early must
    close it (`contextlib.aclosing`, or cancel the task iterating it) — closing aborts the
    request in the engine."""

    name: str  # the served model name
    max_model_len: int

    def generate(self, req: GenerateRequest) -> AsyncIterator[TokenChunk]: ...

    async def abort(self, request_id: str) -> None: ...

    async def chat_prompt(self, messages: list[dict]) -> str: ...  # apply the model's chat template

    async def count_tokens(self, text: str) -> int: ...

    async def health(self) -> bool: ...

    async def stats(self) -> dict: ...  # running/waiting requests, tokens served...
