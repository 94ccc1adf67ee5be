"""Overload (issue 6, item 3): offered load far above capacity. Per-stage queues stay within
their bound, the excess gets 429 with Retry-After (never a 5xx, never a hang), the router's
memory stays bounded, service recovers when the load drops, and clients that disconnect free
their engine work. Loopback only; every wait is bounded."""

from __future__ import annotations

import asyncio
import threading
import time

import aiohttp
import pytest

from router.cascade import Cascade, Stage
from router.judges import LogprobJudge
from router.metrics import RouterMetrics
from router.pool import ReplicaPool
from router.server import make_app
from server_thread import ServerThread, record_figure
from test_router_front import THRESHOLD, FakeEngine

MAX_QUEUE = 16
BURST = 600
CONCURRENCY = 300


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def build(delay_s: float):
    engines = {n: [FakeEngine(n, delay_s=delay_s, n_tokens=8) for _ in range(2)] for n in ("small", "large")}
    pools = {n: ReplicaPool(e, max_queue=MAX_QUEUE) for n, e in engines.items()}
    cascade = Cascade([Stage("small", pools["small"], THRESHOLD), Stage("large", pools["large"], None)],
                      LogprobJudge())
    app = make_app(cascade, model_name="cascade", member_engines=pools, metrics=RouterMetrics())
    return app, pools, engines


def body(text: str) -> dict:
    return {"model": "cascade", "messages": [{"role": "user", "content": text}], "max_tokens": 8}


class DepthSampler:
    """The largest number of requests inside each pool, sampled every 2 ms from another thread."""

    def __init__(self, pools: dict):
        self.pools, self.peak = pools, {n: 0 for n in pools}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for n, p in self.pools.items():
                self.peak[n] = max(self.peak[n], p.in_flight)
            time.sleep(0.002)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)


@pytest.fixture()
def server():
    app, pools, engines = build(delay_s=0.01)
    s = ServerThread(app).start()
    s.pools, s.engines = pools, engines
    yield s
    s.stop()


def test_overload_sheds_with_429_keeps_queues_and_memory_bounded_and_recovers(server):
    async def burst():
        results = []
        connector = aiohttp.TCPConnector(limit=CONCURRENCY)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
            async def one(k: int):
                # "hard" prompts escalate, so both stages are loaded
                async with session.post(server.url + "/v1/chat/completions",
                                        json=body("hard one" if k % 2 else "easy one")) as resp:
                    payload = await resp.json()
                    results.append((resp.status, resp.headers.get("Retry-After"), payload))

            t0 = time.perf_counter()
            await asyncio.gather(*(one(k) for k in range(BURST)))
            burst_s = time.perf_counter() - t0
            # the load drops: a lone request is served at once
            t1 = time.perf_counter()
            async with session.post(server.url + "/v1/chat/completions", json=body("easy one")) as resp:
                recovered = (resp.status, time.perf_counter() - t1)
        return results, burst_s, recovered

    rss_before = rss_bytes()
    with DepthSampler(server.pools) as sampler:
        results, burst_s, recovered = asyncio.run(burst())
    rss_after = rss_bytes()
    statuses = [r[0] for r in results]
    shed = [r for r in results if r[0] == 429]
    assert len(results) == BURST and set(statuses) <= {200, 429}, sorted(set(statuses))
    assert shed, "nothing was shed: the load was not above capacity"
    assert statuses.count(200) >= MAX_QUEUE
    for _, retry_after, payload in shed:
        assert retry_after is not None and int(retry_after) >= 1
        assert payload["error"]["code"] == "overloaded" and "retry after" in payload["error"]["message"]
    assert all(peak <= MAX_QUEUE for peak in sampler.peak.values()), sampler.peak
    assert recovered[0] == 200 and recovered[1] < 2.0
    growth = rss_after - rss_before
    assert growth < 200 * 2 ** 20, f"RSS grew by {growth / 2 ** 20:.0f} MiB"
    record_figure("overload", offered=BURST, concurrency=CONCURRENCY, ok=statuses.count(200), shed_429=len(shed),
                  server_errors=sum(s >= 500 for s in statuses), peak_queue=sampler.peak, max_queue=MAX_QUEUE,
                  burst_s=round(burst_s, 2), rss_growth_mib=round(growth / 2 ** 20, 1),
                  recovery_request_s=round(recovered[1], 3))


N_LEAVING = 12  # within MAX_QUEUE: every one is admitted


def test_disconnecting_clients_free_their_engine_work():
    """Slow requests whose clients go away mid-generation: every one is aborted in its
    engine and the pools drain to zero."""
    slow_app, pools, engines = build(delay_s=0.2)  # 8 tokens x 0.2 s: 1.6 s per answer
    slow = ServerThread(slow_app).start()
    try:
        async def go():
            async with aiohttp.ClientSession() as session:
                async def one():
                    async with session.post(slow.url + "/v1/chat/completions", json=body("easy one")) as resp:
                        await resp.read()

                tasks = [asyncio.create_task(one()) for _ in range(N_LEAVING)]
                deadline = time.perf_counter() + 10
                while sum(p.in_flight for p in pools.values()) < N_LEAVING:
                    assert time.perf_counter() < deadline, "the requests never reached the engines"
                    await asyncio.sleep(0.01)
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            t0 = time.perf_counter()  # the session is closed: every connection is gone
            while sum(p.in_flight for p in pools.values()) > 0:
                assert time.perf_counter() - t0 < 5.0, "the pools did not drain"
                await asyncio.sleep(0.01)
            return time.perf_counter() - t0

        drain_s = asyncio.run(go())
        aborted = sum(len(e.aborted) for e in engines["small"])
        finished = sum(len(e.finished_at) for e in engines["small"])
        assert aborted == N_LEAVING and finished == 0, (aborted, finished)
        record_figure("disconnects", requests=N_LEAVING, aborted_in_engine=aborted, pools_drained_s=round(drain_s, 3))
    finally:
        slow.stop()
