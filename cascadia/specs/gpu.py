"""Accelerator specifications (vendor figures, cited) and the CPU device whose effective
figures come from a calibration file."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping

GB = 1e9
TB = 1e12


@dataclass(frozen=True)
class GPUSpec:
    """Peak figures of one device. Bandwidths are per device and per direction."""

    name: str
    peak_flops: float  # dense bf16 FLOP/s (fp32 for the CPU device)
    memory_bandwidth_Bps: float
    memory_bytes: float
    intra_node_bandwidth_Bps: float  # device-to-device inside a node (NVLink / PCIe)
    inter_node_bandwidth_Bps: float  # per device across nodes (NIC)
    # Fixed cost of one message hop (alpha of the alpha-beta model): a ring all-reduce over
    # tp GPUs takes 2(tp-1) hops, a pipeline hand-off one.
    intra_node_latency_s: float = 3e-6
    inter_node_latency_s: float = 10e-6
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GPUSpec":
        return cls(**dict(d))

    def with_(self, **changes: Any) -> "GPUSpec":
        return replace(self, **changes)


# Vendor datasheet figures (dense, i.e. without 2:4 sparsity). NVLink figures are the
# datasheet's bidirectional totals halved to one direction.
H100 = GPUSpec(
    name="H100",
    peak_flops=989e12,
    memory_bandwidth_Bps=3.35 * TB,
    memory_bytes=80 * GB,
    intra_node_bandwidth_Bps=450 * GB,
    inter_node_bandwidth_Bps=50 * GB,  # one 400 Gb/s NDR NIC per GPU
    source="NVIDIA H100 Tensor Core GPU datasheet (SXM5): 989 TFLOPS BF16 dense, 3.35 TB/s HBM3, "
    "80 GB, NVLink 900 GB/s; ConnectX-7 400 Gb/s per GPU in DGX H100",
)
H200 = GPUSpec(
    name="H200",
    peak_flops=989e12,
    memory_bandwidth_Bps=4.8 * TB,
    memory_bytes=141 * GB,
    intra_node_bandwidth_Bps=450 * GB,
    inter_node_bandwidth_Bps=50 * GB,
    source="NVIDIA H200 Tensor Core GPU datasheet (SXM): 989 TFLOPS BF16 dense, 4.8 TB/s HBM3e, "
    "141 GB, NVLink 900 GB/s",
)
A100_80G = GPUSpec(
    name="A100-80G",
    peak_flops=312e12,
    memory_bandwidth_Bps=2.039 * TB,
    memory_bytes=80 * GB,
    intra_node_bandwidth_Bps=300 * GB,
    inter_node_bandwidth_Bps=25 * GB,  # one 200 Gb/s HDR NIC per GPU
    source="NVIDIA A100 Tensor Core GPU datasheet (80GB SXM): 312 TFLOPS BF16 dense, 2,039 GB/s HBM2e, "
    "NVLink 600 GB/s; DGX A100 with 200 Gb/s HDR per GPU",
)
L40S = GPUSpec(
    name="L40S",
    peak_flops=362.05e12,
    memory_bandwidth_Bps=864 * GB,
    memory_bytes=48 * GB,
    intra_node_bandwidth_Bps=32 * GB,  # no NVLink: PCIe Gen4 x16, 64 GB/s bidirectional
    inter_node_bandwidth_Bps=25 * GB,
    intra_node_latency_s=8e-6,
    source="NVIDIA L40S datasheet: 362.05 TFLOPS BF16 dense (733 with sparsity), 864 GB/s GDDR6, "
    "48 GB, PCIe Gen4 x16",
)
# The CPU device's nominal figures only anchor the calibration: its real effective FLOP/s
# and bandwidth are these times the efficiencies fitted by `cascadia profile`.
CPU = GPUSpec(
    name="cpu",
    peak_flops=100e9,
    memory_bandwidth_Bps=20 * GB,
    memory_bytes=24 * GB,
    intra_node_bandwidth_Bps=10 * GB,
    inter_node_bandwidth_Bps=1 * GB,
    intra_node_latency_s=50e-6,
    inter_node_latency_s=100e-6,
    source="nominal anchor for calibration (2-core AVX2 host); effective figures come from the calibration file",
)

GPUS: dict[str, GPUSpec] = {g.name.lower(): g for g in (H100, H200, A100_80G, L40S, CPU)}
GPU_ALIASES = {"a100": "a100-80g", "a100-80gb": "a100-80g", "h100-80g": "h100", "h100-sxm": "h100"}


def get_gpu(name: str) -> GPUSpec:
    key = name.strip().lower()
    key = GPU_ALIASES.get(key, key)
    if key not in GPUS:
        raise KeyError(f"unknown GPU type {name!r}; known: {', '.join(g.name for g in GPUS.values())}")
    return GPUS[key]
