import json

import pytest

from cascadia.catalog import MODELS, get_model
from cascadia.specs import CascadeSpec, SLOSpec, SpecError, get_gpu, model_from_hf_config, parse_cluster
from cascadia.specs.cluster import cluster_from_yaml


def test_catalog_parameter_counts_match_published_sizes():
    # published sizes: Llama-3-8B 8.03B, Llama-3-70B 70.6B, Mixtral 46.7B total / 12.9B active,
    # DeepSeek-V3 671B total / 37B active
    assert get_model("llama-3-8b").total_params() == pytest.approx(8.03e9, rel=0.01)
    assert get_model("llama-3-70b").total_params() == pytest.approx(70.6e9, rel=0.01)
    mix = get_model("mixtral-8x7b")
    assert mix.total_params() == pytest.approx(46.7e9, rel=0.01)
    assert mix.active_params() == pytest.approx(12.9e9, rel=0.02)
    ds = get_model("deepseek-v3-671b-awq")
    assert ds.total_params() == pytest.approx(671e9, rel=0.01)
    assert ds.active_params() == pytest.approx(37.5e9, rel=0.03)
    assert ds.attention == "MLA" and ds.weight_bits == 4 and ds.quantization == "awq"
    assert get_model("smollm2-135m-instruct").total_params() == pytest.approx(134.5e6, rel=0.01)
    for name in ("smollm2-135m-instruct", "llama-3-8b", "llama-3-70b", "deepseek-r1-distill-qwen-7b",
                 "deepseek-r1-distill-llama-70b", "deepseek-v3-671b-awq", "mixtral-8x7b"):
        assert name in MODELS


def test_kv_bytes_per_token():
    # Llama-3-8B: 32 layers x 2 (K,V) x 8 heads x 128 dims x 2 bytes = 131072
    assert get_model("llama-3-8b").kv_bytes_per_token() == 131072
    # DeepSeek-V3 MLA: 61 layers x (512 + 64) x 2 bytes
    assert get_model("deepseek-v3-671b-awq").kv_bytes_per_token() == 61 * 576 * 2


def test_model_from_hf_config_dense_moe_and_mla(tmp_path):
    llama = {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32,
             "intermediate_size": 14336, "vocab_size": 128256, "max_position_embeddings": 8192,
             "torch_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(llama))
    m = model_from_hf_config(tmp_path, name="mine")
    assert (m.attention, m.head_dim, m.weight_bits) == ("GQA", 128, 16)
    assert m.total_params() == get_model("llama-3-8b").total_params()
    assert m.weights.local_path == str(tmp_path)
    mixtral = dict(llama, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000)
    mm = model_from_hf_config(mixtral, name="mixtral")
    assert mm.n_experts == 8 and mm.n_active_experts == 2 and mm.moe_intermediate_size == 14336
    mla = {"hidden_size": 7168, "num_attention_heads": 128, "num_key_value_heads": 128, "num_hidden_layers": 61,
           "intermediate_size": 18432, "moe_intermediate_size": 2048, "vocab_size": 129280, "n_routed_experts": 256,
           "num_experts_per_tok": 8, "n_shared_experts": 1, "first_k_dense_replace": 3, "q_lora_rank": 1536,
           "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128,
           "quantization_config": {"quant_method": "awq", "bits": 4}}
    ds = model_from_hf_config(mla, name="ds")
    assert ds.attention == "MLA" and ds.weight_bits == 4
    assert ds.total_params() == get_model("deepseek-v3-671b-awq").total_params()


def test_model_from_hf_config_errors_name_the_field(tmp_path):
    with pytest.raises(SpecError, match="hidden_size"):
        model_from_hf_config({"num_attention_heads": 4})
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(SpecError, match=r"config.json:1: not valid JSON"):
        model_from_hf_config(bad)


def test_model_spec_round_trip():
    m = get_model("deepseek-v3-671b-awq")
    assert type(m).from_dict(m.to_dict()) == m
    with pytest.raises(SpecError, match="unknown field"):
        type(m).from_dict({**m.to_dict(), "bogus": 1})


def test_gpus_and_clusters(tmp_path):
    assert get_gpu("h100").memory_bytes == 80e9
    assert get_gpu("A100").name == "A100-80G"
    with pytest.raises(KeyError, match="unknown GPU"):
        get_gpu("V100")
    c = parse_cluster("4x8xH100")
    assert c.n_gpus == 32 and c.homogeneous and c.describe() == "4x8xH100"
    mixed = parse_cluster("2x8xH100+1x4xA100-80G")
    assert mixed.gpu_counts() == {"H100": 16, "A100-80G": 4} and not mixed.homogeneous
    for bad in ("4x8", "ax8xH100", "4x8xV100"):
        with pytest.raises(SpecError):
            parse_cluster(bad)
    y = tmp_path / "c.yaml"
    y.write_text("pools:\n  - {gpu: H100, nodes: 4, gpus_per_node: 8, inter_node_gbps: 200}\n  - {gpu: L40S, nodes: 1, gpus_per_node: 4}\n")
    cy = cluster_from_yaml(y)
    assert cy.n_gpus == 36
    assert cy.pools[0].gpu.inter_node_bandwidth_Bps == 25e9
    y.write_text("pools:\n  - {gpu: H100, nodes: 4}\n")
    with pytest.raises(SpecError, match=r"pools\[0\] is missing 'gpus_per_node'"):
        cluster_from_yaml(y)


def test_cascade_and_slo():
    c = CascadeSpec.parse("llama-3-8b, llama-3-70b")
    assert c.n_stages == 2
    with pytest.raises(SpecError, match="needs 1 thresholds"):
        CascadeSpec(("a", "b"), thresholds=(1.0, 2.0))
    s = SLOSpec.parse("ttft:500,e2e:10000")
    assert s.ttft_ms == 500 and s.e2e_ms == 10000 and s.tpot_ms is None
    with pytest.raises(SpecError, match="expected ttft"):
        SLOSpec.parse("latency:5")
    with pytest.raises(SpecError, match="number of ms"):
        SLOSpec.parse("ttft:fast")
