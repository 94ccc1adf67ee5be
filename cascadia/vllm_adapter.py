"""Every use of vLLM's Python API, behind typed values.

The profiler, the live benchmark and (later) the router's vLLM engine talk to vLLM only
through this module, so an upgrade of vLLM touches this file alone. vLLM is imported
inside functions: importing cascadia never imports vLLM.

Two engines:
- `SyncEngine` (profiling): vLLM's `LLMEngine` with its engine core in this process and
  an explicit `step()`. Each step reports the batch the scheduler actually formed, read
  from the scheduler's own output, so a timed iteration's shape is known, not guessed.
- `AsyncEngine` (serving): vLLM's `AsyncLLM` with the engine core in a background
  process; `generate()` streams `GenerationChunk`s (token ids and their logprobs).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, AsyncIterator, Sequence

GIB = 1 << 30


class EngineError(RuntimeError):
    """vLLM failed to start or to serve a request; the message says which and why."""


@dataclass(frozen=True)
class EngineSettings:
    """What to ask vLLM for. `None` leaves the choice to vLLM (see `EffectiveSettings`)."""

    model: str  # a local Hugging Face-format directory (see cascadia.model_store)
    dtype: str = "float32"  # float32 on CPUs without fast bf16; "auto" on GPUs
    max_model_len: int | None = None
    max_num_batched_tokens: int | None = None  # per-iteration token budget
    max_num_seqs: int | None = None  # running sequences per iteration
    block_size: int | None = None  # KV-cache block size in tokens
    # KV-cache memory. On CPU the environment variable VLLM_CPU_KVCACHE_SPACE (GiB), when
    # set, takes precedence inside vLLM.
    kv_cache_gib: float | None = 1.0
    enable_prefix_caching: bool = False
    enable_chunked_prefill: bool | None = None
    # None: eager on CPU, vLLM's default (compiled, CUDA graphs) elsewhere. On CPU,
    # vLLM 0.32 with torch 2.13 fails to reload its compile cache, so compiling costs
    # ~70 s at every start for ~10-15% faster decode steps.
    enforce_eager: bool | None = None
    seed: int = 0
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # "ray" (GPU workers in the caller's placement group), "mp" (one host), None: vLLM picks
    distributed_executor_backend: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of vLLM's EngineArgs for these settings."""
        kw: dict[str, Any] = {
            "model": self.model,
            "dtype": self.dtype,
            "seed": self.seed,
            "enable_prefix_caching": self.enable_prefix_caching,
            "enforce_eager": _on_cpu() if self.enforce_eager is None else self.enforce_eager,
            "tensor_parallel_size": self.tensor_parallel_size,
            "pipeline_parallel_size": self.pipeline_parallel_size,
            "disable_log_stats": True,
        }
        optional = {
            "max_model_len": self.max_model_len,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "max_num_seqs": self.max_num_seqs,
            "block_size": self.block_size,
            "enable_chunked_prefill": self.enable_chunked_prefill,
            "distributed_executor_backend": self.distributed_executor_backend,
        }
        kw.update({k: v for k, v in optional.items() if v is not None})
        if self.kv_cache_gib is not None:
            kw["kv_cache_memory_bytes"] = int(self.kv_cache_gib * GIB)
        return kw


@dataclass(frozen=True)
class EffectiveSettings:
    """What the engine actually runs with, read from its config after start-up."""

    vllm_version: str
    model: str
    dtype: str
    max_model_len: int
    max_num_batched_tokens: int
    max_num_seqs: int
    vocab_size: int
    block_size: int
    num_kv_blocks: int
    kv_capacity_tokens: int
    enable_prefix_caching: bool
    enable_chunked_prefill: bool
    enforce_eager: bool
    tensor_parallel_size: int
    pipeline_parallel_size: int
    device: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's share of an engine iteration, as the scheduler decided it."""

    request_id: str
    scheduled_tokens: int
    computed_tokens_before: int  # tokens already in its KV cache before this iteration


@dataclass(frozen=True)
class StepResult:
    """One timed `SyncEngine.step()`."""

    elapsed_s: float
    scheduled: tuple[ScheduledRequest, ...]  # empty when the engine ran no batch
    finished_request_ids: tuple[str, ...]

    @property
    def total_scheduled_tokens(self) -> int:
        return sum(r.scheduled_tokens for r in self.scheduled)


@dataclass(frozen=True)
class GenerationParams:
    """How to generate one request (greedy unless temperature > 0)."""

    max_tokens: int
    ignore_eos: bool = False
    logprobs: int | None = None  # 0: the sampled token's logprob only; k: plus the top k
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    detokenize: bool = True
    stop: tuple[str, ...] = ()  # stop strings (not included in the output)


@dataclass(frozen=True)
class GenerationChunk:
    """New output tokens of one request since its previous chunk."""

    request_id: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]  # sampled-token logprobs, aligned with token_ids; () if not asked
    text: str
    finished: bool
    finish_reason: str | None = None
    prompt_tokens: int | None = None


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def vllm_version() -> str:
    import vllm

    return str(vllm.__version__)


def tokens_prompt(token_ids: Sequence[int]) -> Any:
    """A vLLM prompt made of token ids (no tokenizer involved, lengths exact)."""
    from vllm.inputs import TokensPrompt

    return TokensPrompt(prompt_token_ids=[int(t) for t in token_ids])


def sampling_params(
    max_tokens: int,
    *,
    ignore_eos: bool = False,
    logprobs: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stream_deltas: bool = True,
    detokenize: bool = True,
    stop: Sequence[str] = (),
) -> Any:
    """vLLM SamplingParams. `logprobs=0` returns the sampled token's logprob only;
    `stream_deltas` makes each streamed output carry only the new tokens."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    return SamplingParams(
        max_tokens=max_tokens,
        ignore_eos=ignore_eos,
        logprobs=logprobs,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        detokenize=detokenize,
        stop=list(stop) or None,
        output_kind=RequestOutputKind.DELTA if stream_deltas else RequestOutputKind.FINAL_ONLY,
    )


def _engine_args(settings: EngineSettings, for_async: bool) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs

    cls = AsyncEngineArgs if for_async else EngineArgs
    return cls(**settings.engine_kwargs())


def _effective(vllm_config: Any, device: str | None = None) -> EffectiveSettings:
    model, cache, sched, par = (
        vllm_config.model_config, vllm_config.cache_config,
        vllm_config.scheduler_config, vllm_config.parallel_config,
    )
    blocks = int(cache.num_gpu_blocks or 0)
    capacity = getattr(cache, "kv_cache_size_tokens", None) or blocks * int(cache.block_size)
    if device is None:
        device = str(getattr(vllm_config.device_config, "device_type", "") or "")
    return EffectiveSettings(
        vllm_version=vllm_version(),
        model=str(model.model),
        dtype=str(model.dtype).removeprefix("torch."),
        max_model_len=int(model.max_model_len),
        max_num_batched_tokens=int(sched.max_num_batched_tokens),
        max_num_seqs=int(sched.max_num_seqs),
        vocab_size=int(model.get_vocab_size()),
        block_size=int(cache.block_size),
        num_kv_blocks=blocks,
        kv_capacity_tokens=int(capacity),
        enable_prefix_caching=bool(cache.enable_prefix_caching),
        enable_chunked_prefill=bool(getattr(sched, "enable_chunked_prefill", False)),
        enforce_eager=bool(model.enforce_eager),
        tensor_parallel_size=int(par.tensor_parallel_size),
        pipeline_parallel_size=int(par.pipeline_parallel_size),
        device=device,
    )


class SyncEngine:
    """vLLM's LLMEngine stepped by hand, reporting each iteration's batch and wall time."""

    def __init__(self, settings: EngineSettings):
        from vllm.v1.engine.llm_engine import LLMEngine
        from vllm.v1.executor import Executor

        self.settings = settings
        t0 = time.perf_counter()
        try:
            vllm_config = _engine_args(settings, for_async=False).create_engine_config()
            # Built directly rather than via from_engine_args, which moves the engine core
            # into another process whenever VLLM_ENABLE_V1_MULTIPROCESSING is on: the
            # scheduler must live here so each step's batch can be read.
            self._engine = LLMEngine(
                vllm_config=vllm_config,
                executor_class=Executor.get_class(vllm_config),
                log_stats=False,
                multiprocess_mode=False,
            )
        except Exception as e:  # vLLM raises many kinds; the caller needs one
            raise EngineError(f"vLLM LLMEngine failed to start for {settings.model}: {e}") from e
        self.startup_s = time.perf_counter() - t0
        self._vllm_config = vllm_config
        self._internal_to_external: dict[str, str] = {}
        self._last_schedule: Any = None
        scheduler = self._engine.engine_core.engine_core.scheduler
        original_schedule = scheduler.schedule

        def recording_schedule(*args: Any, **kwargs: Any) -> Any:
            out = original_schedule(*args, **kwargs)
            self._last_schedule = out
            return out

        scheduler.schedule = recording_schedule

    def effective_settings(self) -> EffectiveSettings:
        return _effective(self._vllm_config)

    def add_request(self, request_id: str, token_ids: Sequence[int], max_tokens: int, *,
                    ignore_eos: bool = True) -> None:
        """Queue a greedy request; outputs are not detokenized (profiling needs none)."""
        params = sampling_params(max_tokens, ignore_eos=ignore_eos, detokenize=False, stream_deltas=False)
        internal = self._engine.add_request(request_id, tokens_prompt(token_ids), params)
        self._internal_to_external[internal] = request_id

    def has_unfinished(self) -> bool:
        return bool(self._engine.has_unfinished_requests())

    def step(self) -> StepResult:
        self._last_schedule = None
        t0 = time.perf_counter()
        outputs = self._engine.step()
        elapsed = time.perf_counter() - t0
        scheduled = self._scheduled_requests(self._last_schedule)
        ext = self._internal_to_external
        finished = tuple(ext.get(o.request_id, o.request_id) for o in outputs if o.finished)
        if finished:
            done = set(finished)
            self._internal_to_external = {i: e for i, e in ext.items() if e not in done}
        return StepResult(elapsed_s=elapsed, scheduled=scheduled, finished_request_ids=finished)

    def _scheduled_requests(self, out: Any) -> tuple[ScheduledRequest, ...]:
        if out is None or not out.total_num_scheduled_tokens:
            return ()
        ext = self._internal_to_external
        n_sched = out.num_scheduled_tokens
        rows = [(r.req_id, r.num_computed_tokens) for r in out.scheduled_new_reqs]
        cached = out.scheduled_cached_reqs
        rows += list(zip(cached.req_ids, cached.num_computed_tokens))
        return tuple(
            ScheduledRequest(ext.get(rid, rid), int(n_sched[rid]), int(before))
            for rid, before in rows if n_sched.get(rid, 0) > 0
        )

    def abort(self, request_ids: Sequence[str]) -> None:
        """Drop requests at once; the next step's batch no longer contains them."""
        ids = list(request_ids)
        if ids:
            self._engine.abort_request(ids)
        gone = set(ids)
        self._internal_to_external = {i: e for i, e in self._internal_to_external.items() if e not in gone}

    def shutdown(self) -> None:
        core = getattr(self._engine, "engine_core", None)
        if core is not None:
            core.shutdown()


class AsyncEngine:
    """vLLM's AsyncLLM: streaming generation for serving."""

    def __init__(self, settings: EngineSettings):
        from vllm.v1.engine.async_llm import AsyncLLM

        self.settings = settings
        t0 = time.perf_counter()
        try:
            args = _engine_args(settings, for_async=True)
            if settings.distributed_executor_backend == "ray":
                # The engine core runs in a child process that is no Ray worker, so it cannot
                # find the caller's placement group itself: hand it over in the config.
                import ray

                vllm_config = args.create_engine_config()
                vllm_config.parallel_config.placement_group = ray.util.get_current_placement_group()
                self._llm = AsyncLLM.from_vllm_config(vllm_config, disable_log_stats=True)
            else:
                self._llm = AsyncLLM.from_engine_args(args)
        except Exception as e:
            raise EngineError(f"vLLM AsyncLLM failed to start for {settings.model}: {e}") from e
        self.startup_s = time.perf_counter() - t0

    def effective_settings(self) -> EffectiveSettings:
        if self._llm is None:
            raise EngineError("the engine has been shut down")
        return _effective(self._llm.vllm_config)

    async def generate(self, request_id: str, prompt: Sequence[int] | str, params: GenerationParams
                       ) -> AsyncIterator[GenerationChunk]:
        """Stream a request's output; each chunk holds only the tokens new since the last.
        `prompt` is token ids (exact length) or text (tokenized by the engine)."""
        if self._llm is None:
            raise EngineError("the engine has been shut down")
        vllm_prompt = prompt if isinstance(prompt, str) else tokens_prompt(prompt)
        vllm_params = sampling_params(
            params.max_tokens, ignore_eos=params.ignore_eos, logprobs=params.logprobs,
            temperature=params.temperature, top_p=params.top_p, seed=params.seed,
            detokenize=params.detokenize, stream_deltas=True, stop=params.stop,
        )
        try:
            async for out in self._llm.generate(vllm_prompt, vllm_params, request_id):
                yield _chunk(request_id, out)
        except Exception as e:  # cancellation and GeneratorExit are BaseExceptions: they pass
            raise EngineError(f"request {request_id}: {type(e).__name__}: {e}") from e

    async def abort(self, request_id: str) -> None:
        await self._llm.abort(request_id)

    def _tokenizer(self) -> Any:
        if self._llm is None:
            raise EngineError("the engine has been shut down")
        return self._llm.get_tokenizer()

    def apply_chat_template(self, messages: Sequence[dict[str, Any]]) -> str:
        """The prompt text for chat `messages` under the model's own chat template, ending
        with the assistant's turn opened (the engine adds no special tokens of its own to
        text that already carries them)."""
        text = self._tokenizer().apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        if not isinstance(text, str):
            raise EngineError(f"{self.settings.model}: the chat template did not return text")
        return text

    def count_tokens(self, text: str) -> int:
        """Tokens the engine will see for prompt `text` (its tokenizer, special tokens included)."""
        return len(self._tokenizer().encode(text))

    async def check_health(self) -> bool:
        if self._llm is None:
            return False
        try:
            await self._llm.check_health()
        except Exception:  # a dead engine core raises its own error type
            return False
        return True

    def shutdown(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.shutdown()
            # Drop the last reference now: AsyncLLM.__del__ shuts down again, which fails
            # if it only runs at interpreter exit, after vLLM's module globals are gone.
            del llm


def _chunk(request_id: str, out: Any) -> GenerationChunk:
    comp = out.outputs[0] if out.outputs else None
    ids = tuple(int(t) for t in comp.token_ids) if comp is not None else ()
    lps: tuple[float, ...] = ()
    if comp is not None and comp.logprobs is not None:
        values = []
        for pos, tok in enumerate(ids):
            entry = comp.logprobs[pos].get(tok)
            values.append(float(entry.logprob) if entry is not None else float("nan"))
        lps = tuple(values)
    return GenerationChunk(
        request_id=request_id,
        token_ids=ids,
        logprobs=lps,
        text=comp.text if comp is not None else "",
        finished=bool(out.finished),
        finish_reason=comp.finish_reason if comp is not None else None,
        prompt_tokens=len(out.prompt_token_ids) if out.prompt_token_ids is not None else None,
    )


def start_sync_engine(settings: EngineSettings) -> SyncEngine:
    return SyncEngine(settings)


def start_async_engine(settings: EngineSettings) -> AsyncEngine:
    """Must be called inside a running event loop (AsyncLLM starts its output task there)."""
    return AsyncEngine(settings)
