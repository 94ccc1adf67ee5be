"""The comparison's own logic (benchmarks/experiments): metrics on scripted latencies, the
baselines' allocation rules, and a tiny end-to-end path through the real simulator."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks.experiments import metrics
from benchmarks.experiments.systems import (Deployment, FixedShapeTable, cascadeserve, least_escalation_thresholds,
                                            proportional_replicas, simulate_deployment, single_model, uniform_caps,
                                            uniform_solve)
from cascadia.catalog import get_model
from cascadia.perf.layout import Layout
from cascadia.quality import QualityProfile
from cascadia.specs.cluster import parse_cluster
from cascadia.specs.gpu import get_gpu
from cascadia.traces import Trace
from planner.milp import DeploymentProblem
from planner.parallelism import LayoutOption
from planner.quality_input import synthetic_profile


def test_min_slo_scale_is_the_95th_percent_slowdown_counted_up():
    # 20 requests, slowdowns 0.5, 1, 1.5, ..., 9.5, 10 with request 19 unfinished:
    # 95% of 20 = 19 requests must meet the deadline -> the 19th smallest slowdown, 9.5.
    unloaded = np.full(20, 2.0)
    e2e = np.arange(1, 21, dtype=float)
    e2e[19] = np.inf
    assert metrics.min_slo_scale(e2e, unloaded) == pytest.approx(9.5)
    assert metrics.slo_attainment(e2e, unloaded, 9.5) == pytest.approx(0.95)
    assert metrics.slo_attainment(e2e, unloaded, 9.4) == pytest.approx(0.90)
    # 21 requests: ceil(0.95 * 21) = 20 must meet -> the 20th smallest
    e2e21 = np.array([1.0] * 18 + [3.0, 5.0, 7.0])
    assert metrics.min_slo_scale(e2e21, np.ones(21)) == 5.0
    # two unfinished of 20: attainment can never reach 95%
    e2e[18] = np.nan
    assert metrics.min_slo_scale(e2e, unloaded) == math.inf


def test_slowdowns_reject_mismatched_or_bad_deadlines():
    with pytest.raises(ValueError):
        metrics.slowdowns(np.ones(3), np.ones(4))
    with pytest.raises(ValueError):
        metrics.slowdowns(np.ones(2), np.array([1.0, 0.0]))


def test_rate_search_brackets_the_threshold_within_its_probe_budget():
    search = metrics.max_sustained_multiplier(lambda m: m <= 3.3, max_probes=8)
    assert search.multiplier <= 3.3 < search.failed_at
    assert search.failed_at / search.multiplier <= 1.05 and search.simulations <= 8
    never = metrics.max_sustained_multiplier(lambda m: False, max_probes=3)
    assert never.multiplier == 0.0 and never.simulations == 3
    # 1 and 0.5 fail, 0.25 passes, then three geometric bisections inside (0.25, 0.5)
    below = metrics.max_sustained_multiplier(lambda m: m <= 0.3, max_probes=6)
    assert [round(m, 3) for m, _ in below.probes] == [1.0, 0.5, 0.25, 0.354, 0.297, 0.324]
    assert 0.25 < below.multiplier <= 0.3 < below.failed_at


def test_proportional_replicas_follow_the_shares():
    # targets 32/1.3 = 24.6 and 7.4 GPUs: 24 x 1-GPU + 1 x 4-GPU, then the 4 spare GPUs go to
    # stage 2, the furthest below its target per replica ((7.4 - 4) / 4 > (24.6 - 24) / 1)
    assert proportional_replicas([1.0, 0.3], [1, 4], 32) == [24, 2]
    # minimums overflow (21 + 2*4 + 8 > 32): trimmed from the stage most above its proportion
    assert proportional_replicas([1.0, 0.4, 0.1], [1, 4, 8], 32) == [20, 1, 1]
    assert proportional_replicas([1.0, 0.0], [1, 4], 8) == [8, 0]
    assert uniform_caps(32, 3) == [10, 11, 11] and uniform_caps(32, 2) == [16, 16]


def _option(model, n, p95):
    return LayoutOption(model, "H100", n, (Layout(n),), p95, p95, 10.0)


def test_uniform_solve_keeps_each_stage_inside_its_half():
    small = tuple(_option("s", n, 1.0 / n) for n in (1, 2, 4, 8))
    large = tuple(_option("l", n, 8.0 / n) for n in (2, 4, 8))
    problem = DeploymentProblem((small, large), {"H100": 8}, (1.0, 0.4), "max-stage")
    sol = uniform_solve(problem)
    assert [c.n_gpus for c in sol.choices] == [4, 4]
    assert sol.objective_s == pytest.approx(2.0)  # max(1/4, 8/4)
    skip = uniform_solve(DeploymentProblem((small, large), {"H100": 8}, (1.0, 0.0), "max-stage"))
    assert skip.choices[1] is None
    too_small = uniform_solve(DeploymentProblem((small, large), {"H100": 2}, (1.0, 0.4), "max-stage"))
    assert not hasattr(too_small, "choices") and "uniform" in too_small.reason


def _two_model_profile(small_scores, large_scores):
    s, l = np.asarray(small_scores, float), np.asarray(large_scores, float)
    return QualityProfile(("llama-3-8b", "llama-3-70b"), tuple(f"r{i}" for i in range(len(s))),
                          np.stack([s, l], 1), np.stack([s, l], 1), (0.0, 100.0), True, "test")


def test_least_escalation_meets_the_target_with_the_fewest_escalations():
    prof = _two_model_profile([90, 80, 40, 30], [95, 95, 95, 95])
    # stopping at 80 or above escalates 2 of 4: quality (90 + 80 + 95 + 95) / 4 = 90
    thr, q, shares = least_escalation_thresholds(prof, 89.0)
    assert q == pytest.approx(90.0) and shares == (1.0, 0.5) and 40 < thr[0] <= 80
    _, q_all, shares_all = least_escalation_thresholds(prof, 95.0)
    assert q_all == pytest.approx(95.0) and shares_all == (1.0, 1.0)


@pytest.fixture(scope="module")
def tiny_trace():
    rng = np.random.default_rng(3)
    n = 24
    arrivals = np.sort(rng.uniform(0, 6, n))
    return Trace("tiny", arrivals - arrivals[0], rng.integers(100, 800, n), rng.integers(20, 120, n))


def test_single_model_picks_the_fastest_model_that_meets_the_target(tiny_trace, tmp_path):
    trace = tiny_trace
    models = [get_model("llama-3-8b"), get_model("llama-3-70b")]
    prof = synthetic_profile([60, 90], seed=1, models=[m.name for m in models])
    cluster = parse_cluster("1x8xH100")
    kw = dict(cache_dir=str(tmp_path), processes=1)
    strict = single_model(models, cluster, trace, prof, 70.0, **kw)
    assert strict.models[0].name == "llama-3-70b" and strict.n_gpus <= 8
    loose = single_model(models, cluster, trace, prof, 50.0, **kw)  # both meet: the 8B is faster
    assert loose.models[0].name == "llama-3-8b"
    assert not hasattr(single_model(models, cluster, trace, prof, 95.0, **kw), "models")


def test_tiny_path_cascadeserve_and_fixed_shape_table_through_the_simulator(tiny_trace):
    trace = tiny_trace
    models = [get_model("llama-3-8b"), get_model("llama-3-70b")]
    prof = synthetic_profile([60, 90], seed=1, models=[m.name for m in models])
    dep = cascadeserve(models, parse_cluster("1x8xH100"), prof, 75.0)
    assert isinstance(dep, Deployment) and dep.n_gpus == 8 and dep.quality >= 75.0
    assert all(lay == Layout(1) for lay in dep.stage_layouts[0])
    assert all(lay == Layout(4) for lay in dep.stage_layouts[1])
    res = simulate_deployment(dep, trace, prof, seed=5)
    assert res.n_unfinished == 0 and 0.0 < res.stage_shares[1] < 1.0
    unloaded = metrics.unloaded_latency_s(models[1], get_gpu("H100"), Layout(8), trace)
    assert np.all(unloaded > 0) and metrics.min_slo_scale(res.e2e_s, unloaded) > 0
    table = FixedShapeTable()(models[1], get_gpu("H100"), trace, max_gpus=8, gpus_per_node=8)
    assert set(table) == {4, 5, 6, 7, 8} and all(set(o.layouts) == {Layout(4)} for o in table.values())
    p95 = [table[f].p95_latency_s for f in sorted(table)]
    assert all(b <= a for a, b in zip(p95, p95[1:]))
