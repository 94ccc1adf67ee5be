"""Shared latency/SLO metrics (cascadia.metrics) on records written from a scripted clock,
against values computed by hand; and the simulator's results through the same functions."""

import math

import numpy as np
import pytest

from benchmarks.replay.records import ERROR, OK, ReplayRecord, timings
from cascadia import metrics
from cascadia.metrics import SLO


def scripted_records():
    """Five requests; every time comes from this script (seconds since the run started).

    r0: sent 0.0, tokens at 0.5 0.7 1.0 1.4 (stage 0)   TTFT 0.5  E2E 1.4  TPOT 0.3
    r1: sent 1.0, tokens at 1.2 1.3         (stage 1)   TTFT 0.2  E2E 0.3  TPOT 0.1
    r2: sent 2.0, finished at 2.5, no token (stage 0)   TTFT n/a  E2E 0.5  TPOT n/a
    r3: sent 3.0, HTTP 503 at 3.1                       failed
    r4: sent 4.0, one token at 5.0          (stage 1)   TTFT 1.0  E2E 1.0  TPOT n/a
    """
    def rec(i, send, toks, end, stage, status=OK, out=None):
        return ReplayRecord(index=i, request_id=f"r{i}", scheduled_s=send, input_tokens=10, max_tokens=4,
                            send_s=send, end_s=end, token_times_s=list(toks),
                            output_tokens=len(toks) if out is None else out, status=status, stage=stage,
                            http_status=200 if status == OK else 503)
    return [rec(0, 0.0, [0.5, 0.7, 1.0, 1.4], 1.4, 0), rec(1, 1.0, [1.2, 1.3], 1.3, 1),
            rec(2, 2.0, [], 2.5, 0), rec(3, 3.0, [], 3.1, None, status=ERROR), rec(4, 4.0, [5.0], 5.0, 1)]


@pytest.fixture
def t():
    return timings(scripted_records())


def test_per_request_ttft_tpot_e2e_and_pooled_itl(t):
    np.testing.assert_allclose(t.ttft_s, [0.5, 0.2, np.nan, np.nan, 1.0])
    np.testing.assert_allclose(t.e2e_s, [1.4, 0.3, 0.5, np.inf, 1.0])
    np.testing.assert_allclose(t.tpot_s, [0.3, 0.1, np.nan, np.nan, np.nan])
    np.testing.assert_allclose(np.sort(t.itl_s), [0.1, 0.2, 0.3, 0.4])
    assert t.n_failed == 1 and list(t.ok) == [True, True, True, False, True]


def test_summary_percentiles_throughput_and_failures(t):
    s = metrics.summarize(t)
    assert (s["requests"], s["completed"], s["failed"]) == (5, 4, 1)
    assert s["span_s"] == pytest.approx(5.0)
    assert s["requests_per_s"] == pytest.approx(4 / 5.0)
    assert s["output_tokens_per_s"] == pytest.approx(7 / 5.0)
    # TTFT of [0.5, 0.2, 1.0]: linear interpolation on the sorted [0.2, 0.5, 1.0]
    assert s["ttft_s"]["p50"] == pytest.approx(0.5)
    assert s["ttft_s"]["p90"] == pytest.approx(0.9)
    assert s["ttft_s"]["p99"] == pytest.approx(0.99)
    assert s["ttft_s"]["mean"] == pytest.approx(1.7 / 3)
    # E2E of completed requests [0.3, 0.5, 1.0, 1.4]; the failure is not a latency
    assert s["e2e_s"]["p50"] == pytest.approx(0.75)
    assert s["e2e_s"]["p95"] == pytest.approx(1.34)
    assert s["e2e_s"]["mean"] == pytest.approx(0.8)
    assert s["tpot_s"]["mean"] == pytest.approx(0.2) and s["tpot_s"]["p50"] == pytest.approx(0.2)
    assert s["itl_s"]["mean"] == pytest.approx(0.25) and s["itl_s"]["p95"] == pytest.approx(0.385)


def test_goodput_and_attainment_count_failures_and_tokenless_answers(t):
    slo = SLO(ttft_s=0.6, tpot_s=0.25, e2e_s=1.2)
    # r0 misses TPOT, r3 failed, r4 misses TTFT; r2 (no token) is held to TTFT by its E2E 0.5
    assert list(metrics.meets_slo(t, slo)) == [False, True, True, False, False]
    assert metrics.slo_attainment_abs(t, slo) == pytest.approx(0.4)
    assert metrics.goodput_rps(t, slo) == pytest.approx(2 / 5.0)
    assert list(metrics.meets_slo(t, SLO(ttft_s=0.4))) == [False, True, False, False, False]
    s = metrics.summarize(t, slo)
    assert s["slo_attainment"] == pytest.approx(0.4) and s["goodput_rps"] == pytest.approx(0.4)
    assert list(metrics.meets_slo(t, slo.scaled(10.0))) == [True, True, True, False, True]


def test_min_slo_scale_with_reference_latencies(t):
    unloaded = np.array([0.7, 0.3, 0.25, 1.0, 0.5])  # slowdowns 2, 1, 2, inf, 2 (up to float rounding)
    assert metrics.min_slo_scale(t.e2e_s, unloaded) == math.inf  # 95% of 5 needs the failed one
    assert metrics.min_slo_scale(t.e2e_s, unloaded, attainment=0.8) == pytest.approx(2.0)
    np.testing.assert_allclose(metrics.attainment_curve(t.e2e_s, unloaded, [0.5, 1.01, 1.5, 2.01, 100.0]),
                               [0.0, 0.2, 0.2, 0.8, 0.8])
    assert metrics.summarize(t, unloaded_s=unloaded)["min_slo_scale"] == math.inf
    with pytest.raises(ValueError, match="4 deadlines"):
        metrics.min_slo_scale(t.e2e_s, unloaded[:4])


def test_min_slo_scale_counts_up_to_the_95th_request():
    e2e = np.arange(1.0, 21.0)  # slowdowns 1..20 over unloaded 1: 19 of 20 is 95%
    assert metrics.min_slo_scale(e2e, np.ones(20)) == 19.0
    assert metrics.slo_attainment(e2e, np.ones(20), 18.9) == pytest.approx(0.90)


def test_stage_shares_visited_and_answered(t):
    s = metrics.summarize(t)
    assert s["stage_visited_shares"] == pytest.approx([1.0, 0.5])  # the failure's stage is unknown
    assert s["stage_answered_shares"] == pytest.approx([0.5, 0.5])
    visited, answered = metrics.stage_shares(np.array([-1, -1]), 2)
    assert list(visited) == [0.0, 0.0] and list(answered) == [0.0, 0.0]


def test_empty_and_all_failed_runs_are_nan_not_errors():
    recs = [ReplayRecord(index=0, request_id="a", scheduled_s=0.0, input_tokens=1, max_tokens=1, send_s=0.0,
                         end_s=0.2, status=ERROR, error="connection refused")]
    s = metrics.summarize(timings(recs), SLO(e2e_s=1.0))
    assert s["failed"] == 1 and s["requests_per_s"] == 0.0 and math.isnan(s["e2e_s"]["p50"])
    assert s["slo_attainment"] == 0.0 and s["goodput_rps"] == 0.0
    with pytest.raises(ValueError, match="positive"):
        SLO(ttft_s=0.0)


def test_simulated_results_go_through_the_same_functions():
    from cascadia.catalog import get_model
    from cascadia.perf.layout import Layout
    from cascadia.sim.cluster import StageDeployment, simulate
    from cascadia.specs.gpu import get_gpu
    from cascadia.traces import Trace

    trace = Trace("t", np.arange(30) * 0.05, np.full(30, 200), np.full(30, 20))
    res = simulate(trace, StageDeployment(get_model("llama-3-8b"), get_gpu("H100"), (Layout(1),)))
    s = metrics.summarize(res.timings())
    sim = res.summary()
    assert s["e2e_s"] == pytest.approx(sim["e2e_s"]) and s["ttft_s"] == pytest.approx(sim["ttft_s"])
    assert s["tpot_s"] == pytest.approx(sim["tpot_s"])
    assert s["completed"] == 30 and s["stage_answered_shares"] == [1.0]
