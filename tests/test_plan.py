"""Plan files (JSON round trip, errors naming the field) and plan diffs (minimal, ordered)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from cascadia.catalog import get_model
from cascadia.perf.layout import Layout
from cascadia.plan import (FrontPoint, JudgeInfo, Plan, PlanError, PlanStage, Prediction, QualityInfo,
                           SCHEMA_VERSION, simulate_plan)
from cascadia.plan_diff import RESIZE, SET_THRESHOLD, START, STOP, diff
from cascadia.sim.config import EngineConfig
from cascadia.specs.cluster import parse_cluster
from cascadia.traces import Trace, poisson_arrivals, summarize


def small_trace(n=60, rate=2.0, seed=0) -> Trace:
    rng = np.random.default_rng(seed)
    return Trace("t", poisson_arrivals(n, rate, seed), rng.integers(50, 400, n), rng.integers(20, 200, n))


def make_plan(small=(Layout(1, 1, (0,)), Layout(1, 1, (0,))), large=(Layout(4, 1, (0,)),),
              threshold=70.0, shares=(1.0, 0.4)) -> Plan:
    models = (get_model("llama-3-8b"), get_model("llama-3-70b"))
    stages = (
        PlanStage("llama-3-8b", "H100", tuple(small), threshold, shares[0], 1.0, 1.5),
        PlanStage("llama-3-70b", "H100", tuple(large), None, shares[1], 0.4, 4.0),
    )
    return Plan(
        models=models, cluster=parse_cluster("1x8xH100"), engine=EngineConfig(), stages=stages,
        judge=JudgeInfo("mtbench-gpt4", 0.0, 100.0),
        quality=QualityInfo(85.0, 84.0, 92.3, 83.4, "real", "mtbench:mtbench_gpt4_judgements.csv",
                            (("llama-3-8b", "mixtral"), ("llama-3-70b", "gpt-4")), "scores x10", ("a note",)),
        prediction=Prediction(5.2, 4.0, 3.3, "max-stage", "cbc", "Optimal", 4.0, 4.0, 0.0, 7),
        workload=summarize(small_trace()), input_hashes=(("quality", "ab"), ("trace", "cd")),
        front=(FrontPoint((60.0,), 84.0, 3.0), FrontPoint((80.0,), 88.0, 4.5)),
        search=(("grid_points", 12.0), ("wall_s", 1.5)),
    )


def test_plan_json_round_trip(tmp_path):
    plan = make_plan()
    path = tmp_path / "plan.json"
    plan.save(path)
    doc = json.loads(path.read_text())
    assert doc["schema_version"] == SCHEMA_VERSION
    assert doc["cascade"][1]["weights"]["hf_id"] == "meta-llama/Meta-Llama-3-70B-Instruct"
    assert doc["stages"][0]["n_gpus"] == 2 and doc["stages"][1]["threshold"] is None
    assert doc["judge"]["score_high"] == 100.0 and doc["quality"]["kind"] == "real"
    back = Plan.load(path)
    assert back == plan
    assert back.thresholds == (70.0,) and back.stage_shares == (1.0, 0.4) and back.n_gpus == 6


def _broken(tmp_path, edit):
    doc = make_plan().to_dict()
    edit(doc)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(PlanError) as err:
        Plan.load(path)
    return err.value


@pytest.mark.parametrize("edit, field", [
    (lambda d: d["stages"][1]["replicas"][0].__setitem__("tp", "four"), "plan.stages[1].replicas[0].tp"),
    (lambda d: d["stages"][0].pop("share"), "plan.stages[0].share"),
    (lambda d: d["stages"][0].__setitem__("share", 1.5), "plan.stages[0].share"),
    (lambda d: d["stages"][1].__setitem__("threshold", 50), "plan.stages[1].threshold"),
    (lambda d: d["stages"][0].__setitem__("n_gpus", 3), "plan.stages[0].n_gpus"),
    (lambda d: d["stages"][0].__setitem__("model", "llama-3-70b"), "plan.stages[0].model"),
    (lambda d: d["quality"].__setitem__("kind", "guess"), "plan.quality.kind"),
    (lambda d: d.__setitem__("schema_version", 99), "plan.schema_version"),
    (lambda d: d["prediction"].pop("e2e_p95_s"), "plan.prediction.e2e_p95_s"),
    (lambda d: d["cluster"]["pools"][0].__setitem__("nodes", 0), "plan.cluster.pools[0].nodes"),
    (lambda d: d["stages"][0]["replicas"][0].__setitem__("stage_nodes", [0, 1]),
     "plan.stages[0].replicas[0].stage_nodes"),
])
def test_plan_load_names_the_bad_field(tmp_path, edit, field):
    assert _broken(tmp_path, edit).field == field


def test_plan_load_of_a_non_json_file_is_a_plan_error(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(path)


def test_simulate_plan_uses_the_planned_shares():
    result = simulate_plan(make_plan(), small_trace(), seed=3)
    assert result.n_unfinished == 0
    assert result.stage_shares.tolist() == pytest.approx([1.0, 0.4], abs=1 / 60)


def test_identical_plans_have_an_empty_diff():
    d = diff(make_plan(), make_plan())
    assert d.empty and len(d.kept) == 3


def test_diff_keeps_unchanged_replicas_and_orders_actions():
    old = make_plan()
    # Stage 0: one tp1 replica stays, the other becomes tp2; stage 1 gains a tp1 replica;
    # the threshold moves.
    new = make_plan(small=(Layout(1, 1, (0,)), Layout(2, 1, (0,))),
                    large=(Layout(4, 1, (0,)),), threshold=75.0)
    new = dataclasses.replace(new, stages=(new.stages[0], dataclasses.replace(
        new.stages[1], replicas=(Layout(4, 1, (0,)),))))
    d = diff(old, new)
    assert set(d.kept) == {(0, Layout(1, 1, (0,))), (1, Layout(4, 1, (0,)))}
    kinds = [a.kind for a in d.actions]
    assert kinds == [RESIZE, SET_THRESHOLD]  # 1 resize (tp1 -> tp2) fits in 2 idle GPUs, then threshold
    assert d.actions[0].old == Layout(1, 1, (0,)) and d.actions[0].new == Layout(2, 1, (0,))


def test_diff_stops_before_starting_when_the_pool_is_full():
    full = make_plan(small=(Layout(1, 1, (0,)),) * 4, large=(Layout(4, 1, (0,)),))
    # The new plan moves two small replicas' GPUs into a second large replica half: tp2.
    new = make_plan(small=(Layout(1, 1, (0,)),) * 2, large=(Layout(4, 1, (0,)), Layout(2, 1, (0,))))
    d = diff(full, new)
    kinds = [a.kind for a in d.actions]
    assert kinds.count(STOP) == 2 and kinds.count(START) == 1
    assert kinds.index(START) > kinds.index(STOP)  # no free GPU until a stop
    assert len(d.kept) == 3
    free = 0
    for a in d.actions:  # the ordering never overcommits the 8 GPUs
        free -= a.gpu_delta
        assert free >= 0


def test_diff_of_a_model_change_replaces_the_stage():
    old = make_plan()
    m = get_model("deepseek-r1-distill-llama-70b")
    new = dataclasses.replace(old, models=(old.models[0], m), stages=(
        old.stages[0], dataclasses.replace(old.stages[1], model=m.name)))
    d = diff(old, new)
    assert [a.kind for a in d.actions] == [STOP, START]
    assert d.actions[1].model == m.name
