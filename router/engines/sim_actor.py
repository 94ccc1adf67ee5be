"""A SIMULATED replica hosted in a Ray actor, placed like a real one.

`SimulatedEngine` runs in the router's process; for a dry run of a GPU plan on a Ray
cluster (`cascadia serve --plan --engine sim --address ...`, e.g. on a multi-node cluster
of loopback nodes whose "GPUs" are resource counts),
`SimEngineActor` hosts it in an actor inside the replica's placement group -- the same
bundles `cascadia serve --plan --engine vllm` reserves (router/plan_replicas.py) -- so where
each replica lands is decided by Ray exactly as for vLLM replicas. The router talks to it
through `RayEngine` (router/engines/vllm_ray.py): the actor has the same methods as
`VLLMEngineActor`.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, AsyncIterator

from router.engines.vllm_ray import RayEngine, ReplicaPlacement
from router.protocol import EngineError, GenerateRequest, TokenChunk

# Simulated seconds between a request's token chunks when the replica is an actor: every
# chunk is a Ray object, so the in-process default (0.05 s) would cost the router a core
# at plan-scale rates. First and last tokens are never delayed (router/engines/sim.py),
# so TTFT and end-to-end latency do not depend on it.
RAY_CHUNK_INTERVAL_S = 0.5


class SimEngineActor:
    """Wrapped by `ray.remote` in `start_sim_actor`. `stage` is a
    `cascadia.sim.cluster.StageDeployment`; the replica is its layout `layout_index`."""

    def __init__(self, name: str, stage: Any, layout_index: int, time_dilation: float,
                 chunk_interval_s: float | None = None):
        self.name, self.stage, self.layout_index, self.time_dilation = name, stage, layout_index, time_dilation
        self.chunk_interval_s = chunk_interval_s
        self.engine: Any = None

    async def start(self, warmup: bool = True) -> dict:
        import ray

        from router.engines.sim import SimulatedEngine

        if self.engine is None:
            extra = {} if self.chunk_interval_s is None else {"chunk_interval_s": self.chunk_interval_s}
            self.engine = SimulatedEngine.from_stage(self.name, self.stage, self.layout_index,
                                                     time_dilation=self.time_dilation, **extra)
        return {"name": self.name, "pid": os.getpid(), "child_pids": [], "max_model_len": self.engine.max_model_len,
                "node_id": ray.get_runtime_context().get_node_id(), "simulated": True}

    async def generate(self, req: GenerateRequest) -> AsyncIterator[TokenChunk]:
        async for chunk in self.engine.generate(req):
            yield chunk

    async def abort(self, request_id: str) -> None:
        if self.engine is not None:
            await self.engine.abort(request_id)

    async def chat_prompt(self, messages: list[dict]) -> str:
        return await self.engine.chat_prompt(messages)

    async def count_tokens(self, text: str) -> int:
        return await self.engine.count_tokens(text)

    async def health(self) -> bool:
        return self.engine is not None and await self.engine.health()

    async def stats(self) -> dict:
        return await self.engine.stats()

    async def shutdown(self) -> None:
        if self.engine is not None:
            await self.engine.shutdown()


async def start_sim_actor(name: str, stage: Any, layout_index: int, *, time_dilation: float = 1.0,
                          placement: ReplicaPlacement | None = None, device_resource: str = "GPU",
                          chunk_interval_s: float | None = None, ready_timeout_s: float = 300.0) -> RayEngine:
    """Start the simulated replica in its placement group (or, for a one-device replica, as
    an actor holding that device: `device_resource` GPU, CPU or a custom resource) on the
    connected Ray cluster. A group Ray cannot place within `ready_timeout_s` is removed and
    EngineError says which replica found no room."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    # Ray restarts a killed actor; RayEngine.recover then rebuilds its simulated engine
    options: dict[str, Any] = {"max_concurrency": 1000, "num_cpus": 0, "max_restarts": 5, "max_task_retries": 0}
    pg = None
    if placement is not None:
        pg = placement_group(list(placement.bundles), strategy=placement.strategy)
        try:
            await asyncio.wait_for(pg.ready(), ready_timeout_s)
        except asyncio.TimeoutError:
            ray.util.remove_placement_group(pg)
            raise EngineError(f"simulated replica {name}/r{layout_index}: Ray placed no group of "
                              f"{list(placement.bundles)} ({placement.strategy}) within {ready_timeout_s:g} s"
                              ) from None
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=placement.actor_bundle_index)
    elif device_resource == "GPU":
        options["num_gpus"] = 1
    elif device_resource == "CPU":
        options["num_cpus"] = 1
    else:
        options["resources"] = {device_resource: 1.0}
    actor = ray.remote(SimEngineActor).options(**options).remote(name, stage, layout_index, time_dilation,
                                                                  chunk_interval_s)
    info = await actor.start.remote()
    return RayEngine(name, actor, info, placement_group=pg, tokenizer_dir=None)
