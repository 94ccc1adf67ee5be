import math

import numpy as np
import pytest
import yaml

from benchmarks.gpu_published import (
    DEFAULT_YAML,
    SHAREGPT_MAX_INPUT_TOKENS,
    SHAREGPT_MAX_TOTAL_TOKENS,
    batch_latency_e2e_s,
    format_report,
    gpu_spec,
    load_entries,
    predict,
    prefill_iterations,
    sharegpt_like_lengths,
)
from cascadia.catalog import get_model
from cascadia.perf.layout import Layout
from cascadia.sim.cluster import StageDeployment, simulate
from cascadia.sim.config import EngineConfig
from cascadia.traces import Trace

ENTRIES = load_entries()
BY_ID = {e.id: e for e in ENTRIES}


def test_every_entry_is_cited_and_has_a_positive_value():
    raw = yaml.safe_load(DEFAULT_YAML.read_text())
    assert len(raw) == len(ENTRIES) == len(BY_ID) == 18  # ids unique
    for r in raw:
        assert r["url"].startswith("https://"), r["id"]
        assert len(r["quote"].strip()) > 10, r["id"]
        assert math.isfinite(float(r["value"])) and float(r["value"]) > 0, r["id"]


def test_custom_model_configs_map_onto_the_spec():
    dbrx = BY_ID["vllm-pr3692-h100-dbrx-tp4-bs8"].model
    shape = (dbrx.n_layers, dbrx.hidden_size, dbrx.n_kv_heads, dbrx.n_experts, dbrx.n_active_experts)
    assert shape == (40, 6144, 8, 16, 4)
    assert dbrx.moe_intermediate_size == 10752 and dbrx.vocab_size == 100352
    qwen = BY_ID["gpustack-vllm0110-h100-qwen3-8b-sharegpt-c1-tpot"].model
    assert not qwen.is_moe and qwen.intermediate_size == 12288 and not qwen.tie_word_embeddings


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.id)
def test_every_prediction_is_finite_and_positive(entry):
    p = predict(entry)
    assert math.isfinite(p.predicted) and p.predicted > 0
    assert p.approximate_workload == (entry.workload.kind != "batch_latency")


def test_batch_latency_grows_with_output_and_shrinks_with_bandwidth():
    m, a100 = get_model("llama-3-8b"), gpu_spec("A100-80G")
    base = batch_latency_e2e_s(m, a100, 1, 8, 32, 128)
    assert batch_latency_e2e_s(m, a100, 1, 8, 32, 256) > 1.5 * base
    assert batch_latency_e2e_s(m, gpu_spec("A100-40G"), 1, 8, 32, 128) > 1.2 * base
    assert batch_latency_e2e_s(m, a100.with_(memory_bandwidth_Bps=4e12), 1, 8, 32, 128) < 0.8 * base


def test_a100_40g_is_the_80g_part_with_less_memory_and_bandwidth():
    g = gpu_spec("A100-40G")
    assert g.memory_bytes == 40e9 and g.memory_bandwidth_Bps == 1.555e12
    assert g.peak_flops == gpu_spec("A100-80G").peak_flops


def test_prefill_packing_keeps_every_token_and_the_budget():
    iters = prefill_iterations(32, 1000, 8192)
    assert len(iters) == 4  # 32000 tokens in 8192-token iterations
    assert all(sum(c for c, _ in it) <= 8192 for it in iters)
    assert sum(c for it in iters for c, _ in it) == 32000
    # the prompt split across iterations 1 and 2 resumes where it stopped
    (c0, ctx0), (c1, ctx1) = iters[0][-1], iters[1][0]
    assert ctx0 == 0 and ctx1 == c0 and c0 + c1 == 1000


def test_batch_latency_matches_the_simulator_on_a_small_batch():
    e = BY_ID["vllm-ci-a100-llama3-8b-tp1-bs8"]
    w = e.workload
    trace = Trace("batch", np.zeros(w.batch_size), np.full(w.batch_size, w.input_tokens),
                  np.full(w.batch_size, w.output_tokens))
    res = simulate(trace, StageDeployment(e.model, e.gpu, (Layout(e.tp),), EngineConfig()))
    # the simulator starts an iteration at the first arrival, so request 0 prefills alone
    # and the batch takes one small iteration (~1/128 of the total) more
    assert res.e2e_s.max() == pytest.approx(predict(e).predicted, rel=0.01)
    assert res.e2e_s.max() >= predict(e).predicted


def test_synthetic_sharegpt_lengths_hit_the_means_and_the_client_filter():
    inputs, outputs = sharegpt_like_lengths(5000, 233.0, 194.0, seed=3)
    assert inputs.mean() == pytest.approx(233.0, rel=0.01)
    assert outputs.mean() == pytest.approx(194.0, rel=0.01)
    assert inputs.max() <= SHAREGPT_MAX_INPUT_TOKENS and (inputs + outputs).max() <= SHAREGPT_MAX_TOTAL_TOKENS
    assert min(inputs.min(), outputs.min()) >= 4
    assert np.median(inputs) < inputs.mean()  # heavy right tail, as ShareGPT


def test_more_load_means_slower_tokens_in_the_serving_entries():
    slow = predict(BY_ID["sglang-vllm060-a100-llama31-8b-sharegpt-rps8-tpot"]).predicted
    fast = predict(BY_ID["sglang-vllm060-a100-llama31-8b-sharegpt-rps4-tpot"]).predicted
    assert slow > fast


def test_report_lists_every_entry_and_the_mean_errors():
    preds = [predict(e) for e in ENTRIES]
    text = format_report(preds)
    assert all(e.id in text for e in ENTRIES)
    assert "batch_latency entries" in text and "all 18 entries" in text
    assert text.count("(approximate workload)") == sum(p.approximate_workload for p in preds) == 9
