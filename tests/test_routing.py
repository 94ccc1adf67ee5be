"""Routing-level search: replay, Tchebycheff front and the penalty J on hand-computed profiles."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from cascadia.quality import QualityProfile, replay
from planner.quality_input import synthetic_profile
from planner.routing import (
    RoutingPoint,
    SharesMemo,
    pareto_filter,
    penalty_objective,
    search_routing,
    tchebycheff_front,
    threshold_grid,
)

# Four requests, two stages. Routing scores of the small model: 3, 7, 5, 9.
#   θ=3  : all stop at 0            shares (1, 0)    Q = (.3+.7+.5+.9)/4 = .600
#   θ=5  : request 0 escalates      shares (1, .25)  Q = (.9+.7+.5+.9)/4 = .750
#   θ=7  : requests 0, 2 escalate   shares (1, .5)   Q = (.9+.7+.6+.9)/4 = .775
#   θ=9  : requests 0, 1, 2         shares (1, .75)  Q = (.9+.2+.6+.9)/4 = .650
#   θ=10 : everyone                 shares (1, 1)    Q = (.9+.2+.6+.8)/4 = .625
SMALL_ROUTING = [3, 7, 5, 9]
SMALL_QUALITY = [0.3, 0.7, 0.5, 0.9]
LARGE_QUALITY = [0.9, 0.2, 0.6, 0.8]
EXPECTED = {3: (0.0, 0.600), 5: (0.25, 0.750), 7: (0.5, 0.775), 9: (0.75, 0.650), 10: (1.0, 0.625)}


def hand_profile() -> QualityProfile:
    routing = np.column_stack([SMALL_ROUTING, [9, 2, 6, 8]]).astype(float)
    quality = np.column_stack([SMALL_QUALITY, LARGE_QUALITY])
    return QualityProfile(models=("small", "large"), request_ids=("r0", "r1", "r2", "r3"),
                          routing_scores=routing, quality_scores=quality, score_range=(0.0, 10.0),
                          single_score=False, source="test")


class CountingLatency:
    """L = 1 + 10 * share of the last stage (s): more escalation, slower."""

    def __init__(self):
        self.calls: list[tuple[float, ...]] = []

    def __call__(self, shares):
        self.calls.append(tuple(shares))
        return 1.0 + 10.0 * sum(shares[1:]), {"shares": tuple(shares)}


def test_replay_matches_the_hand_computed_table():
    prof = hand_profile()
    thr = np.array(sorted(EXPECTED), dtype=float).reshape(-1, 1)
    rep = replay(prof, thr)
    for k, t in enumerate(sorted(EXPECTED)):
        share, quality = EXPECTED[t]
        assert rep.stage_shares[k].tolist() == [1.0, share]
        assert rep.mean_quality[k] == pytest.approx(quality)


def test_grid_is_the_distinct_scores_plus_one_above():
    assert threshold_grid(hand_profile())[0].tolist() == [3, 5, 7, 9, 10]


def test_grid_is_thinned_to_quantiles_but_keeps_both_ends():
    prof = synthetic_profile([60, 80], seed=1, n_requests=2000, judge_noise=0.0)
    full = threshold_grid(prof, max_points_per_stage=10_000)[0]
    thin = threshold_grid(prof, max_points_per_stage=8)[0]
    assert len(thin) <= 8 < len(full)
    assert thin[0] == full[0] and thin[-1] == full[-1]


def test_penalty_picks_the_cheapest_feasible_threshold():
    latency = CountingLatency()
    result = search_routing(hand_profile(), latency, q_min=0.70, share_quantum=0.05)
    assert result.best is not None and result.meets_target
    assert result.best.thresholds == (5.0,)
    assert result.best.latency_s == pytest.approx(3.5)
    assert result.best.quality == pytest.approx(0.75)
    # Every grid point was evaluated once: the grid is tiny.
    assert sorted(p.thresholds[0] for p in result.evaluated) == [3, 5, 7, 9, 10]
    # z1: everything to the last stage, z2: everything stops at the first.
    assert (result.z1, result.z2) == (pytest.approx(0.625), pytest.approx(0.6))


def test_a_target_no_threshold_reaches_is_reported_not_met():
    result = search_routing(hand_profile(), CountingLatency(), q_min=0.9)
    assert not result.meets_target
    assert result.best.thresholds == (7.0,)  # the least shortfall wins once μ dominates


def test_tchebycheff_front_is_the_non_dominated_set():
    result = search_routing(hand_profile(), CountingLatency(), q_min=0.7)
    front = [(p.thresholds[0], p.latency_s, p.quality) for p in result.front]
    assert [t for t, _, _ in front] == [3.0, 5.0, 7.0]
    for p in result.front:
        assert not any(q.latency_s <= p.latency_s and q.quality >= p.quality and
                       (q.latency_s, q.quality) != (p.latency_s, p.quality) for q in result.evaluated)


def test_memo_calls_the_milp_once_per_rounded_share_vector():
    latency = CountingLatency()
    memo = SharesMemo(latency, quantum=0.1)
    assert memo((1.0, 0.21))[0] == (1.0, 0.3)  # rounded up: plan for at least that much
    assert memo((1.0, 0.3))[0] == (1.0, 0.3)  # 0.3 is not pushed to 0.4 by float noise
    memo((1.0, 0.29))
    assert (memo.misses, memo.hits) == (1, 2)
    assert latency.calls == [(1.0, 0.3)]


def test_infinite_latency_points_never_win_or_enter_the_front():
    def latency(shares):
        return (math.inf, "infeasible") if shares[1] > 0.3 else (1.0 + shares[1], "ok")

    result = search_routing(hand_profile(), latency, q_min=0.7)
    assert result.best.thresholds == (5.0,)
    assert all(p.planned_shares[1] <= 0.3 for p in result.front)


def test_three_stage_search_matches_exhaustive_minimum():
    prof = synthetic_profile([55, 75, 88], seed=3, n_requests=300)

    def latency(shares):
        # Convex in the shares, so the pattern search's local optimum is the global one.
        return 2.0 + 4.0 * shares[1] ** 2 + 12.0 * shares[2] ** 2, None

    q_min = 80.0
    result = search_routing(prof, latency, q_min, max_points_per_stage=24, share_quantum=0.01)
    grids = threshold_grid(prof, 24)
    every = np.array(list(itertools.product(*grids)))
    rep = replay(prof, every)
    memo = SharesMemo(latency, 0.01)
    exhaustive = min(penalty_objective(memo(s)[1], q, q_min, result.z1, result.z2, result.mu)
                     for s, q in zip(rep.stage_shares, rep.mean_quality))
    assert result.meets_target
    assert result.best_objective == pytest.approx(exhaustive, rel=0.02)
    assert len(result.evaluated) < len(every)  # it searched, it did not enumerate


def test_pareto_filter_drops_dominated_and_infinite_points():
    pts = [RoutingPoint((0,), q, (1.0,), (1.0,), lat) for lat, q in
           [(1, 0.5), (2, 0.4), (3, 0.9), (math.inf, 1.0), (3, 0.8)]]
    assert [(p.latency_s, p.quality) for p in pareto_filter(pts)] == [(1, 0.5), (3, 0.9)]
    assert [(p.latency_s, p.quality) for p in tchebycheff_front(pts)] == [(1, 0.5), (3, 0.9)]


def test_target_seeds_are_the_least_escalating_feasible_grid_points():
    from planner.routing import least_escalation_points

    prof = synthetic_profile([70, 80, 90], seed=7, n_requests=300)
    grids = threshold_grid(prof, 16)
    q_min = 87.0
    seeds = least_escalation_points(prof, grids, q_min, k=3)
    every = list(itertools.product(*[range(len(g)) for g in grids]))
    rep = replay(prof, np.array([[grids[s][i] for s, i in enumerate(iv)] for iv in every]))
    feasible = [(rep.stage_shares[k, 1:].sum(), iv) for k, iv in enumerate(every) if rep.mean_quality[k] >= q_min]
    assert feasible and len(seeds) == 3
    assert min(e for e, _ in feasible) == pytest.approx(sorted(feasible)[0][0])
    seed_esc = sorted(e for e, iv in feasible if iv in seeds)
    assert seed_esc == pytest.approx(sorted(e for e, _ in feasible)[:3])
    assert least_escalation_points(prof, grids, 99.9, k=3) == []


def test_search_reaches_a_target_that_only_few_grid_points_meet():
    """A target just under the best reachable quality: the pattern search alone can stall
    short of it on the discrete grid; the seeds guarantee a feasible answer."""
    prof = synthetic_profile([70, 80, 90], seed=7, n_requests=300)
    grids = threshold_grid(prof, 16)
    every = np.array(list(itertools.product(*grids)))
    q_best = float(replay(prof, every).mean_quality.max())

    def latency(shares):  # escalation is costly, so J pulls towards low quality
        return 1.0 + 50.0 * shares[1] + 200.0 * shares[2], None

    result = search_routing(prof, latency, q_best - 0.05, max_points_per_stage=16, coarse_points=3)
    assert result.meets_target and result.best.quality >= q_best - 0.05 - 1e-9
