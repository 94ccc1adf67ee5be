"""A SIMULATED replica hosted in a Ray actor, placed like a real one.

`SimulatedEngine` runs in the router's process; for a dry run of a GPU plan on a Ray
cluster (e.g. a multi-node cluster of loopback nodes whose "GPUs" are resource counts),
`SimEngineActor` hosts it in an actor inside the replica's placement group -- the same
bundles `cascadia serve --plan --engine vllm` reserves (router/plan_replicas.py) -- so where
each replica lands is decided by Ray exactly as for vLLM replicas. The router talks to it
through `RayEngine` (router/engines/vllm_ray.py): the actor has the same methods as
`VLLMEngineActor`.
"""

from __future__ import annotations

import os
from typing import Any, AsyncIterator

from router.engines.vllm_ray import RayEngine, ReplicaPlacement
from router.protocol import GenerateRequest, TokenChunk


class SimEngineActor:
    """Wrapped by `ray.remote` in `start_sim_actor`. `stage` is a
    `cascadia.sim.cluster.StageDeployment`; the replica is its layout `layout_index`."""

    def __init__(self, name: str, stage: Any, layout_index: int, time_dilation: float):
        self.name, self.stage, self.layout_index, self.time_dilation = name, stage, layout_index, time_dilation
        self.engine: Any = None

    async def start(self, warmup: bool = True) -> dict:
        import ray

        from router.engines.sim import SimulatedEngine

        if self.engine is None:
            self.engine = SimulatedEngine.from_stage(self.name, self.stage, self.layout_index,
                                                     time_dilation=self.time_dilation)
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
                          placement: ReplicaPlacement | None = None, device_resource: str = "GPU") -> RayEngine:
    """Start the simulated replica in its placement group (or, for a one-device replica, as
    an actor holding that device) on the connected Ray cluster."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    # Ray restarts a killed actor; RayEngine.recover then rebuilds its simulated engine
    options: dict[str, Any] = {"max_concurrency": 1000, "num_cpus": 0, "max_restarts": 5, "max_task_retries": 0}
    pg = None
    if placement is not None:
        pg = placement_group(list(placement.bundles), strategy=placement.strategy)
        await pg.ready()
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=placement.actor_bundle_index)
    else:
        options.update({"num_gpus": 1} if device_resource == "GPU" else {"resources": {device_resource: 1.0}})
    actor = ray.remote(SimEngineActor).options(**options).remote(name, stage, layout_index, time_dilation)
    info = await actor.start.remote()
    return RayEngine(name, actor, info, placement_group=pg, tokenizer_dir=None)
