"""Model specifications: the architecture numbers the performance model needs, and where
the weights come from. Built by hand (catalog) or from a Hugging Face `config.json`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

ATTENTION_KINDS = ("MHA", "GQA", "MLA")
QUANT_METHODS = (None, "awq", "gptq", "fp8", "int8")


class SpecError(ValueError):
    """A spec is inconsistent or a source file is missing a field; the message names it."""


@dataclass(frozen=True)
class WeightsSource:
    """Where a model's weights, tokenizer and chat template come from."""

    hf_id: str | None = None
    revision: str | None = None
    local_path: str | None = None
    tokenizer: str | None = None  # defaults to the weights' own tokenizer
    chat_template: str | None = None  # path or None for the tokenizer's own


@dataclass(frozen=True)
class ModelSpec:
    name: str
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    attention: str = "GQA"
    # Mixture of experts (0 experts = dense). `moe_intermediate_size` is one expert's.
    n_experts: int = 0
    n_active_experts: int = 0
    n_shared_experts: int = 0
    moe_intermediate_size: int = 0
    first_dense_layers: int = 0  # DeepSeek keeps its first k layers dense
    # Multi-head latent attention (DeepSeek-V2/V3); unused for MHA/GQA.
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    weight_bits: int = 16
    quantization: str | None = None
    kv_cache_bits: int = 16
    max_context_tokens: int = 8192
    tie_word_embeddings: bool = False
    weights: WeightsSource = field(default_factory=WeightsSource)

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_KINDS:
            raise SpecError(f"model {self.name}: attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if self.weight_bits not in (4, 8, 16, 32):
            raise SpecError(f"model {self.name}: weight_bits must be 4, 8, 16 or 32, got {self.weight_bits}")
        if self.quantization not in QUANT_METHODS:
            raise SpecError(f"model {self.name}: quantization must be one of {QUANT_METHODS}, got {self.quantization!r}")
        for f in ("n_layers", "hidden_size", "n_heads", "n_kv_heads", "head_dim", "vocab_size"):
            if getattr(self, f) <= 0:
                raise SpecError(f"model {self.name}: {f} must be positive, got {getattr(self, f)}")
        if self.n_experts and not (0 < self.n_active_experts <= self.n_experts):
            raise SpecError(f"model {self.name}: n_active_experts must be in 1..n_experts")
        if self.attention == "MLA" and not (self.kv_lora_rank and self.qk_rope_head_dim):
            raise SpecError(f"model {self.name}: MLA needs kv_lora_rank and qk_rope_head_dim")

    # ---- parameter counts (used for memory and FLOPs) ----
    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def attention_params_per_layer(self) -> int:
        h = self.hidden_size
        if self.attention == "MLA":
            qk_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
            if self.q_lora_rank:
                q = h * self.q_lora_rank + self.q_lora_rank * self.n_heads * qk_dim
            else:
                q = h * self.n_heads * qk_dim
            kv_a = h * (self.kv_lora_rank + self.qk_rope_head_dim)
            kv_b = self.kv_lora_rank * self.n_heads * (self.qk_nope_head_dim + self.v_head_dim)
            o = self.n_heads * self.v_head_dim * h
            return q + kv_a + kv_b + o
        q = h * self.n_heads * self.head_dim
        kv = 2 * h * self.n_kv_heads * self.head_dim
        o = self.n_heads * self.head_dim * h
        return q + kv + o

    def _n_moe_layers(self) -> int:
        return self.n_layers - self.first_dense_layers if self.is_moe else 0

    def mlp_params(self, active_only: bool) -> int:
        """Gated-MLP weights over all layers (3 matrices each); experts counted as active or all."""
        h = self.hidden_size
        dense_layers = self.n_layers - self._n_moe_layers()
        total = dense_layers * 3 * h * self.intermediate_size
        if self.is_moe:
            per_expert = 3 * h * self.moe_intermediate_size
            experts = self.n_active_experts if active_only else self.n_experts
            router = h * self.n_experts
            total += self._n_moe_layers() * ((experts + self.n_shared_experts) * per_expert + router)
        return total

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    def total_params(self) -> int:
        return self.n_layers * self.attention_params_per_layer() + self.mlp_params(False) + self.embedding_params()

    def active_params(self) -> int:
        """Parameters one token passes through (MoE: only its routed and shared experts)."""
        return self.n_layers * self.attention_params_per_layer() + self.mlp_params(True) + self.embedding_params()

    def linear_flops_per_token(self) -> float:
        """2 FLOPs per multiply-add through every active weight except the input embedding
        lookup (a gather, not a matmul); the LM head is counted separately (only sampled
        positions need logits)."""
        return 2.0 * (self.n_layers * self.attention_params_per_layer() + self.mlp_params(True))

    def lm_head_flops_per_token(self) -> float:
        return 2.0 * self.vocab_size * self.hidden_size

    def weight_bytes(self) -> float:
        """Bytes of all weights as stored: quantised linear layers at their bit width plus
        per-group scales (one 16-bit scale and a zero point per 128 weights for 4/8-bit
        group quantisation); embeddings and LM head stay 16-bit, as AWQ/GPTQ checkpoints keep them."""
        linear = self.n_layers * self.attention_params_per_layer() + self.mlp_params(False)
        bits = self.weight_bits
        if bits < 16 and self.quantization in ("awq", "gptq"):
            bits = bits + 20.0 / 128.0
        return linear * bits / 8.0 + self.embedding_params() * (4 if self.weight_bits == 32 else 2)

    def kv_bytes_per_token(self) -> float:
        """KV-cache bytes one token occupies across all layers (whole model, unsharded)."""
        b = self.kv_cache_bits / 8.0
        if self.attention == "MLA":
            return self.n_layers * (self.kv_lora_rank + self.qk_rope_head_dim) * b
        return self.n_layers * 2 * self.n_kv_heads * self.head_dim * b

    def attention_flops_per_token_pair(self) -> float:
        """FLOPs of scores + weighted sum for one query token against one cached token,
        over all layers."""
        if self.attention == "MLA":
            # vLLM runs MLA decode in the absorbed (latent) form: queries attend in the
            # kv_lora_rank + rope space and read back kv_lora_rank values.
            qk = self.kv_lora_rank + self.qk_rope_head_dim
            v = self.kv_lora_rank
            return 2.0 * self.n_layers * self.n_heads * (qk + v)
        return 4.0 * self.n_layers * self.n_heads * self.head_dim

    # ---- serialisation ----
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelSpec":
        d = dict(d)
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise SpecError(f"model spec has unknown field(s): {sorted(unknown)}")
        w = d.pop("weights", None) or {}
        return cls(weights=WeightsSource(**w), **d)

    def with_(self, **changes: Any) -> "ModelSpec":
        return replace(self, **changes)


def _need(cfg: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in cfg:
        raise SpecError(f"{where}: config.json has no field {key!r}")
    return cfg[key]


def model_from_hf_config(config: Mapping[str, Any] | str | Path, name: str | None = None,
                         weights: WeightsSource | None = None) -> ModelSpec:
    """Build a ModelSpec from a Hugging Face `config.json` (a dict, a file or its folder)."""
    where = "config"
    if isinstance(config, (str, Path)):
        p = Path(config)
        if p.is_dir():
            p = p / "config.json"
        where = str(p)
        try:
            config = json.loads(p.read_text())
        except FileNotFoundError:
            raise SpecError(f"{where}: no such file") from None
        except json.JSONDecodeError as e:
            raise SpecError(f"{where}:{e.lineno}: not valid JSON ({e.msg})") from None
        if weights is None and p.parent.exists():
            weights = WeightsSource(local_path=str(p.parent))
    cfg = dict(config)
    if "text_config" in cfg and "num_hidden_layers" not in cfg:
        cfg = {**cfg, **cfg["text_config"]}
    hidden = int(_need(cfg, "hidden_size", where))
    heads = int(_need(cfg, "num_attention_heads", where))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    n_experts = int(cfg.get("n_routed_experts") or cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
    active = int(cfg.get("num_experts_per_tok") or 0) if n_experts else 0
    mla = bool(cfg.get("kv_lora_rank"))
    attention = "MLA" if mla else ("MHA" if kv_heads == heads else "GQA")
    qcfg = cfg.get("quantization_config") or {}
    qmethod = qcfg.get("quant_method")
    bits = int(qcfg.get("bits") or qcfg.get("w_bit") or 16)
    if qmethod == "fp8":
        bits = 8
    torch_dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    if qmethod is None and "float32" in torch_dtype:
        bits = 32
    moe_inter = int(cfg.get("moe_intermediate_size") or (cfg.get("intermediate_size") if n_experts else 0) or 0)
    return ModelSpec(
        name=name or str(cfg.get("_name_or_path") or cfg.get("model_type") or "model"),
        n_layers=int(_need(cfg, "num_hidden_layers", where)),
        hidden_size=hidden,
        n_heads=heads,
        n_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=int(_need(cfg, "intermediate_size", where)),
        vocab_size=int(_need(cfg, "vocab_size", where)),
        attention=attention,
        n_experts=n_experts,
        n_active_experts=active,
        n_shared_experts=int(cfg.get("n_shared_experts") or 0),
        moe_intermediate_size=moe_inter,
        first_dense_layers=int(cfg.get("first_k_dense_replace") or 0),
        q_lora_rank=int(cfg.get("q_lora_rank") or 0),
        kv_lora_rank=int(cfg.get("kv_lora_rank") or 0),
        qk_rope_head_dim=int(cfg.get("qk_rope_head_dim") or 0),
        qk_nope_head_dim=int(cfg.get("qk_nope_head_dim") or 0),
        v_head_dim=int(cfg.get("v_head_dim") or 0),
        weight_bits=bits,
        quantization=qmethod if qmethod in QUANT_METHODS else None,
        kv_cache_bits=32 if bits == 32 else 16,
        max_context_tokens=int(cfg.get("max_position_embeddings") or 8192),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        weights=weights or WeightsSource(),
    )
