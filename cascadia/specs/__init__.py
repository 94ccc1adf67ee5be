"""Shared vocabulary: model, GPU, cluster, cascade and SLO specifications."""

from cascadia.specs.cascade import CascadeSpec, SLOSpec
from cascadia.specs.cluster import ClusterSpec, NodePool, parse_cluster
from cascadia.specs.gpu import GPUSpec, get_gpu
from cascadia.specs.model import ModelSpec, SpecError, WeightsSource, model_from_hf_config

__all__ = [
    "CascadeSpec", "SLOSpec", "ClusterSpec", "NodePool", "parse_cluster", "GPUSpec", "get_gpu",
    "ModelSpec", "SpecError", "WeightsSource", "model_from_hf_config",
]
