"""The bi-level planner on a small real instance: 2-stage Llama-3 8B -> 70B on one node of
8 H100, an Azure conversation slice, the MT-Bench profile.

The deployment level runs through the contract's functions. Where planner-deploy's
modules are present the real MILP/placement/verification are used; the fake solver and
placer below (exhaustive, following the contract) stand in otherwise, and also check that
bilevel depends on nothing beyond the contract.
"""

from __future__ import annotations

import importlib.util
import itertools
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import pytest

from cascadia.catalog import get_model
from cascadia.perf.layout import Layout
from cascadia.plan import Plan
from cascadia.quality import builtin_profile_path, load_quality
from cascadia.specs.cluster import parse_cluster
from cascadia.traces import builtin_trace_path, load_trace, window
from planner import parallelism
from planner.bilevel import Backends, Infeasible, PlannerOptions, e2e_p95, plan
from planner.quality_input import stage_profile, synthetic_profile

CASCADE = ("llama-3-8b", "llama-3-70b")
REAL_DEPLOY = all(importlib.util.find_spec(f"planner.{m}") for m in ("milp", "placement", "verify"))


@dataclass(frozen=True)
class FakeProblem:
    options: tuple
    gpu_counts: Mapping[str, int]
    stage_shares: tuple
    objective: str = "max-stage"


@dataclass(frozen=True)
class FakeSolution:
    choices: tuple
    objective_s: float
    bound_s: float
    gap: float
    status: str
    solver: str
    solve_s: float


@dataclass(frozen=True)
class FakeInfeasible:
    reason: str
    status: str = "Infeasible"


def fake_solve(problem, solver="cbc", time_limit_s=60):
    per_stage = [list(o) + ([None] if s == 0 else []) for o, s in zip(problem.options, problem.stage_shares)]
    best = None
    for combo in itertools.product(*per_stage):
        used: dict[str, int] = {}
        for c in combo:
            if c is not None:
                used[c.gpu] = used.get(c.gpu, 0) + c.n_gpus
        if any(n > problem.gpu_counts.get(g, 0) for g, n in used.items()):
            continue
        lat = [c.p95_latency_s if c else 0.0 for c in combo]
        obj = max(lat) if problem.objective == "max-stage" else sum(s * x for s, x in zip(problem.stage_shares, lat))
        key = (obj, sum(lat), sum(c.n_gpus for c in combo if c))  # the same tie-breaks as the MILP
        if best is None or key < best[0]:
            best = (key, combo)
    if best is None:
        return FakeInfeasible("nothing fits")
    return FakeSolution(tuple(best[1]), best[0][0], best[0][0], 0.0, "Optimal", "exhaustive-fake", 0.0)


def fake_place(cluster, stage_layouts, stage_gpus):
    """Replicas fill nodes in order; a TP group never straddles a node."""
    placed, cursor = [], {}
    for layouts, gpu in zip(stage_layouts, stage_gpus):
        per = next((p.gpus_per_node for p in cluster.pools if p.gpu.name == gpu), cluster.pools[0].gpus_per_node)
        out = []
        for lay in layouts:
            pos, nodes = cursor.get(gpu, 0), []
            for _ in range(lay.pp):
                if pos // per != (pos + lay.tp - 1) // per:
                    pos = (pos // per + 1) * per
                nodes.append(pos // per)
                pos += lay.tp
            cursor[gpu] = pos
            out.append(Layout(lay.tp, lay.pp, tuple(nodes)))
        placed.append(tuple(out))
    return tuple(placed)


FAKE = Backends(parallelism.stage_trace, parallelism.latency_table, FakeProblem, fake_solve, fake_place,
                lambda p, c: [])


def backends() -> Backends:
    if not REAL_DEPLOY:
        return FAKE
    from planner.bilevel import default_backends

    return default_backends()


@pytest.fixture(scope="module")
def conv():
    return load_trace(builtin_trace_path("azure-conv"))


@pytest.fixture(scope="module")
def mtbench():
    return stage_profile(load_quality(builtin_profile_path("mtbench")), CASCADE)


def models():
    return [get_model(m) for m in CASCADE]


def options(tmp_path, **kw):
    return PlannerOptions(cache_dir=str(tmp_path / "tables"), processes=1, **kw)


@pytest.fixture(scope="module")
def conv_plan(conv, mtbench, tmp_path_factory):
    prof, src = mtbench
    opts = PlannerOptions(cache_dir=str(tmp_path_factory.mktemp("tables")), processes=1, seed=11)
    return plan(models(), parse_cluster("1x8xH100"), window(conv, 0, 600), prof, 88.0, quality_source=src,
                options=opts, backends=backends())


def test_plan_meets_the_target_and_uses_the_pool(conv_plan):
    p = conv_plan
    assert isinstance(p, Plan), p
    assert p.quality.predicted >= 88.0 and p.quality.kind == "real"
    assert p.n_gpus <= 8 and all(s.n_gpus >= 1 for s in p.stages)
    assert p.stages[0].share == 1.0 and 0 < p.stages[1].share < 1
    assert p.stages[1].planned_share >= p.stages[1].share
    assert p.prediction.e2e_p95_s >= p.stages[0].predicted_p95_s  # a sum over stages is at least its first term
    assert p.front and all(a.latency_s < b.latency_s and a.quality < b.quality for a, b in zip(p.front, p.front[1:]))
    assert dict(p.search)["milp_solves"] >= 1


@pytest.mark.skipif(not REAL_DEPLOY, reason="planner/verify.py not yet in the tree")
def test_plan_passes_verify_plan(conv_plan):
    from planner.verify import verify_plan

    assert verify_plan(conv_plan, conv_plan.cluster) == []


PREDICTION_CASES = {
    "2-stage max-stage q88": (CASCADE, "1x8xH100", 88.0, "max-stage", None),
    "2-stage end-to-end q90": (CASCADE, "1x8xH100", 90.0, "end-to-end", None),
    "3-stage end-to-end q85 (synthetic)": (("deepseek-r1-distill-qwen-7b", "deepseek-r1-distill-llama-70b",
                                            "deepseek-v3-671b-awq"), "4x8xH100", 85.0, "end-to-end", (70, 85, 92)),
}


_CASE_PLANS: dict = {}


def case_plan(case, conv, mtbench, tmp_path_factory):
    """The plan of a PREDICTION_CASES entry, made once per test session."""
    if case not in _CASE_PLANS:
        names, cluster, q_min, objective, synthetic_means = PREDICTION_CASES[case]
        if synthetic_means:
            prof, src = stage_profile(synthetic_profile(synthetic_means, seed=5, models=names), names,
                                      {n: n for n in names}, kind="synthetic")
        else:
            prof, src = mtbench
        opts = PlannerOptions(cache_dir=str(tmp_path_factory.mktemp("tables")), processes=1, seed=11,
                              objective=objective, share_quantum=0.1 if synthetic_means else 0.05)
        _CASE_PLANS[case] = plan([get_model(n) for n in names], parse_cluster(cluster), window(conv, 0, 300), prof,
                                 q_min, quality_source=src, options=opts, backends=backends())
    return _CASE_PLANS[case]


@pytest.mark.parametrize("case", sorted(PREDICTION_CASES))
def test_prediction_holds_on_the_next_window_with_another_seed(case, conv, mtbench, tmp_path_factory):
    """Issue 3's must-show: plan on minutes 0-5 of Azure conv, simulate the plan on minutes
    5-10 with another seed; the end-to-end p95 is within 10% of the prediction. (Later
    windows of Azure conv are a different mix -- mean output length falls from 260 to 165
    tokens -- and Azure code shifts from window to window: that is what re-planning is for.)"""
    p = case_plan(case, conv, mtbench, tmp_path_factory)
    assert isinstance(p, Plan), p
    observed = e2e_p95(p, window(conv, 300, 600), seed=12345)
    assert observed == pytest.approx(p.prediction.e2e_p95_s, rel=0.10)


def test_prediction_of_the_10_minute_plan_holds_on_the_next_10_minutes(conv_plan, conv):
    observed = e2e_p95(conv_plan, window(conv, 600, 1200), seed=12345)
    assert observed == pytest.approx(conv_plan.prediction.e2e_p95_s, rel=0.10)


def test_json_round_trip_of_a_real_plan(conv_plan, tmp_path):
    conv_plan.save(tmp_path / "p.json")
    assert Plan.load(tmp_path / "p.json") == conv_plan


def test_end_to_end_objective_is_no_worse_end_to_end(conv, mtbench, tmp_path):
    prof, src = mtbench
    trace = window(conv, 0, 300)
    kw = dict(quality_source=src, backends=backends())
    a = plan(models(), parse_cluster("1x8xH100"), trace, prof, 88.0, options=options(tmp_path), **kw)
    b = plan(models(), parse_cluster("1x8xH100"), trace, prof, 88.0,
             options=options(tmp_path, objective="end-to-end"), **kw)
    assert isinstance(a, Plan) and isinstance(b, Plan)
    assert b.prediction.objective == "end-to-end"
    assert b.prediction.e2e_p95_s <= a.prediction.e2e_p95_s * 1.02


@pytest.mark.parametrize("case, expect", [
    ("q_min", "q_min 99"),
    ("empty", "trace is empty"),
    ("too_big", "cannot fit the pool"),
    ("mismatch", "not the cascade"),
])
def test_bad_inputs_are_infeasible_with_a_reason(case, expect, conv, mtbench, tmp_path):
    prof, src = mtbench
    ms, cluster, trace, q = models(), parse_cluster("1x8xH100"), window(conv, 0, 60), 85.0
    if case == "q_min":
        q = 99.0
    elif case == "empty":
        trace = window(conv, 0, 0)
    elif case == "too_big":
        ms = [get_model("llama-3-8b"), get_model("deepseek-v3-671b-awq")]
        prof, src = stage_profile(synthetic_profile([60, 90], seed=1), [m.name for m in ms],
                                  {ms[0].name: "synthetic-0", ms[1].name: "synthetic-1"}, kind="synthetic")
        cluster = parse_cluster("1x2xH100")
    elif case == "mismatch":
        ms = [get_model("llama-3-8b"), get_model("deepseek-r1-distill-llama-70b")]
    out = plan(ms, cluster, trace, prof, q, quality_source=src, options=options(tmp_path), backends=FAKE)
    assert isinstance(out, Infeasible) and expect in out.reason


def test_synthetic_three_stage_plan_is_labelled(conv, mtbench, tmp_path_factory):
    out = case_plan("3-stage end-to-end q85 (synthetic)", conv, mtbench, tmp_path_factory)
    assert isinstance(out, Plan), out
    assert out.quality.kind == "synthetic" and "synthetic" in out.quality.source
    assert out.quality.predicted >= 85.0 and 1 <= len(out.stages) <= 3
    assert np.all(np.diff(out.stage_shares) <= 0)
    # every sub-cascade was considered, the full cascade first; the winner predicts the lowest p95
    names = PREDICTION_CASES["3-stage end-to-end q85 (synthetic)"][0]
    assert len(out.alternatives) == 7 and out.alternatives[0][0] == " -> ".join(names)
    planned = {label: p95 for label, p95, why in out.alternatives if not why}
    assert " -> ".join(m.name for m in out.models) in planned
    assert out.prediction.e2e_p95_s == pytest.approx(min(planned.values()))
    assert out.judge.name.startswith("profile judge (synthetic")


def test_verify_plan_catches_what_the_solver_could_get_wrong(conv_plan):
    import dataclasses

    from planner.verify import verify_plan

    s0, s1 = conv_plan.stages
    overcommitted = dataclasses.replace(conv_plan, stages=(
        dataclasses.replace(s0, replicas=s0.replicas + (Layout(8, 1, (0,)),)), s1))
    assert any("GPUs" in p for p in verify_plan(overcommitted))
    undersized = dataclasses.replace(conv_plan, stages=(s0, dataclasses.replace(s1, planned_share=s1.share / 2)))
    assert any("sized for" in p for p in verify_plan(undersized))
    too_small = dataclasses.replace(conv_plan, stages=(s0, dataclasses.replace(s1, replicas=(Layout(1, 1, (0,)),))))
    assert any("llama-3-70b" in p for p in verify_plan(too_small))


def test_replan_keeps_the_plan_for_a_similar_workload_and_moves_for_a_shift(conv_plan, conv, mtbench):
    from cascadia.traces import scale_rate
    from planner.bilevel import replan

    prof, src = mtbench
    opts = PlannerOptions(processes=1, seed=11, cache_dir=None)
    same = replan(conv_plan, window(conv, 600, 1200), prof, quality_source=src, options=opts, backends=backends())
    assert not same.replan and same.diff.empty and same.plan is conv_plan, same.reason
    # Five times the load: the plan sized for 4.8 req/s falls behind its own predicted p95
    # (taken as its SLO); re-planning must help.
    busy = scale_rate(window(conv, 600, 900), 5 * conv_plan.workload.mean_rate_rps)
    shift = replan(conv_plan, busy, prof, quality_source=src, options=opts, backends=backends(),
                   slo_p95_s=conv_plan.prediction.e2e_p95_s)
    assert shift.replan and "SLO" in shift.reason, shift.reason
    assert shift.new_p95_s < shift.current_p95_s and not shift.diff.empty
    # Every replica of the new plan is either kept running or started/resized into place.
    assert len(shift.diff.kept) + sum(a.kind in ("start", "resize") for a in shift.diff.actions) == sum(
        len(s.replicas) for s in shift.plan.stages)


def test_sub_cascades_are_every_ordered_subset_longest_first():
    from planner.bilevel import sub_cascade_indices

    assert sub_cascade_indices(3) == [(0, 1, 2), (0, 1), (0, 2), (1, 2), (0,), (1,), (2,)]
    assert sub_cascade_indices(1) == [(0,)]


def test_restricted_profile_keeps_the_chosen_columns():
    from planner.bilevel import restrict_profile

    prof = synthetic_profile([60, 75, 90], seed=1, n_requests=50)
    sub = restrict_profile(prof, (0, 2))
    assert sub.models == (prof.models[0], prof.models[2])
    assert np.array_equal(sub.quality_scores, prof.quality_scores[:, [0, 2]])
    assert np.array_equal(sub.routing_scores, prof.routing_scores[:, [0, 2]])


def test_the_paper_mode_plans_the_full_cascade_only(conv, mtbench, tmp_path):
    """--no-sub-cascades: a q_min the large model alone also meets still gets both stages."""
    prof, src = mtbench
    out = plan(models(), parse_cluster("1x8xH100"), window(conv, 0, 120), prof, 88.0, quality_source=src,
               options=options(tmp_path, sub_cascades=False), backends=backends())
    assert isinstance(out, Plan) and len(out.stages) == 2 and out.alternatives == ()
    both = plan(models(), parse_cluster("1x8xH100"), window(conv, 0, 120), prof, 88.0, quality_source=src,
                options=options(tmp_path), backends=backends())
    assert isinstance(both, Plan)
    assert [a[0] for a in both.alternatives] == ["llama-3-8b -> llama-3-70b", "llama-3-8b", "llama-3-70b"]
    assert both.alternatives[1][2] == "cannot reach q_min"
    assert both.prediction.e2e_p95_s <= out.prediction.e2e_p95_s * (1 + 1e-9)
