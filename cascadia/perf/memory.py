"""Memory on each GPU of a replica: weights, an activation reserve, and the KV cache
that is left. A layout that does not fit is rejected with the reason."""

from __future__ import annotations

from dataclasses import dataclass

from cascadia.perf.layout import Layout
from cascadia.specs.gpu import GPUSpec
from cascadia.specs.model import ModelSpec

GIB = 1024**3


class LayoutDoesNotFit(ValueError):
    """Raised with a message that says which memory need exceeds what is available."""


@dataclass(frozen=True)
class MemoryPlan:
    weights_per_gpu_bytes: float
    activation_reserve_bytes: float
    kv_cache_per_gpu_bytes: float
    kv_bytes_per_token_per_gpu: float
    kv_capacity_tokens: int
    block_size_tokens: int

    @property
    def kv_blocks(self) -> int:
        return self.kv_capacity_tokens // self.block_size_tokens


def kv_bytes_per_token_per_gpu(model: ModelSpec, layout: Layout) -> float:
    """KV bytes a token takes on one GPU. Layers split over pipeline stages; KV heads split
    over TP ranks but are replicated once TP exceeds their count; MLA's latent cache is
    replicated on every TP rank (vLLM does not shard it)."""
    per_stage = model.kv_bytes_per_token() / layout.pp
    if model.attention == "MLA":
        return per_stage
    return per_stage / min(layout.tp, model.n_kv_heads)


def activation_reserve_bytes(model: ModelSpec, layout: Layout, max_num_batched_tokens: int,
                             max_num_seqs: int, act_bytes: int = 2) -> float:
    """What vLLM's profiling run keeps free for one forward pass of a full token budget:
    hidden states and the MLP's widest tensor for every batched token, the logits of every
    sequence, and ~1 GiB of runtime state (CUDA context, graphs, allocator slack)."""
    widest = max(model.intermediate_size, model.n_active_experts * model.moe_intermediate_size)
    per_token = (6 * model.hidden_size + 3 * widest / layout.tp) * act_bytes
    logits = 2 * max_num_seqs * model.vocab_size * 4 / layout.tp
    return max_num_batched_tokens * per_token + logits + 1.0 * GIB


def plan_memory(model: ModelSpec, gpu: GPUSpec, layout: Layout, *, gpu_memory_utilization: float = 0.9,
                max_num_batched_tokens: int = 8192, max_num_seqs: int = 256, block_size_tokens: int = 16,
                kv_cache_bytes: float | None = None, min_kv_tokens: int = 2048) -> MemoryPlan:
    """Fit the model onto each GPU of the layout. `kv_cache_bytes` fixes the KV cache per
    GPU (vLLM-CPU's VLLM_CPU_KVCACHE_SPACE) instead of deriving it from free memory.
    `min_kv_tokens`: a replica must hold at least this many tokens of KV (vLLM refuses to
    start when one maximum-length request does not fit)."""
    where = f"{model.name} on {layout.n_gpus}x{gpu.name} ({layout.describe()})"
    if layout.tp > model.n_heads or model.n_heads % layout.tp:
        raise LayoutDoesNotFit(f"{where}: {model.n_heads} attention heads do not split over tp={layout.tp}")
    if layout.pp > model.n_layers:
        raise LayoutDoesNotFit(f"{where}: {model.n_layers} layers cannot fill pp={layout.pp} stages")
    weights = model.weight_bytes() / layout.n_gpus
    act_bytes = 4 if model.weight_bits == 32 else 2
    reserve = activation_reserve_bytes(model, layout, max_num_batched_tokens, max_num_seqs, act_bytes)
    usable = gpu.memory_bytes * gpu_memory_utilization
    per_token = kv_bytes_per_token_per_gpu(model, layout)
    if kv_cache_bytes is not None:
        kv = float(kv_cache_bytes)
        if weights + kv > gpu.memory_bytes:
            raise LayoutDoesNotFit(
                f"{where}: weights {weights / 1e9:.1f} GB + KV cache {kv / 1e9:.1f} GB per device exceed "
                f"its {gpu.memory_bytes / 1e9:.0f} GB")
    else:
        if weights > usable:
            raise LayoutDoesNotFit(
                f"{where}: weights need {weights / 1e9:.1f} GB per GPU but only {usable / 1e9:.1f} GB is usable "
                f"({gpu_memory_utilization:.0%} of {gpu.memory_bytes / 1e9:.0f} GB)")
        kv = usable - weights - reserve
    capacity = int(kv // per_token) if kv > 0 else 0
    capacity -= capacity % block_size_tokens
    if capacity < min_kv_tokens:
        raise LayoutDoesNotFit(
            f"{where}: after weights ({weights / 1e9:.1f} GB/GPU) and activations ({reserve / 1e9:.1f} GB) the KV "
            f"cache holds {max(capacity, 0)} tokens, fewer than the {min_kv_tokens} required")
    return MemoryPlan(weights, reserve, kv, per_token, capacity, block_size_tokens)
