import numpy as np
import pytest

from cascadia.catalog import get_model
from cascadia.perf.calibration import Calibration, CalibrationError, fit_calibration, spec_for_dtype
from cascadia.perf.iteration import BatchFeatures, Efficiency, IterationModel
from cascadia.perf.layout import Layout
from cascadia.perf.memory import LayoutDoesNotFit, plan_memory
from cascadia.perf.samples import IterationSample, ProfileRun
from cascadia.specs.gpu import CPU, get_gpu

H100 = get_gpu("H100")
# no fixed costs and an almost-pure max so roofline identities hold exactly
PURE = Efficiency(overhead_s=0.0, per_seq_s=0.0, overlap_p=60.0)


def test_doubling_bandwidth_halves_memory_bound_decode():
    m = get_model("llama-3-8b")
    slow = IterationModel(m, H100, Layout(1), PURE)
    fast = IterationModel(m, H100.with_(memory_bandwidth_Bps=2 * H100.memory_bandwidth_Bps), Layout(1), PURE)
    t1 = slow.iteration_time_s([], [512])
    t2 = fast.iteration_time_s([], [512])
    assert t2 == pytest.approx(t1 / 2, rel=1e-6)
    # ... and it is memory-bound: the time is the bytes over the effective bandwidth
    bytes_read = m.weight_bytes() - m.vocab_size * m.hidden_size * 2 + 513 * m.kv_bytes_per_token()
    assert t1 == pytest.approx(bytes_read / (H100.memory_bandwidth_Bps * PURE.memory), rel=1e-6)


def test_large_prefill_is_compute_bound():
    m = get_model("llama-3-8b")
    im = IterationModel(m, H100, Layout(1), PURE)
    t = im.iteration_time_s([(4096, 0)], [])
    flops = 4096 * m.linear_flops_per_token() + m.lm_head_flops_per_token()
    attn = (4096 * 4097 / 2) * m.attention_flops_per_token_pair()
    expected = flops / (H100.peak_flops * PURE.linear) + attn / (H100.peak_flops * PURE.attention)
    assert t == pytest.approx(expected, rel=1e-6)
    # twice the FLOP/s makes it twice as fast; twice the bandwidth barely matters
    t_flops = IterationModel(m, H100.with_(peak_flops=2 * H100.peak_flops), Layout(1), PURE).iteration_time_s([(4096, 0)], [])
    assert t_flops == pytest.approx(t / 2, rel=1e-6)


def test_tensor_parallel_adds_allreduce_and_cuts_weights():
    m = get_model("llama-3-70b")
    tp4 = IterationModel(m, H100, Layout(4), PURE)
    tp8 = IterationModel(m, H100, Layout(8), PURE)
    d4, d8 = tp4.iteration_time_s([], [1024] * 8), tp8.iteration_time_s([], [1024] * 8)
    assert d8 < d4 < 2 * d8 + 1e-3
    # the all-reduce term exists: tp8 is slower than the ideal half of tp4
    assert d8 > d4 / 2


def test_pipeline_across_nodes_costs_more_than_inside():
    m = get_model("llama-3-70b")
    inside = IterationModel(m, H100, Layout(4, 2, stage_nodes=(0, 0)))
    across = IterationModel(m, H100, Layout(4, 2, stage_nodes=(0, 1)))
    f = ([(2048, 0)], [])
    assert across.iteration_time_s(*f) > inside.iteration_time_s(*f)


def test_moe_reads_only_touched_experts():
    m = get_model("mixtral-8x7b")
    im = IterationModel(m, H100, Layout(2))
    one = im.weight_bytes_read(np.array([1.0]))[0]
    many = im.weight_bytes_read(np.array([4096.0]))[0]
    assert many == pytest.approx(m.weight_bytes() / 2, rel=0.01)  # every expert touched
    assert one < 0.4 * many  # one token touches 2 of 8 experts


def test_vectorised_decode_run_matches_single_iterations():
    m = get_model("llama-3-70b")
    im = IterationModel(m, H100, Layout(4, 2))
    run = im.decode_run_times_s(16, 16 * 700, 50)
    singles = [im.iteration_time_s([], [700 + j] * 16) for j in range(50)]
    np.testing.assert_allclose(run, singles, rtol=1e-12)
    arr = im.iteration_times_s(BatchFeatures.decode_run(16, 16 * 700, 50))
    np.testing.assert_allclose(run, arr, rtol=1e-12)


def test_memory_fit_and_rejection_reasons():
    m = get_model("llama-3-70b")
    ok = plan_memory(m, H100, Layout(4))
    assert ok.weights_per_gpu_bytes == pytest.approx(m.weight_bytes() / 4)
    assert ok.kv_capacity_tokens > 100_000
    with pytest.raises(LayoutDoesNotFit, match=r"weights need 141\.1 GB per GPU but only 72\.0 GB"):
        plan_memory(m, H100, Layout(1))


def test_deepseek_v3_needs_more_than_a_node_at_16_bits_but_fits_8_h100_at_4():
    ds = get_model("deepseek-v3-671b-awq")
    plan = plan_memory(ds, H100, Layout(8))
    assert ds.weight_bytes() == pytest.approx(351.4e9, rel=0.01)  # 4-bit + group scales, 16-bit embeddings
    assert plan.kv_capacity_tokens > 100_000
    ds16 = ds.with_(weight_bits=16, quantization=None)
    assert ds16.weight_bytes() > 8 * H100.memory_bytes  # 1.34 TB > 640 GB
    with pytest.raises(LayoutDoesNotFit, match="weights need"):
        plan_memory(ds16, H100, Layout(8))
    plan_memory(ds16, H100, Layout(8, 4, stage_nodes=(0, 1, 2, 3)))  # 4 nodes hold it


def test_mla_kv_is_replicated_over_tp_and_gqa_stops_splitting_at_kv_heads():
    from cascadia.perf.memory import kv_bytes_per_token_per_gpu
    ds = get_model("deepseek-v3-671b-awq")
    assert kv_bytes_per_token_per_gpu(ds, Layout(8)) == ds.kv_bytes_per_token()
    llama = get_model("llama-3-8b")  # 8 KV heads
    assert kv_bytes_per_token_per_gpu(llama, Layout(16)) == llama.kv_bytes_per_token() / 8


def test_layout_parse_and_errors():
    assert Layout.parse("tp4pp2") == Layout(4, 2)
    assert Layout.parse("4x2") == Layout(4, 2)
    with pytest.raises(ValueError, match="expected tpNppM"):
        Layout.parse("four")
    with pytest.raises(ValueError):
        Layout(0, 1)
    with pytest.raises(LayoutDoesNotFit, match="do not split"):
        plan_memory(get_model("smollm2-135m-instruct"), H100, Layout(2))  # 9 heads


def _synthetic_run(eff: Efficiency, model, rng) -> ProfileRun:
    im = IterationModel(model, CPU, Layout(1), eff)
    samples = []
    for p in (16, 48, 96, 192, 384, 768, 1024):
        samples.append(IterationSample(((p, 0),), (), im.iteration_time_s([(p, 0)], []), "fit:prefill"))
    for n in (1, 2, 4, 8, 16, 32):
        for c in (64, 256, 1024):
            t = im.iteration_time_s([], [c] * n)
            samples.append(IterationSample((), (c,) * n, t, "fit:decode"))
    for n, c in ((3, 128), (12, 512), (24, 768)):  # shapes not in the fit grid
        samples.append(IterationSample((), (c,) * n, im.iteration_time_s([], [c] * n), "eval:decode"))
    samples.append(IterationSample(((320, 0),), (200,) * 5, im.iteration_time_s([(320, 0)], [200] * 5), "eval:mixed"))
    noisy = tuple(IterationSample(s.prefill_chunks, s.decode_context_tokens,
                                  s.measured_s * (1 + rng.normal(0, 0.01)), s.label) for s in samples)
    return ProfileRun(model.name, "cpu", {"dtype": "float32"}, noisy)


def test_calibration_fit_recovers_a_known_engine_on_held_out_shapes(tmp_path):
    model = spec_for_dtype(get_model("smollm2-135m-instruct"), "float32")
    truth = Efficiency(linear=0.4, attention=0.15, memory=0.6, overlap_p=1.0, overhead_s=0.004, per_seq_s=3e-4)
    run = _synthetic_run(truth, model, np.random.default_rng(0))
    calib = fit_calibration(run, get_model("smollm2-135m-instruct"), CPU)
    assert calib.fit_report["n_held_out"] == 4
    assert calib.fit_report["held_out_mean_abs_rel_error"] < 0.03
    path = tmp_path / "calib.json"
    calib.save(path)
    back = Calibration.load(path)
    assert back.efficiency == calib.efficiency and back.dtype == "float32"
    im = back.iteration_model(get_model("smollm2-135m-instruct"))
    want = IterationModel(model, CPU, Layout(1), truth).iteration_time_s([], [300] * 7)
    assert im.iteration_time_s([], [300] * 7) == pytest.approx(want, rel=0.05)


def test_calibration_file_errors(tmp_path):
    with pytest.raises(CalibrationError, match="no such calibration file"):
        Calibration.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema_version": 99}')
    with pytest.raises(CalibrationError, match="schema_version 99"):
        Calibration.load(bad)
