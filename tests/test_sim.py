import numpy as np
import pytest

from cascadia.catalog import get_model
from cascadia.perf.iteration import IterationModel
from cascadia.perf.layout import Layout
from cascadia.sim.cluster import StageDeployment, simulate
from cascadia.sim.config import EngineConfig
from cascadia.specs.gpu import get_gpu
from cascadia.traces import Trace, builtin_trace_path, load_trace

H100 = get_gpu("H100")
LLAMA8 = get_model("llama-3-8b")


def trace_of(arrivals, inputs, outputs, hash_ids=None, block=512):
    return Trace("t", np.asarray(arrivals, float), np.asarray(inputs), np.asarray(outputs), hash_ids=hash_ids,
                 hash_block_tokens=block)


def one_stage(layouts=(Layout(1),), **engine):
    return StageDeployment(LLAMA8, H100, tuple(layouts), EngineConfig(**engine))


def test_lone_request_ttft_is_its_prefill_and_tpot_the_batch1_decode():
    res = simulate(trace_of([0.0], [1000], [20]), one_stage())
    im = IterationModel(LLAMA8, H100, Layout(1))
    prefill = im.iteration_time_s([(1000, 0)], [])
    decodes = [im.iteration_time_s([], [1000 + j]) for j in range(19)]
    assert res.ttft_s[0] == pytest.approx(prefill, rel=1e-12)
    assert res.tpot_s[0] == pytest.approx(np.mean(decodes), rel=1e-9)
    assert res.e2e_s[0] == pytest.approx(prefill + sum(decodes), rel=1e-9)


def test_chunked_prefill_splits_a_long_prompt_over_iterations():
    res = simulate(trace_of([0.0], [5000], [1]), one_stage(max_num_batched_tokens=2048))
    im = IterationModel(LLAMA8, H100, Layout(1))
    chunks = [im.iteration_time_s([(2048, 0)], []), im.iteration_time_s([(2048, 2048)], []),
              im.iteration_time_s([(904, 4096)], [])]
    assert res.ttft_s[0] == pytest.approx(sum(chunks), rel=1e-9)
    off = simulate(trace_of([0.0], [5000], [1]), one_stage(max_num_batched_tokens=8192, enable_chunked_prefill=False))
    assert off.ttft_s[0] < res.ttft_s[0]  # one big iteration avoids re-reading weights


def test_without_chunked_prefill_a_prefill_stalls_running_decodes():
    tr = trace_of([0.0, 0.5], [100, 3000], [200, 5])
    mixed = simulate(tr, one_stage())
    stalled = simulate(tr, one_stage(enable_chunked_prefill=False))
    im = IterationModel(LLAMA8, H100, Layout(1))
    # request 1's prompt runs alone: TTFT is exactly its prefill after the iteration in flight
    assert stalled.ttft_s[1] < mixed.ttft_s[1] + 1e-9
    # request 0's decodes wait for that prefill-only iteration: a longer TPOT than when mixed
    assert stalled.tpot_s[0] > mixed.tpot_s[0]
    assert stalled.e2e_s[0] - mixed.e2e_s[0] == pytest.approx(im.iteration_time_s([(3000, 0)], []) -
                                                              (im.iteration_time_s([(3000, 0)], [200]) -
                                                               im.iteration_time_s([], [200])), rel=0.05)


def test_batching_shares_iterations():
    lone = simulate(trace_of([0.0], [200], [100]), one_stage())
    eight = simulate(trace_of([0.0] * 8, [200] * 8, [100] * 8), one_stage())
    # requests sent together are scheduled together
    assert eight.iterations == lone.iterations
    assert eight.e2e_s.max() < 1.3 * lone.e2e_s[0]  # memory-bound: batching is nearly free
    assert eight.output_tokens_per_s() > 6 * lone.output_tokens_per_s()


def test_dispatcher_spreads_simultaneous_requests_over_replicas():
    res = simulate(trace_of([0.0, 0.0], [500, 500], [50, 50]), one_stage(layouts=(Layout(1), Layout(1))))
    assert np.all(res.engine_busy_s > 0)
    lone = simulate(trace_of([0.0], [500], [50]), one_stage())
    np.testing.assert_allclose(res.e2e_s, lone.e2e_s[0], rtol=1e-12)


def test_max_num_seqs_queues_the_rest():
    res = simulate(trace_of([0.0] * 4, [100] * 4, [10] * 4), one_stage(max_num_seqs=2))
    assert res.e2e_s[2] > res.e2e_s[0] * 1.8  # the second pair waits for the first


@pytest.mark.parametrize("kv_tokens,expect_preemptions", [(None, False), (8192, True)])
def test_fast_forward_equals_step_by_step_on_500_azure_requests(kv_tokens, expect_preemptions):
    trace = load_trace(builtin_trace_path("azure-conv")).select(slice(0, 500))
    engine = {}
    if kv_tokens:  # a tiny KV cache forces preemptions and block-limited runs
        engine = {"kv_cache_bytes": kv_tokens * LLAMA8.kv_bytes_per_token(), "min_kv_tokens": 1024}
    stage = one_stage(layouts=(Layout(1), Layout(1)), **engine)
    ff = simulate(trace, stage, fast_forward=True)
    step = simulate(trace, stage, fast_forward=False)
    assert ff.n_unfinished == step.n_unfinished == 0
    assert ff.iterations == step.iterations
    np.testing.assert_allclose(ff.ttft_s, step.ttft_s, rtol=0, atol=1e-9)
    np.testing.assert_allclose(ff.e2e_s, step.e2e_s, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(ff.preemptions, step.preemptions)
    assert (ff.preemptions.sum() > 0) == expect_preemptions
    assert ff.events < step.events / 3  # fast-forward actually skipped work


def test_cascade_latency_adds_up_over_stages_and_judge():
    big = StageDeployment(get_model("llama-3-70b"), H100, (Layout(4),))
    small = one_stage()
    tr = trace_of([0.0, 100.0], [300, 300], [40, 40])
    res = simulate(tr, [small, big], visits=np.array([1, 2]), judge_latency_s=0.5)
    s1 = simulate(trace_of([0.0], [300], [40]), small)
    s2 = simulate(trace_of([0.0], [300], [40]), big)
    # request 0 stops at stage 1 (judged: held until the judge is done, TTFT = E2E)
    assert res.e2e_s[0] == pytest.approx(s1.e2e_s[0] + 0.5, rel=1e-9)
    assert res.ttft_s[0] == pytest.approx(res.e2e_s[0])
    # request 1 visits both; the last stage streams
    assert res.e2e_s[1] == pytest.approx(s1.e2e_s[0] + 0.5 + s2.e2e_s[0], rel=1e-9)
    assert res.ttft_s[1] == pytest.approx(s1.e2e_s[0] + 0.5 + s2.ttft_s[0], rel=1e-9)
    assert res.stage_shares.tolist() == [1.0, 0.5]
    with pytest.raises(ValueError, match="visits must be in 1..2"):
        simulate(tr, [small, big], visits=np.array([1, 3]))


def test_pipeline_parallel_replica_runs_virtual_engines():
    stage = StageDeployment(get_model("llama-3-70b"), H100, (Layout(4, 2),))
    res = simulate(trace_of([0.0, 0.0], [400, 400], [30, 30]), stage)
    assert len(res.engine_names) == 2 and np.all(res.engine_busy_s > 0)
    im = IterationModel(get_model("llama-3-70b"), H100, Layout(4, 2))
    assert res.ttft_s[0] == pytest.approx(im.iteration_time_s([(400, 0)], []), rel=1e-12)


def test_prefix_cache_skips_shared_prefill():
    shared = tuple(range(4))  # 4 blocks x 512 tokens
    tr = trace_of([0.0, 10.0], [2100, 2100], [5, 5], hash_ids=(shared, shared))
    cached = simulate(tr, one_stage(enable_prefix_caching=True))
    plain = simulate(tr, one_stage())
    assert cached.prefix_hit_tokens == 2048
    assert cached.ttft_s[0] == pytest.approx(plain.ttft_s[0])
    assert cached.ttft_s[1] < 0.2 * plain.ttft_s[1]


def test_requests_that_never_fit_are_reported_unfinished():
    engine = {"kv_cache_bytes": 2048 * LLAMA8.kv_bytes_per_token(), "min_kv_tokens": 1024}
    # the long one arrives first: rejected up front, it must not block the queue
    res = simulate(trace_of([0.0, 0.0], [5000, 100], [10, 10]), one_stage(**engine))
    assert res.n_unfinished == 1 and res.n_rejected == 1
    assert np.isnan(res.e2e_s[0]) and np.isfinite(res.e2e_s[1])


def test_visits_from_shares_and_from_profile():
    from cascadia.quality import builtin_profile_path, load_quality, replay
    from cascadia.sim.routing import visits_from_profile, visits_from_shares

    v = visits_from_shares([1.0, 0.4, 0.1], 1000, seed=1)
    assert [(v > s).mean() for s in range(3)] == [1.0, 0.4, 0.1]
    with pytest.raises(ValueError, match="non-increasing"):
        visits_from_shares([1.0, 0.2, 0.5], 10)
    prof = load_quality(builtin_profile_path("mtbench"))
    thr = [8.0]
    visits = visits_from_profile(prof, thr, 20000, seed=3)
    expected = replay(prof, np.array(thr)).stage_shares[0, 1]
    assert (visits == 2).mean() == pytest.approx(expected, abs=0.015)
    # the cascade simulation sends exactly those requests to stage 2
    tr = trace_of(np.arange(50) * 2.0, [100] * 50, [10] * 50)
    res = simulate(tr, [one_stage(), one_stage()], visits=visits[:50])
    np.testing.assert_array_equal(res.final_stage, visits[:50] - 1)


def test_llm_judge_served_by_a_stage_adds_its_own_queueing():
    from cascadia.sim.cluster import JudgeLoad

    small, big = one_stage(), StageDeployment(get_model("llama-3-70b"), H100, (Layout(4),))
    tr = trace_of([0.0], [300], [40])
    fixed = simulate(tr, [small, big], visits=np.array([1]), judge_latency_s=0.0)
    served = simulate(tr, [small, big], visits=np.array([1]), judge=JudgeLoad(stage=1, prompt_overhead_tokens=200,
                                                                               output_tokens=8))
    # the verdict waits for a 540-token prompt and 8 tokens on the 70B stage
    im = IterationModel(get_model("llama-3-70b"), H100, Layout(4))
    judge_s = im.iteration_time_s([(540, 0)], []) + sum(im.iteration_time_s([], [540 + j]) for j in range(7))
    assert served.e2e_s[0] == pytest.approx(fixed.e2e_s[0] + judge_s, rel=1e-9)
    assert served.engine_busy_s[1] > 0 and fixed.engine_busy_s[1] == 0
    # escalated requests are judged once (stage 0), then stage 1 answers unjudged
    both = simulate(trace_of([0.0, 0.0], [300, 300], [40, 40]), [small, big], visits=np.array([1, 2]),
                    judge=JudgeLoad(stage=1))
    assert np.all(np.isfinite(both.e2e_s)) and both.final_stage.tolist() == [0, 1]
    with pytest.raises(ValueError, match="judge stage"):
        simulate(tr, [small, big], judge=JudgeLoad(stage=2))
