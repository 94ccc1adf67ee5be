"""Stages served by an external OpenAI-compatible endpoint, chosen in the plan file
(`stages[i].endpoint`) or with `cascadia serve --stage-endpoint MODEL=URL[,...]`: the other
stages run on simulated engines, the endpoint is a fake OpenAI server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from test_openai_engine import MODEL, TOKENS, FakeOpenAI

from cascadia import cli
from cascadia.catalog import get_model
from cascadia.perf.layout import Layout
from cascadia.plan import Plan, PlanError, PlanStage, StageEndpoint
from cascadia.quality import builtin_profile_path, load_quality
from cascadia.specs.cluster import parse_cluster
from cascadia.traces import builtin_trace_path, load_trace, window
from planner.bilevel import PlannerOptions, plan
from planner.quality_input import stage_profile
from router import serve as serve_mod
from router.serve import DEFAULT_STAGE_NAMES, default_deployment, plan_deployment, serve

CASCADE = ["llama-3-8b", "llama-3-70b"]


@pytest.fixture(scope="module")
def escalating_plan(tmp_path_factory):
    """A 2-stage plan (the planner's, with its stages fixed here so the test does not hang on
    what the planner decides) where every request escalates: the logprob judge (no
    re-calibration) and threshold 100 (a mean logprob below 0 scores under 100)."""
    tmp = tmp_path_factory.mktemp("plan")
    prof, src = stage_profile(load_quality(builtin_profile_path("mtbench")), CASCADE)
    p = plan([get_model(m) for m in CASCADE], parse_cluster("1x8xH100"),
             window(load_trace(builtin_trace_path("azure-conv")), 0, 120), prof, 88.0, quality_source=src,
             options=PlannerOptions(cache_dir=str(tmp / "tables"), processes=1, seed=2))
    stages = (PlanStage(CASCADE[0], "H100", (Layout(1, 1, (0,)), Layout(1, 1, (0,))), 100.0, 1.0, 1.0, 0.5),
              PlanStage(CASCADE[1], "H100", (Layout(4, 1, (0,)),), None, 0.5, 0.5, 1.5))
    p = dataclasses.replace(p, models=tuple(get_model(m) for m in CASCADE), stages=stages,
                            judge=dataclasses.replace(p.judge, name="logprob", served_by=None))
    path = tmp / "plan.json"
    p.save(path)
    return path, p


@contextlib.asynccontextmanager
async def fake_server():
    fake = FakeOpenAI()
    server = TestServer(fake.app, host="127.0.0.1")
    await server.start_server()
    try:
        yield fake, str(server.make_url("/v1"))
    finally:
        await server.close()


async def _ask(dep, body):
    """Serve `dep` on a free loopback port, send one chat request, stop; (status, doc, headers)."""
    logs: list[str] = []
    ready, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve(dep, "127.0.0.1", 0, log=logs.append, ready=ready, stop=stop))
    try:
        await asyncio.wait_for(ready.wait(), 30)
        url = next(line.split(" on ")[1].split()[0] for line in logs if line.startswith("Cascadia serving"))
        async with aiohttp.ClientSession() as s:
            async with s.get(url + "/health/ready") as r:
                ready_status = r.status
            async with s.post(url + "/v1/chat/completions", json=body) as r:
                return ready_status, r.status, await r.json(), dict(r.headers)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


CHAT = {"model": "cascadia", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "temperature": 0}


def _check_answered_by_endpoint(fake, result):
    ready_status, status, doc, headers = result
    assert ready_status == 200  # the endpoint's /v1/models lists the model: the stage is ready
    assert status == 200, doc
    assert doc["cascade"]["stage"] == 1 and headers["x-cascadia-stage"] == "llama-3-70b"
    assert doc["choices"][0]["message"]["content"] == "".join(TOKENS)
    assert len(doc["cascade"]["scores"]) == 1 and doc["cascade"]["scores"][0] < 100
    chats = [body for path, body in fake.bodies if path == "/v1/chat/completions"]
    assert len(chats) == 1 and chats[0]["model"] == MODEL and chats[0]["messages"] == CHAT["messages"]


def test_a_plan_stage_with_an_endpoint_is_answered_by_it(escalating_plan, tmp_path):
    path, _ = escalating_plan

    async def main():
        async with fake_server() as (fake, url):
            doc = json.loads(path.read_text())
            doc["stages"][1]["endpoint"] = {"url": url, "model": MODEL}
            with_endpoint = tmp_path / "with-endpoint.json"
            with_endpoint.write_text(json.dumps(doc))
            dep = await plan_deployment(str(with_endpoint), "sim", time_dilation=50.0, log=lambda m: None)
            replicas = [len(dep.members[m].engines) for m in CASCADE]
            kinds = [type(e).__name__ for e in dep.members["llama-3-70b"].engines]
            return fake, await _ask(dep, CHAT), replicas, kinds

    fake, result, replicas, kinds = asyncio.run(main())
    assert kinds == ["OpenAIEngine"] and replicas[1] == 1
    _check_answered_by_endpoint(fake, result)


def test_stage_endpoint_flag_replaces_the_stage_replicas(escalating_plan, monkeypatch):
    path, p = escalating_plan
    seen = {}

    def fake_serve_main(args):
        seen["args"] = args
        return 0

    monkeypatch.setattr(serve_mod, "serve_main", fake_serve_main)

    async def main():
        async with fake_server() as (fake, url):
            rc = cli.main(["serve", "--plan", str(path), "--stage-endpoint", f"llama-3-70b={url},model={MODEL}"])
            assert rc == 0
            args = seen["args"]
            dep = await plan_deployment(str(path), args.engine, time_dilation=50.0, endpoints=args.stage_endpoints,
                                        log=lambda m: None)
            return fake, args, await _ask(dep, CHAT)

    fake, args, result = asyncio.run(main())
    assert args.engine == "sim" and set(args.stage_endpoints) == {"llama-3-70b"}
    assert args.stage_endpoints["llama-3-70b"].model == MODEL
    _check_answered_by_endpoint(fake, result)
    assert len(p.stages[1].replicas) >= 1  # the plan had replicas there; the flag replaced them


def test_default_cascade_with_both_stages_on_endpoints_starts_no_engine():
    import ray

    async def main():
        async with fake_server() as (fake, url):
            endpoint = StageEndpoint(url, model=MODEL)
            dep = await default_deployment(threshold=100.0, endpoints={n: endpoint for n in DEFAULT_STAGE_NAMES},
                                           log=lambda m: None)
            return fake, await _ask(dep, CHAT)

    fake, (ready_status, status, doc, headers) = asyncio.run(main())
    assert not ray.is_initialized()
    assert ready_status == 200 and status == 200 and doc["cascade"]["stage"] == 1
    assert headers["x-cascadia-stage"] == DEFAULT_STAGE_NAMES[1]
    assert [path for path, _ in fake.bodies] == ["/v1/chat/completions"] * 2  # stage 1, then stage 2


@pytest.mark.parametrize("flag, expected", [
    ("llama-3-405b=http://127.0.0.1:9/v1", "'llama-3-405b' is not a stage of the cascade"),
    ("llama-3-70b=ftp://127.0.0.1/v1", "malformed URL 'ftp://127.0.0.1/v1'"),
    ("llama-3-70b=http://127.0.0.1:port/v1", "malformed URL"),
    ("llama-3-70b=127.0.0.1:8000", "malformed URL"),
    ("llama-3-70b", "expected MODEL=URL"),
    ("llama-3-70b=http://127.0.0.1:9/v1,api_key=x", "unknown option 'api_key=x'"),
    ("llama-3-70b=http://127.0.0.1:9/v1,api_key_env=CASCADIA_TEST_UNSET_KEY", "CASCADIA_TEST_UNSET_KEY"),
])
def test_bad_stage_endpoint_flags_exit_2_with_one_line(escalating_plan, capsys, monkeypatch, flag, expected):
    path, _ = escalating_plan
    monkeypatch.delenv("CASCADIA_TEST_UNSET_KEY", raising=False)
    monkeypatch.setattr(serve_mod, "serve_main", lambda args: pytest.fail("must not start serving"))
    rc = cli.main(["serve", "--plan", str(path), "--stage-endpoint", flag])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and expected in err and "--stage-endpoint" in err


def test_stage_endpoint_flag_checks_default_cascade_names(capsys, monkeypatch):
    monkeypatch.setattr(serve_mod, "serve_main", lambda args: pytest.fail("must not start serving"))
    assert cli.main(["serve", "--stage-endpoint", "llama-3-70b=http://127.0.0.1:9"]) == 2
    assert DEFAULT_STAGE_NAMES[0] in capsys.readouterr().err


def test_plan_endpoint_round_trips_and_old_plans_still_load(escalating_plan, tmp_path):
    path, p = escalating_plan
    assert "endpoint" not in json.loads(path.read_text())["stages"][1]  # absent: served by our engines
    assert Plan.load(path).stages[1].endpoint is None
    ep = StageEndpoint("https://api.example.com/v1", model="gpt-x", api_key_env="EXAMPLE_KEY")
    p2 = dataclasses.replace(p, stages=(p.stages[0], dataclasses.replace(p.stages[1], endpoint=ep, replicas=())))
    p2.save(tmp_path / "p2.json")
    assert Plan.load(tmp_path / "p2.json").stages[1].endpoint == ep
    doc = json.loads((tmp_path / "p2.json").read_text())
    doc["stages"][1]["endpoint"]["url"] = "api.example.com"
    with pytest.raises(PlanError, match=r"plan\.stages\[1\]\.endpoint\.url: malformed URL"):
        Plan.from_dict(doc)
    del doc["stages"][1]["endpoint"]
    with pytest.raises(PlanError, match="has no replicas"):  # neither replicas nor an endpoint
        Plan.from_dict(doc)


def test_simulate_refuses_a_plan_whose_stage_only_has_an_endpoint(escalating_plan, tmp_path, capsys):
    path, _ = escalating_plan
    doc = json.loads(path.read_text())
    doc["stages"][1].update(endpoint={"url": "http://127.0.0.1:9/v1"}, replicas=[], n_gpus=0)
    remote = tmp_path / "remote.json"
    remote.write_text(json.dumps(doc))
    assert cli.main(["simulate", "--plan", str(remote), "--trace", "azure-conv", "--limit", "20"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "['llama-3-70b'] served by external endpoints" in err
