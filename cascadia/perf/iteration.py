"""Latency of one engine iteration of a continuous-batching engine on one replica.

Per pipeline stage and GPU, a roofline: compute time (dense matmuls and attention, each at
its own efficiency) against memory time (weights, KV reads and writes), combined with a
p-norm so a calibration can say how much the two overlap (p=1: they add up, as on a CPU;
large p: the slower one hides the other, as on a GPU). Tensor-parallel all-reduces and
pipeline hand-offs go over the link the layout uses; a fixed per-iteration cost and a
per-sequence cost cover scheduling, sampling and launches.

All functions take numpy arrays of batch features so the simulator can price a run of
identical decode iterations in one call.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from cascadia.perf.layout import Layout
from cascadia.perf.memory import kv_bytes_per_token_per_gpu
from cascadia.specs.gpu import GPUSpec
from cascadia.specs.model import ModelSpec


@dataclass(frozen=True)
class Efficiency:
    """Fractions of the device's peak figures an engine reaches, plus fixed costs.
    Defaults are first-principles GPU guesses (vLLM with CUDA graphs); a calibration file
    replaces them with fitted values."""

    linear: float = 0.55  # of peak FLOP/s in dense matmuls
    attention: float = 0.35  # of peak FLOP/s in attention kernels
    memory: float = 0.80  # of peak memory bandwidth
    overlap_p: float = 6.0  # p-norm of (compute, memory): 1 = serial, large = max
    overhead_s: float = 0.003  # per iteration (scheduler, input prep, launches)
    per_seq_s: float = 2e-5  # per sequence in the batch (sampling, detokenising)

    def to_dict(self) -> dict:
        return asdict(self)


def _overlap(t_compute: np.ndarray, t_memory: np.ndarray, p: float) -> np.ndarray:
    """p-norm of compute and memory time: their sum at p=1, their max as p grows."""
    if p == 1.0:
        return t_compute + t_memory
    hi = np.maximum(t_compute, t_memory)
    lo = np.minimum(t_compute, t_memory)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(hi > 0, lo / hi, 0.0)
    return hi * (1.0 + ratio**p) ** (1.0 / p)


@dataclass(frozen=True)
class BatchFeatures:
    """What an iteration's cost depends on (arrays of equal length, one per iteration).

    tokens: tokens computed (prefill chunk tokens + one per decoding sequence)
    seqs: sequences in the batch (each samples one token when its known tokens are done)
    attn_pairs: query-key pairs over the batch (sum over sequences of new x context)
    kv_read_tokens: cached tokens read by attention
    """

    tokens: np.ndarray
    seqs: np.ndarray
    attn_pairs: np.ndarray
    kv_read_tokens: np.ndarray

    @classmethod
    def of_batch(cls, prefill_chunks: Sequence[tuple[int, int]], decode_context_tokens: Sequence[int]) -> "BatchFeatures":
        """One iteration: prefill chunks (chunk_tokens, context_before) and decode contexts."""
        tokens = float(len(decode_context_tokens))
        pairs = float(sum(decode_context_tokens)) + tokens
        kv_read = float(sum(decode_context_tokens))
        for chunk, ctx in prefill_chunks:
            tokens += chunk
            pairs += chunk * ctx + chunk * (chunk + 1) / 2.0
            kv_read += ctx
        seqs = float(len(prefill_chunks) + len(decode_context_tokens))
        one = lambda v: np.array([v], dtype=np.float64)  # noqa: E731
        return cls(one(tokens), one(seqs), one(pairs), one(kv_read))

    @classmethod
    def decode_run(cls, n_seqs: int, context_sum_start: float, steps: int) -> "BatchFeatures":
        """`steps` decode iterations of the same n sequences; each step adds n to the context."""
        ctx = context_sum_start + n_seqs * np.arange(steps, dtype=np.float64)
        n = np.full(steps, float(n_seqs))
        return cls(n, n, ctx + n, ctx)


class IterationModel:
    """Prices iterations of `model` on one replica with `layout` on `gpu`."""

    def __init__(self, model: ModelSpec, gpu: GPUSpec, layout: Layout, eff: Efficiency | None = None,
                 gpus_per_node: int | None = None):
        self.model, self.gpu, self.layout = model, gpu, layout
        self.eff = eff or Efficiency()
        n_gpu = layout.n_gpus
        m = model
        self._act_bytes = 4.0 if m.weight_bits == 32 else 2.0
        # Everything below is per GPU per pipeline stage: the work splits over tp*pp GPUs.
        self._linear_flops_per_token = m.linear_flops_per_token() / n_gpu
        self._lm_head_flops_per_seq = m.lm_head_flops_per_token() / n_gpu
        self._attn_flops_per_pair = m.attention_flops_per_token_pair() / n_gpu
        self._kv_bytes_per_token = kv_bytes_per_token_per_gpu(m, layout) * 1.0
        # Weights read once per iteration; MoE reads only the experts the batch touches.
        total = m.weight_bytes()
        self._input_embedding_bytes = m.vocab_size * m.hidden_size * self._act_bytes if not m.tie_word_embeddings else 0.0
        if m.is_moe:
            bits = m.weight_bits + (20.0 / 128.0 if m.weight_bits < 16 and m.quantization in ("awq", "gptq") else 0.0)
            self._expert_bytes = 3 * m.hidden_size * m.moe_intermediate_size * bits / 8.0
            self._moe_layers = m.n_layers - m.first_dense_layers
            all_experts = self._moe_layers * m.n_experts * self._expert_bytes
        else:
            self._expert_bytes, self._moe_layers, all_experts = 0.0, 0, 0.0
        self._dense_weight_bytes = total - all_experts - self._input_embedding_bytes
        self._peak_flops = gpu.peak_flops
        self._bw = gpu.memory_bandwidth_Bps
        self._comm = self._comm_model(gpus_per_node)

    def _comm_model(self, gpus_per_node: int | None) -> tuple[float, float, float, float]:
        """(all-reduce fixed s per stage, all-reduce s per token per stage, hand-off fixed s,
        hand-off s per token) for the whole pipeline."""
        m, lay, g = self.model, self.layout, self.gpu
        layers_per_stage = m.n_layers / lay.pp
        if lay.tp > 1:
            bytes_per_token = m.hidden_size * self._act_bytes
            ring = 2.0 * (lay.tp - 1) / lay.tp
            # two ring all-reduces per layer (after attention and after the MLP), each
            # 2(tp-1) hops of fixed latency plus its bytes over the link
            ar_fixed = 2 * layers_per_stage * 2 * (lay.tp - 1) * g.intra_node_latency_s
            ar_per_token = 2 * layers_per_stage * ring * bytes_per_token / g.intra_node_bandwidth_Bps
        else:
            ar_fixed = ar_per_token = 0.0
        hops = lay.pp - 1
        cross = lay.n_cross_node_hops() if lay.stage_nodes is not None else 0
        if gpus_per_node is not None and lay.stage_nodes is None and lay.n_gpus > gpus_per_node:
            cross = max(1, hops)  # a replica larger than a node must cross somewhere
        inner = hops - cross
        ho_fixed = inner * g.intra_node_latency_s + cross * g.inter_node_latency_s
        bt = m.hidden_size * self._act_bytes
        ho_per_token = inner * bt / g.intra_node_bandwidth_Bps + cross * bt / g.inter_node_bandwidth_Bps
        return ar_fixed, ar_per_token, ho_fixed, ho_per_token

    def weight_bytes_read(self, tokens: np.ndarray) -> np.ndarray:
        """Per GPU: dense weights always, experts only as many as the batch's tokens touch
        (expected distinct experts out of n_experts when each token picks k at random)."""
        n_gpu = self.layout.n_gpus
        if not self._moe_layers:
            return np.full_like(tokens, self._dense_weight_bytes / n_gpu)
        m = self.model
        miss = (1.0 - m.n_active_experts / m.n_experts) ** tokens
        touched = m.n_experts * (1.0 - miss)
        return (self._dense_weight_bytes + self._moe_layers * touched * self._expert_bytes) / n_gpu

    def stage_times_s(self, f: BatchFeatures) -> np.ndarray:
        """Time one pipeline stage is busy with the batch (compute/memory roofline + TP comm)."""
        e = self.eff
        pp = self.layout.pp
        # per-GPU work of the whole model is split over pp stages as well (uniform layers)
        lin = (f.tokens * self._linear_flops_per_token + f.seqs * self._lm_head_flops_per_seq)
        attn = f.attn_pairs * self._attn_flops_per_pair
        t_compute = lin / (self._peak_flops * e.linear) + attn / (self._peak_flops * e.attention)
        # kv_bytes_per_token_per_gpu already divides by pp; weights and flops divide by tp*pp
        mem_bytes = self.weight_bytes_read(f.tokens) + (f.kv_read_tokens + f.tokens) * self._kv_bytes_per_token
        t_memory = mem_bytes / (self._bw * e.memory)
        t = _overlap(t_compute, t_memory, e.overlap_p)
        ar_fixed, ar_per_token, _, _ = self._comm
        # per-stage share of the per-iteration costs keeps the whole-pipeline sum right
        return t + ar_fixed + ar_per_token * f.tokens + (e.overhead_s + e.per_seq_s * f.seqs) / pp

    def iteration_times_s(self, f: BatchFeatures) -> np.ndarray:
        """Latency of one iteration through all pipeline stages, hand-offs included."""
        _, _, ho_fixed, ho_per_token = self._comm
        return self.layout.pp * self.stage_times_s(f) + ho_fixed + ho_per_token * f.tokens

    def iteration_time_s(self, prefill_chunks: Sequence[tuple[int, int]], decode_context_tokens: Sequence[int]) -> float:
        f = BatchFeatures.of_batch(prefill_chunks, decode_context_tokens)
        return self.time_one(float(f.tokens[0]), float(f.seqs[0]), float(f.attn_pairs[0]), float(f.kv_read_tokens[0]))

    def time_one(self, tokens: float, seqs: float, attn_pairs: float, kv_read_tokens: float) -> float:
        """`iteration_times_s` for a single iteration in plain floats: the simulator calls
        this for every iteration that is not part of a fast-forwarded run, where numpy's
        per-call cost on one-element arrays would dominate."""
        e = self.eff
        n_gpu = self.layout.n_gpus
        if self._moe_layers:
            m = self.model
            touched = m.n_experts * (1.0 - (1.0 - m.n_active_experts / m.n_experts) ** tokens)
            weights = (self._dense_weight_bytes + self._moe_layers * touched * self._expert_bytes) / n_gpu
        else:
            weights = self._dense_weight_bytes / n_gpu
        lin = tokens * self._linear_flops_per_token + seqs * self._lm_head_flops_per_seq
        t_compute = lin / (self._peak_flops * e.linear) + attn_pairs * self._attn_flops_per_pair / (self._peak_flops * e.attention)
        t_memory = (weights + (kv_read_tokens + tokens) * self._kv_bytes_per_token) / (self._bw * e.memory)
        p = e.overlap_p
        if p == 1.0:
            t = t_compute + t_memory
        else:
            hi, lo = (t_compute, t_memory) if t_compute >= t_memory else (t_memory, t_compute)
            t = hi * (1.0 + (lo / hi) ** p) ** (1.0 / p) if hi > 0 else 0.0
        ar_fixed, ar_per_token, ho_fixed, ho_per_token = self._comm
        pp = self.layout.pp
        stage = t + ar_fixed + ar_per_token * tokens + (e.overhead_s + e.per_seq_s * seqs) / pp
        return pp * stage + ho_fixed + ho_per_token * tokens

    def decode_run_times_s(self, n_seqs: int, context_sum_start: float, steps: int) -> np.ndarray:
        """`iteration_times_s(BatchFeatures.decode_run(...))` with the terms that do not
        change over the run hoisted out: the simulator's hot path."""
        e = self.eff
        n = float(n_seqs)
        ctx = context_sum_start + n * np.arange(steps, dtype=np.float64)
        pairs = ctx + n
        if self._moe_layers:
            m = self.model
            touched = m.n_experts * (1.0 - (1.0 - m.n_active_experts / m.n_experts) ** n)
            weights = (self._dense_weight_bytes + self._moe_layers * touched * self._expert_bytes) / self.layout.n_gpus
        else:
            weights = self._dense_weight_bytes / self.layout.n_gpus
        lin = n * self._linear_flops_per_token + n * self._lm_head_flops_per_seq
        t_compute = lin / (self._peak_flops * e.linear) + pairs * (self._attn_flops_per_pair / (self._peak_flops * e.attention))
        t_memory = (weights + pairs * self._kv_bytes_per_token) / (self._bw * e.memory)
        t = _overlap(t_compute, t_memory, e.overlap_p)
        ar_fixed, ar_per_token, ho_fixed, ho_per_token = self._comm
        pp = self.layout.pp
        fixed = ar_fixed + ar_per_token * n + (e.overhead_s + e.per_seq_s * n) / pp
        return pp * (t + fixed) + (ho_fixed + ho_per_token * n)
