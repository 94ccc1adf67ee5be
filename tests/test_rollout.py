"""Rolling update (issue 6, item 6): a plan diff applied to a serving cascade on simulated
engines while closed-loop clients keep sending. New replicas start and answer their health
check before they get traffic; old ones drain and stop; the new threshold applies; no
request fails."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import aiohttp
import pytest

from cascadia.perf.layout import Layout
from cascadia.plan import Plan
from cascadia.plan_diff import RESIZE, SET_THRESHOLD, START, diff
from cascadia.sim.cluster import StageDeployment
from router.engines.sim import SimulatedEngine
from router.rollout import RolloutError, apply_diff
from router.serve import plan_deployment, serve
from server_thread import record_figure
from test_serve_plan import plan_file  # noqa: F401  (a planner-made 2-stage plan)

DILATION = 20.0


def with_stages(p: Plan, first: tuple, last: tuple, threshold: float) -> Plan:
    s0, s1 = p.stages
    return dataclasses.replace(p, stages=(dataclasses.replace(s0, replicas=first, threshold=threshold),
                                          dataclasses.replace(s1, replicas=last)))


class Starter:
    """start_replica for apply_diff: a simulated replica of the new plan's layout, recorded."""

    def __init__(self, plan: Plan):
        self.plan, self.started = plan, []

    async def __call__(self, action):
        pool = self.plan.cluster.pools[0]
        model = self.plan.models[action.stage]
        dep = StageDeployment(model, pool.gpu, (action.new,), self.plan.engine, None, pool.gpus_per_node)
        await asyncio.sleep(0.2)  # a replica takes a while to come up
        engine = SimulatedEngine.from_stage(model.name, dep, 0, time_dilation=DILATION)
        self.started.append((time.monotonic(), engine))
        return engine


def test_rolling_update_under_load_loses_no_request(plan_file, tmp_path):  # noqa: F811
    _, base = plan_file
    old = with_stages(base, (Layout(1),), (Layout(4),), 78.0)  # sim scores ~78 +- 3: about half escalate
    new = with_stages(base, (Layout(1), Layout(1)), (Layout(8),), 85.0)  # nearly all escalate
    old_path = tmp_path / "old.json"
    old.save(old_path)
    d = diff(old, new)
    kinds = sorted(a.kind for a in d.actions)
    assert kinds == sorted([START, RESIZE, SET_THRESHOLD]), d.describe()
    logs: list[str] = []
    starter = Starter(new)

    async def main():
        dep = await plan_deployment(str(old_path), "sim", time_dilation=DILATION, log=logs.append)
        ready, stop = asyncio.Event(), asyncio.Event()
        server = asyncio.create_task(serve(dep, "127.0.0.1", 0, log=logs.append, ready=ready, stop=stop))
        await asyncio.wait_for(ready.wait(), 30)
        url = next(line.split(" on ")[1].split()[0] for line in logs if line.startswith("Cascadia serving"))
        first_pool, last_pool = (st.pool for st in dep.cascade.stages)
        old_last = last_pool.engines[0]
        statuses: list[int] = []
        done = asyncio.Event()

        async def client(k: int):
            async with aiohttp.ClientSession() as session:
                n = 0
                while not done.is_set() and n < 400:
                    n += 1
                    body = {"model": "cascadia", "messages": [{"role": "user", "content": f"q{k}-{n}"}],
                            "max_tokens": 32, "stream": n % 2 == 0}
                    async with session.post(url + "/v1/chat/completions", json=body) as r:
                        text = await r.text()
                        ok = r.status == 200 and '"error"' not in text  # a stream may carry an error event
                        statuses.append(r.status if ok else -1)

        clients = [asyncio.create_task(client(k)) for k in range(8)]
        await asyncio.sleep(0.5)
        before = len(statuses)
        report = await asyncio.wait_for(apply_diff(dep.cascade, d, starter, drain_timeout_s=30, log=logs.append), 60)
        after_rollout = len(statuses)
        await asyncio.sleep(0.5)
        done.set()
        await asyncio.wait_for(asyncio.gather(*clients), 60)
        stats_new = [await e.stats() for _, e in starter.started]
        stats_old_last = await old_last.stats()
        stop.set()
        await asyncio.wait_for(server, 60)
        return (statuses, before, after_rollout, report, dep, stats_new, stats_old_last, first_pool, last_pool)

    statuses, before, after_rollout, report, dep, stats_new, stats_old_last, first_pool, last_pool = asyncio.run(main())
    assert before > 0 and after_rollout > before, "no traffic during the rollout"
    assert statuses and all(s == 200 for s in statuses), f"{sum(s != 200 for s in statuses)} failed"
    assert report.started == 2 and report.retired == 1 and report.thresholds == 1
    assert report.cut_at_drain_deadline == 0
    assert dep.cascade.stages[0].threshold == 85.0
    assert [lay for i, lay in enumerate(first_pool.layouts) if i in first_pool.active] == [Layout(1), Layout(1)]
    assert [last_pool.layouts[i] for i in last_pool.active] == [Layout(8)]
    served = [(s["name"], s["requests_done"], s["tokens_out"]) for s in stats_new]
    assert all(s["requests_done"] > 0 for s in stats_new), served  # the new replicas took traffic
    assert stats_old_last["running"] == 0 and stats_old_last["waiting"] == 0  # drained, then stopped
    record_figure("rolling update (sim)", requests=len(statuses), during_rollout=after_rollout - before,
                  failed=sum(s != 200 for s in statuses), actions=len(d.actions), rollout_s=round(report.seconds, 2),
                  cut_at_drain_deadline=report.cut_at_drain_deadline)


def test_a_diff_that_changes_the_models_is_refused_before_anything_changes(plan_file):  # noqa: F811
    _, base = plan_file
    other = dataclasses.replace(base, stages=(dataclasses.replace(base.stages[0], model="another-model"),
                                              base.stages[1]))
    d = diff(base, other)

    class FakeCascade:
        stages = [type("S", (), {"name": s.model, "pool": None})() for s in base.stages]

    with pytest.raises(RolloutError, match="changes the cascade's models"):
        asyncio.run(apply_diff(FakeCascade(), d, None))


def test_retiring_a_backlogged_replica_moves_what_it_has_not_started():
    """A replica retired with a queue (typical of a re-plan under load): the requests it has
    not sent anything back for go to the replica that stays; the ones it is generating finish
    there; none fails, and the drain is as short as its running requests."""
    from cascadia.catalog import get_model
    from cascadia.sim.config import EngineConfig
    from cascadia.specs.gpu import get_gpu
    from router.pool import ReplicaPool
    from router.protocol import GenerateRequest

    stage = StageDeployment(get_model("llama-3-8b"), get_gpu("H100"), (Layout(1),),
                            EngineConfig(max_num_seqs=4), None, 8)

    async def main():
        old, new = (SimulatedEngine.from_stage("m", stage, 0, time_dilation=DILATION, seed=s) for s in (1, 2))
        pool = ReplicaPool([old], max_queue=100, layouts=[Layout(1)])

        async def one(k: int):
            req = GenerateRequest(f"r{k}", "w" * 400, max_tokens=256, ignore_eos=True)
            return sum([len(c.token_ids) async for c in pool.generate(req)])

        t0 = time.monotonic()
        tasks = [asyncio.create_task(one(k)) for k in range(24)]  # 4 run, 20 wait on the one replica
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        batch_s = time.monotonic() - t0  # how long 4 requests take together
        pool.add_replica(new, Layout(1))
        drain_s, left = await pool.retire(0, drain_timeout_s=60)
        tokens = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        return pool.moved, batch_s, drain_s, left, tokens, (await old.stats())["requests_done"], \
            (await new.stats())["requests_done"]

    moved, batch_s, drain_s, left, tokens, done_old, done_new = asyncio.run(main())
    assert tokens == [256] * 24  # every request complete
    assert left == 0 and moved >= 12 and done_old + done_new == 24 and done_new == moved
    assert done_old <= 12  # what it had started: the first 4, and at most 4 + 4 more
    # kept, its 16-20 waiting requests would have held the drain for 4-5 more batches
    assert drain_s < 1.5 * batch_s, (drain_s, batch_s)
