"""Engine settings the simulator reproduces (vLLM's names, same meaning)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class EngineConfig:
    max_num_batched_tokens: int = 8192  # token budget of one iteration
    max_num_seqs: int = 256  # cap on running sequences
    block_size_tokens: int = 16  # KV-cache block
    gpu_memory_utilization: float = 0.9
    kv_cache_bytes: float | None = None  # per device; fixes the KV cache (vLLM-CPU: VLLM_CPU_KVCACHE_SPACE)
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = False
    min_kv_tokens: int = 2048

    def __post_init__(self) -> None:
        if self.max_num_seqs > self.max_num_batched_tokens:
            raise ValueError("max_num_seqs must not exceed max_num_batched_tokens (every running "
                             "sequence must be able to decode in the same iteration)")
        if min(self.max_num_batched_tokens, self.max_num_seqs, self.block_size_tokens) < 1:
            raise ValueError("max_num_batched_tokens, max_num_seqs and block_size_tokens must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_engine_report(cls, report: Mapping[str, Any], kv_bytes_per_token: float) -> "EngineConfig":
        """The settings a real engine reported it runs with (`vllm_adapter.EffectiveSettings`
        as a dict, kept in calibration files), so the simulator reproduces that engine."""
        kw: dict[str, Any] = {}
        for ours, theirs in (("max_num_batched_tokens", "max_num_batched_tokens"), ("max_num_seqs", "max_num_seqs"),
                             ("block_size_tokens", "block_size"), ("enable_prefix_caching", "enable_prefix_caching"),
                             ("enable_chunked_prefill", "enable_chunked_prefill")):
            if report.get(theirs) is not None:
                kw[ours] = report[theirs]
        if report.get("kv_capacity_tokens"):
            kw["kv_cache_bytes"] = float(report["kv_capacity_tokens"]) * kv_bytes_per_token
            kw["min_kv_tokens"] = min(cls.min_kv_tokens, int(report["kv_capacity_tokens"]))
        return cls(**kw)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EngineConfig":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})
