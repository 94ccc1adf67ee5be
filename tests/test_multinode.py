"""Multi-node placement on one machine (issue 7, item 3): a Ray cluster of a head and two
worker nodes, all on this machine (ray.cluster_utils.Cluster), each worker declaring 8 "GPUs" (a resource count: the replicas
are simulated). A 16-GPU plan -- a tp8 replica of Llama-3-70B and two tp4 replicas of
Llama-3-8B -- is started replica by replica in the placement groups `serve --plan` uses
(router/plan_replicas.py); the test asserts where each replica landed (a TP group never
straddles nodes, the tp8 replica fills a node, the two tp4 replicas share the other), then
the cascade serves requests through them over HTTP."""

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
    workers = [c.add_node(num_cpus=2, num_gpus=8) for _ in range(2)]
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
