"""An LLM judge served by a cascade member: its requests load that member, in the planner's
latency tables and in the simulated prediction (the paper treats the judge as free)."""

import dataclasses

import numpy as np
import pytest

from cascadia.catalog import get_model
from cascadia.plan import JudgeInfo, Plan, simulate_plan
from cascadia.quality import builtin_profile_path, load_quality
from cascadia.sim.cluster import JudgeLoad
from cascadia.specs.cluster import parse_cluster
from cascadia.traces import builtin_trace_path, load_trace, window
from planner.bilevel import PlannerOptions, plan, with_judge_requests
from planner.quality_input import stage_profile
from planner.verify import verify_plan

CASCADE = ["llama-3-8b", "llama-3-70b"]


def test_judge_requests_join_the_host_stage_workload():
    conv = window(load_trace(builtin_trace_path("azure-conv")), 0, 60)
    load = JudgeLoad(stage=1, prompt_overhead_tokens=200, output_tokens=8)
    tr = with_judge_requests(conv, 0.25, (1.0,), seed=0, judge=load)
    n = len(conv)
    assert len(tr) == round(0.25 * n) + n
    assert np.all(np.diff(tr.arrival_s) >= 0)
    only = with_judge_requests(conv, 0.0, (1.0,), seed=0, judge=load)
    # one judge request per judged answer: question + answer + template in, the rating out
    assert sorted(only.input_tokens) == sorted(conv.input_tokens + conv.output_tokens + 200)
    assert np.all(only.output_tokens == 8)


def test_plan_with_a_judge_served_by_the_large_model(tmp_path):
    conv = load_trace(builtin_trace_path("azure-conv"))
    prof, src = stage_profile(load_quality(builtin_profile_path("mtbench")), CASCADE)
    judge = JudgeInfo(name="llama-3-70b as judge", score_low=0, score_high=100, served_by="llama-3-70b")
    opts = PlannerOptions(cache_dir=str(tmp_path / "tables"), processes=1, seed=3, sub_cascades=False)
    p = plan([get_model(m) for m in CASCADE], parse_cluster("1x8xH100"), window(conv, 0, 300), prof, 88.0,
             quality_source=src, judge=judge, options=opts)
    assert isinstance(p, Plan), p
    assert p.judge.served_by == "llama-3-70b"
    assert verify_plan(p) == []
    p.save(tmp_path / "plan.json")
    back = Plan.load(tmp_path / "plan.json")
    assert back.judge == p.judge
    # the same deployment predicted without the judge's load is faster: the load is counted
    free = dataclasses.replace(p, judge=dataclasses.replace(p.judge, served_by=None))
    test = window(conv, 300, 600)
    with_load = simulate_plan(p, test, seed=1)
    without = simulate_plan(free, test, seed=1)
    busy = lambda r: sum(b for name, b in zip(r.engine_names, r.engine_busy_s) if name.startswith("stage1"))  # noqa
    assert busy(with_load) > busy(without)
    assert np.percentile(with_load.e2e_s, 95) > np.percentile(without.e2e_s, 95)
    with pytest.raises(ValueError, match="not a model of the cascade"):
        dataclasses.replace(p.judge, served_by="mixtral-8x7b").load_on(CASCADE)
