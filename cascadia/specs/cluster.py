"""GPU pools: `4x8xH100` (4 nodes of 8 H100), `2x8xH100+1x4xA100-80G`, or YAML."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from cascadia.specs.gpu import GPUSpec, get_gpu
from cascadia.specs.model import SpecError


@dataclass(frozen=True)
class NodePool:
    gpu: GPUSpec
    n_nodes: int
    gpus_per_node: int

    @property
    def n_gpus(self) -> int:
        return self.n_nodes * self.gpus_per_node


@dataclass(frozen=True)
class ClusterSpec:
    pools: tuple[NodePool, ...]

    def __post_init__(self) -> None:
        if not self.pools:
            raise SpecError("cluster has no node pools")
        for p in self.pools:
            if p.n_nodes <= 0 or p.gpus_per_node <= 0:
                raise SpecError(f"cluster pool {p.gpu.name}: nodes and GPUs per node must be positive")

    @property
    def n_gpus(self) -> int:
        return sum(p.n_gpus for p in self.pools)

    @property
    def homogeneous(self) -> bool:
        return len({p.gpu.name for p in self.pools}) == 1

    def gpu_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.pools:
            out[p.gpu.name] = out.get(p.gpu.name, 0) + p.n_gpus
        return out

    def describe(self) -> str:
        return "+".join(f"{p.n_nodes}x{p.gpus_per_node}x{p.gpu.name}" for p in self.pools)


def parse_cluster(text: str) -> ClusterSpec:
    """Parse `NODESxGPUSxTYPE[+...]`, e.g. `4x8xH100`; a path to a YAML file also works."""
    if text.endswith((".yaml", ".yml")) or Path(text).is_file():
        return cluster_from_yaml(text)
    pools = []
    for part in text.split("+"):
        bits = part.strip().split("x", 2)
        if len(bits) != 3:
            raise SpecError(f"cluster {text!r}: expected NODESxGPUS_PER_NODExTYPE like 4x8xH100, got {part!r}")
        try:
            nodes, per_node = int(bits[0]), int(bits[1])
        except ValueError:
            raise SpecError(f"cluster {text!r}: node and GPU counts must be integers in {part!r}") from None
        try:
            gpu = get_gpu(bits[2])
        except KeyError as e:
            raise SpecError(f"cluster {text!r}: {e.args[0]}") from None
        pools.append(NodePool(gpu, nodes, per_node))
    return ClusterSpec(tuple(pools))


def cluster_from_dict(doc: Mapping[str, Any], where: str = "cluster") -> ClusterSpec:
    """YAML form: `pools: [{gpu: H100, nodes: 4, gpus_per_node: 8, inter_node_gbps: 200}]`.
    Optional per-pool overrides of the link figures model clusters that differ from a DGX."""
    pools = []
    for i, p in enumerate(doc.get("pools") or []):
        try:
            gpu = get_gpu(str(p["gpu"]))
            if "inter_node_gbps" in p:
                gpu = gpu.with_(inter_node_bandwidth_Bps=float(p["inter_node_gbps"]) * 1e9 / 8)
            if "memory_gb" in p:
                gpu = gpu.with_(memory_bytes=float(p["memory_gb"]) * 1e9)
            pools.append(NodePool(gpu, int(p["nodes"]), int(p["gpus_per_node"])))
        except KeyError as e:
            raise SpecError(f"{where}: pools[{i}] is missing {e}") from None
        except (TypeError, ValueError) as e:
            raise SpecError(f"{where}: pools[{i}] has a bad value: {e}") from None
    return ClusterSpec(tuple(pools))


def cluster_from_yaml(path: str | Path) -> ClusterSpec:
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: no such cluster file") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(doc, dict):
        raise SpecError(f"{path}: expected a mapping with a `pools` list")
    return cluster_from_dict(doc, str(path))
