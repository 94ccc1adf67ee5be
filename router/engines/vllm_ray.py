"""A vLLM engine in a Ray actor, and the client that streams from it.

`VLLMEngineActor` hosts `cascadia.vllm_adapter.AsyncEngine` (vLLM's AsyncLLM; every use of
vLLM's API stays in that adapter). Its `generate` is an async generator, so called with
`num_returns="streaming"` it sends each chunk to the caller as soon as vLLM produces it.
`RayEngine` is the caller's side: it implements the router's `Engine` protocol, and when
its consumer stops early (a client that disconnected, or output the cascade discards) it
aborts the request in the engine, so no work is left running for nobody.

Placement: a replica with tp x pp > 1 reserves a Ray placement group. Each pipeline stage
is one bundle holding its tp devices (a bundle never spans nodes, so tensor-parallel peers
share a node); the stages are packed onto one node when they fit, or spread across nodes
when the plan says so. On CPU, vLLM's `ray` executor is unsupported, so tp > 1 runs with
vLLM's `mp` executor inside the one actor, which then reserves all the replica's CPUs.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from cascadia.vllm_adapter import EngineSettings, GenerationParams
from router.engines.local_tokenizer import LocalTokenizer
from router.protocol import EngineError, GenerateRequest, TokenChunk

WARMUP_PROMPT = "Hello"
MAX_RESTARTS = 5  # per replica actor; a replica that keeps dying stays down after that


@dataclass(frozen=True)
class ReplicaPlacement:
    """Ray resources of one replica: bundles and the strategy that places them."""

    bundles: tuple[dict[str, float], ...]
    strategy: str  # Ray placement strategy: "STRICT_PACK" one node, "SPREAD" across nodes
    actor_bundle_index: int = 0  # the bundle the engine actor itself runs in


def replica_placement(tp: int, pp: int, *, device: str = "GPU", cpus_per_stage: float = 1.0,
                      pp_across_nodes: bool = False) -> ReplicaPlacement:
    """One bundle per pipeline stage with its `tp` devices (and `cpus_per_stage` CPUs for the
    workers that drive them). device="CPU": the devices are CPUs, nothing else is asked.
    `pp_across_nodes`: stages may sit on different nodes (the plan's layout needs more
    devices than a node has); otherwise all stages must share one node."""
    if tp < 1 or pp < 1:
        raise ValueError(f"tp and pp must be >= 1, got tp={tp}, pp={pp}")
    if device not in ("GPU", "CPU"):
        raise ValueError(f"device must be 'GPU' or 'CPU', got {device!r}")
    if device == "GPU":
        stage: dict[str, float] = {"GPU": float(tp), "CPU": float(cpus_per_stage)}
    else:
        stage = {"CPU": float(tp) * cpus_per_stage}
    return ReplicaPlacement(bundles=tuple(dict(stage) for _ in range(pp)),
                            strategy="SPREAD" if pp_across_nodes else "STRICT_PACK")


def _chunk_from(gen_chunk: Any) -> TokenChunk:
    return TokenChunk(token_ids=gen_chunk.token_ids, text=gen_chunk.text, logprobs=gen_chunk.logprobs,
                      finished=gen_chunk.finished, finish_reason=gen_chunk.finish_reason,
                      prompt_tokens=gen_chunk.prompt_tokens)


def _child_pids() -> list[int]:
    """This process's descendants (vLLM's engine core runs in one)."""
    import psutil

    return [p.pid for p in psutil.Process().children(recursive=True)]


class VLLMEngineActor:
    """Wrapped by `ray.remote` in `start_vllm_engine`; never instantiated directly.

    AsyncLLM starts tasks on the running event loop, so it is created in the async
    `start`, not in `__init__` (which Ray runs outside the actor's loop)."""

    def __init__(self, name: str, settings: EngineSettings, cpu_core: int | None = None):
        self.name = name
        self.settings = settings
        if cpu_core is not None:
            # Without this every replica on a host starts on the same core as its parent.
            os.sched_setaffinity(0, {cpu_core})
        self._engine: Any = None
        self._running: set[str] = set()
        self._tokens_out = 0
        self._requests_done = 0
        self._requests_aborted = 0
        self.startup_s = 0.0

    async def start(self, warmup: bool = True) -> dict:
        import ray

        from cascadia.vllm_adapter import start_async_engine

        t0 = time.perf_counter()
        self._engine = start_async_engine(self.settings)
        ready_s = time.perf_counter() - t0
        if warmup:  # the first request after start compiles and allocates; pay it here
            params = GenerationParams(max_tokens=4, ignore_eos=True, logprobs=0)
            async for _ in self._engine.generate(f"warmup-{self.name}", WARMUP_PROMPT, params):
                pass
        self.startup_s = time.perf_counter() - t0
        eff = self._engine.effective_settings()
        return {"name": self.name, "pid": os.getpid(), "child_pids": _child_pids(), "engine_ready_s": ready_s, "startup_s": self.startup_s,
                "max_model_len": eff.max_model_len, "effective": eff.as_dict(),
                "cpu_affinity": sorted(os.sched_getaffinity(0)), "node_id": ray.get_runtime_context().get_node_id()}

    async def generate(self, req: GenerateRequest) -> AsyncIterator[TokenChunk]:
        if self._engine is None:
            raise EngineError(f"{self.name}: the engine is not started")
        params = GenerationParams(max_tokens=req.max_tokens, ignore_eos=req.ignore_eos,
                                  logprobs=0 if req.logprobs else None, temperature=req.temperature,
                                  top_p=req.top_p, seed=req.seed, stop=req.stop)
        self._running.add(req.request_id)
        finished = False
        try:
            async for c in self._engine.generate(req.request_id, req.prompt, params):
                self._tokens_out += len(c.token_ids)
                finished = c.finished
                yield _chunk_from(c)
        finally:
            self._running.discard(req.request_id)
            if finished:
                self._requests_done += 1
            else:  # cancelled by the caller: make sure vLLM drops it
                self._requests_aborted += 1
                await self._engine.abort(req.request_id)

    async def abort(self, request_id: str) -> None:
        if self._engine is not None:
            await self._engine.abort(request_id)

    async def chat_prompt(self, messages: list[dict]) -> str:
        return self._engine.apply_chat_template(messages)

    async def count_tokens(self, text: str) -> int:
        return self._engine.count_tokens(text)

    async def health(self) -> bool:
        return self._engine is not None and await self._engine.check_health()

    async def stats(self) -> dict:
        return {"name": self.name, "running": len(self._running), "requests_done": self._requests_done,
                "requests_aborted": self._requests_aborted, "tokens_out": self._tokens_out,
                "startup_s": self.startup_s, "pid": os.getpid()}

    async def shutdown(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.shutdown()


class RayEngine:
    """The router's `Engine` over a `VLLMEngineActor` handle.

    `tokenizer_dir`: the model directory vLLM loaded. When it exists on this host too, the
    chat template and token counts come from the same tokenizer loaded here (see
    router/engines/local_tokenizer.py): no actor round trip per request. Otherwise, or if
    it fails to load, the actor answers them."""

    def __init__(self, name: str, actor: Any, info: dict, placement_group: Any = None, *,
                 tokenizer_dir: str | None = None):
        self.name = name
        self.actor = actor
        self.info = info
        self.max_model_len = int(info["max_model_len"])
        self.placement_group = placement_group
        self.local_tokenizer = LocalTokenizer(tokenizer_dir)
        self.restarts = 0

    async def generate(self, req: GenerateRequest) -> AsyncIterator[TokenChunk]:
        import ray

        stream = self.actor.generate.options(num_returns="streaming").remote(req)
        finished = False
        try:
            async for ref in stream:
                try:
                    chunk = await ref
                except ray.exceptions.RayError as e:
                    raise EngineError(f"{self.name}: request {req.request_id} failed: {e}") from e
                finished = chunk.finished
                yield chunk
        finally:
            if not finished:
                # The consumer went away (closed or cancelled): stop the actor's task, which
                # aborts the request in vLLM, and abort explicitly in case it had not started.
                try:
                    ray.cancel(stream)
                except Exception:  # the actor is dead: nothing left to cancel
                    pass
                await asyncio.shield(self._abort_quietly(req.request_id))

    async def _abort_quietly(self, request_id: str) -> None:
        try:
            await self.actor.abort.remote(request_id)
        except Exception:  # the actor may be gone already; nothing is left to abort then
            pass

    async def abort(self, request_id: str) -> None:
        await self.actor.abort.remote(request_id)

    async def chat_prompt(self, messages: list[dict]) -> str:
        tokenizer = await self.local_tokenizer.get()
        if tokenizer is None:
            return await self.actor.chat_prompt.remote(messages)
        return LocalTokenizer.render_chat(tokenizer, messages)

    async def count_tokens(self, text: str) -> int:
        tokenizer = await self.local_tokenizer.get()
        if tokenizer is None:
            return await self.actor.count_tokens.remote(text)
        return LocalTokenizer.count(tokenizer, text)

    async def health(self) -> bool:
        try:
            return bool(await self.actor.health.remote())
        except Exception:  # a dead actor is unhealthy, not an error of the caller
            return False

    async def recover(self) -> bool:
        """The pool's healer calls this while the replica is down. Ray restarts a dead actor
        (`max_restarts`), but the restarted actor has no engine: start it again (warm-up
        included). The engine-core processes of the dead actor are killed if they
        outlived it (vLLM's child would otherwise keep its memory). True once it serves."""
        import ray

        try:
            if await self.actor.health.remote():
                return True
            self._kill_orphans()
            info = await self.actor.start.remote(True)
        except ray.exceptions.RayError:
            return False  # still restarting, or gone for good
        self.info = {**self.info, **info}
        self.restarts += 1
        return bool(await self.health())

    def _kill_orphans(self) -> None:
        """Kill the dead actor's vLLM child processes that are still running (same host only;
        a pid is only touched if its actor is gone and it still looks like vLLM's)."""
        import psutil

        if psutil.pid_exists(int(self.info.get("pid", -1))):
            return  # the actor process is alive: its children are its own business
        for pid in self.info.get("child_pids", ()):
            try:
                child = psutil.Process(pid)
                if any("VLLM" in part or "vllm" in part for part in [child.name(), *child.cmdline()]):
                    child.kill()
            except psutil.Error:  # gone already, or not ours to touch
                pass

    async def stats(self) -> dict:
        return await self.actor.stats.remote()

    async def shutdown(self) -> None:
        """Stop vLLM, then the actor and its placement group."""
        import ray

        try:
            await self.actor.shutdown.remote()
        except Exception:  # already dead: killing below is all that is left
            pass
        ray.kill(self.actor)
        if self.placement_group is not None:
            ray.util.remove_placement_group(self.placement_group)


async def start_vllm_engine(name: str, settings: EngineSettings, *, num_cpus: float = 1, cpu_core: int | None = None,
                            warmup: bool = True, pp_across_nodes: bool = False, device: str = "CPU",
                            placement: ReplicaPlacement | None = None) -> RayEngine:
    """Start a replica on the connected Ray cluster and return once it has served a
    warm-up request. `cpu_core` pins the actor before vLLM starts, so vLLM's processes
    inherit the pinning (two replicas on two cores instead of both on core 0).
    `placement`: the replica's placement group as a plan lays it out
    (router.plan_replicas); by default one is derived from tp x pp when that is > 1.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 is set for the actor, but vLLM 0.32's AsyncLLM runs its
    engine core in a child process regardless (the variable only affects LLMEngine); the
    child's pid is in `RayEngine.info["child_pids"]`."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    # CASCADIA_ENGINE_NAME lets an operator (or a test) tell replica processes apart
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "CASCADIA_ENGINE_NAME": name}
    # max_restarts: Ray brings a dead actor back (RayEngine.recover then restarts its engine);
    # tasks in flight on it fail rather than re-run (max_task_retries 0): the router decides
    options: dict[str, Any] = {"runtime_env": {"env_vars": env}, "name": f"cascadia-engine-{name}-{os.getpid()}-"
                               f"{time.monotonic_ns()}", "max_concurrency": 1000, "max_restarts": MAX_RESTARTS,
                               "max_task_retries": 0}
    pg = None
    tp, pp = settings.tensor_parallel_size, settings.pipeline_parallel_size
    if placement is None and tp * pp > 1:
        placement = replica_placement(tp, pp, device=device, cpus_per_stage=num_cpus, pp_across_nodes=pp_across_nodes)
    if placement is not None:
        place = placement
        pg = placement_group(list(place.bundles), strategy=place.strategy)
        await pg.ready()
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=place.actor_bundle_index,
            placement_group_capture_child_tasks=True)
        bundle = place.bundles[place.actor_bundle_index]
        options["num_cpus"] = bundle.get("CPU", 0) if device == "CPU" else min(num_cpus, bundle.get("CPU", 0))
        if device == "GPU" and len(place.bundles) == 1:
            options["num_gpus"] = bundle["GPU"]
    else:
        options["num_cpus"] = num_cpus
        if device == "GPU":
            options["num_gpus"] = 1
    actor = ray.remote(VLLMEngineActor).options(**options).remote(name, settings, cpu_core)
    try:
        info = await actor.start.remote(warmup)
    except ray.exceptions.RayError as e:
        ray.kill(actor)
        if pg is not None:
            ray.util.remove_placement_group(pg)
        raise EngineError(f"engine {name} failed to start: {e}") from e
    engine = RayEngine(name, actor, info, placement_group=pg, tokenizer_dir=settings.model)
    await engine.local_tokenizer.get()  # load it now (in a thread), not on the first request
    return engine
