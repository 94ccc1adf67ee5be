"""`cascadia serve --plan --engine sim`: a plan's stages on simulated engines behind the real
HTTP server, with thresholds re-calibrated when the serving judge is not the plan's."""

import asyncio
import json

import aiohttp
import pytest

from cascadia.catalog import get_model
from cascadia.quality import builtin_profile_path, load_quality
from cascadia.specs.cluster import parse_cluster
from cascadia.traces import builtin_trace_path, load_trace, window
from planner.bilevel import PlannerOptions, plan
from planner.quality_input import stage_profile
from router.serve import plan_deployment, serve

CASCADE = ["llama-3-8b", "llama-3-70b"]


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plan")
    prof, src = stage_profile(load_quality(builtin_profile_path("mtbench")), CASCADE)
    p = plan([get_model(m) for m in CASCADE], parse_cluster("1x8xH100"),
             window(load_trace(builtin_trace_path("azure-conv")), 0, 120), prof, 88.0, quality_source=src,
             options=PlannerOptions(cache_dir=str(tmp / "tables"), processes=1, seed=2, sub_cascades=False))
    path = tmp / "plan.json"
    p.save(path)
    return path, p


def test_plan_served_on_sim_engines_with_recalibrated_thresholds(plan_file):
    path, p = plan_file
    logs = []

    async def main():
        dep = await plan_deployment(str(path), "sim", time_dilation=50.0, warmup_requests=40, log=logs.append)
        ready, stop = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(serve(dep, "127.0.0.1", 0, log=logs.append, ready=ready, stop=stop))
        await asyncio.wait_for(ready.wait(), 30)
        url = next(line.split(" on ")[1].split()[0] for line in logs if line.startswith("Cascadia serving"))
        async with aiohttp.ClientSession() as s:
            async with s.get(url + "/v1/models") as r:
                models = await r.json()
            async with s.post(url + "/v1/chat/completions", json={
                    "model": "cascadia", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}) as r:
                assert r.status == 200
                doc = await r.json()
        stop.set()
        await asyncio.wait_for(task, 30)
        return dep, models, doc

    dep, models, doc = asyncio.run(main())
    served = models["data"][0]["cascade"]
    planned = p.stages[0].threshold
    assert served["judge"]["name"] == "logprob"
    assert served["stages"][0]["threshold"] != planned  # re-derived for this judge
    assert "re-calibrated" in served["thresholds"]
    assert doc["cascade"]["stage"] in (0, 1) and len(doc["choices"][0]["message"]["content"]) > 0
    assert any("escalating" in line for line in logs)
    assert [m["id"] for m in models["data"]] == ["cascadia", *CASCADE]


def test_thresholds_are_recalibrated_on_more_warm_ups_than_there_are_questions(plan_file):
    path, _ = plan_file
    logs = []

    async def main():
        dep = await plan_deployment(str(path), "sim", time_dilation=50.0, warmup_requests=200, log=logs.append)
        await dep.stop()
        return dep

    dep = asyncio.run(main())
    line = next(line for line in logs if "warm-up answers" in line)
    assert "of 200 warm-up answers" in line  # MT-Bench has 80 first turns: cycled
    assert 0.0 < dep.cascade.stages[0].threshold < 100.0


def test_serve_calibration_requests_must_be_positive(plan_file, capsys):
    from cascadia.cli import main

    path, _ = plan_file
    assert main(["serve", "--plan", str(path), "--calibration-requests", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--calibration-requests must be >= 1" in err
