"""Graceful shutdown (issue 6, item 7): on stop (SIGTERM / Ctrl-C) the server stops
accepting, lets requests in flight finish within the drain deadline, cuts (and aborts in the
engines) what is still running at the deadline, then stops the engines. In-process with fake
engines, and once through `cascadia serve` in a subprocess that gets a real SIGTERM."""

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time

import aiohttp
import pytest

from router.cascade import Cascade, Stage
from router.judges import LogprobJudge
from router.serve import Deployment, serve
from server_thread import record_figure, served_port
from test_router_front import THRESHOLD, FakeEngine
from test_serve_plan import plan_file  # noqa: F401  (a planner-made plan for the subprocess test)

ASK = {"model": "cascadia", "messages": [{"role": "user", "content": "easy one"}], "max_tokens": 8}


def deployment(delay_s: float):
    small, large = FakeEngine("small", delay_s=delay_s, n_tokens=8), FakeEngine("large", delay_s=delay_s, n_tokens=8)
    cascade = Cascade([Stage("small", small, THRESHOLD), Stage("large", large, None)], LogprobJudge())
    dep = Deployment(cascade, {"small": small, "large": large}, "cascadia")
    stopped = []
    dep.stoppers.append(lambda: stopped.append(time.perf_counter()))
    return dep, small, stopped


async def wait_until(predicate, timeout_s: float = 10.0):
    deadline = time.perf_counter() + timeout_s
    while not predicate():
        if time.perf_counter() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def run_shutdown(delay_s: float, drain_timeout_s: float, n_requests: int = 3):
    dep, small, stopped = deployment(delay_s)
    logs: list[str] = []

    async def main():
        ready, stop = asyncio.Event(), asyncio.Event()
        server = asyncio.create_task(serve(dep, "127.0.0.1", 0, log=logs.append, ready=ready, stop=stop,
                                           drain_timeout_s=drain_timeout_s))
        await asyncio.wait_for(ready.wait(), 10)
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)", logs[0]).group(1))
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        async with aiohttp.ClientSession() as session:
            async def one():
                try:
                    async with session.post(url, json=ASK) as resp:
                        return resp.status, await resp.text()
                except aiohttp.ClientError as e:
                    return None, repr(e)

            calls = [asyncio.create_task(one()) for _ in range(n_requests)]
            await wait_until(lambda: len(small.started) == n_requests)
            t_stop = time.perf_counter()
            stop.set()
            results = await asyncio.wait_for(asyncio.gather(*calls), 30)
            await asyncio.wait_for(server, 30)
            t_done = time.perf_counter()
            try:
                async with session.post(url, json=ASK) as resp:
                    after = resp.status
            except aiohttp.ClientConnectionError:
                after = "refused"
        return results, after, t_done - t_stop

    results, after, stop_s = asyncio.run(main())
    return results, after, stop_s, small, stopped, logs


def test_in_flight_requests_finish_before_the_engines_stop():
    results, after, stop_s, small, stopped, logs = run_shutdown(delay_s=0.05, drain_timeout_s=10.0)
    assert [status for status, _ in results] == [200, 200, 200]
    for _, text in results:
        assert json.loads(text)["choices"][0]["message"]["content"].startswith("small-w0")
    assert after == "refused"  # nothing listens any more
    assert stopped, "the engines were not stopped"
    assert small.aborted == []  # nothing was cut
    assert any("draining 3 in flight" in line for line in logs), logs
    assert not any("cut at the deadline" in line for line in logs)
    assert stop_s < 5.0
    record_figure("graceful shutdown (drain)", in_flight=3, completed=3, cut=0, stop_to_exit_s=round(stop_s, 2))


def test_the_deadline_cuts_what_is_still_running_and_aborts_it_in_the_engine():
    # 8 tokens x 1 s per token: far beyond the 0.3 s drain deadline
    results, after, stop_s, small, stopped, logs = run_shutdown(delay_s=1.0, drain_timeout_s=0.3)
    assert all(status != 200 for status, _ in results)  # cut: the client sees the connection end
    assert len(small.aborted) == 3  # the engine work was aborted, not left running
    assert any("3 request(s) cut at the deadline" in line for line in logs), logs
    assert stopped and after == "refused"
    assert stop_s < 5.0
    record_figure("graceful shutdown (deadline 0.3 s)", in_flight=3, cut=3, aborted_in_engine=len(small.aborted),
                  stop_to_exit_s=round(stop_s, 2))


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def test_sigterm_drains_and_exits_cleanly(plan_file):  # noqa: F811
    path, _ = plan_file
    proc = subprocess.Popen([sys.executable, "-m", "cascadia", "serve", "--plan", str(path), "--engine", "sim",
                             "--port", "0", "--drain-timeout", "20"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        port = served_port(proc, lines)
        assert port, "".join(lines)

        async def client():
            model = "cascadia"
            body = {"model": model, "messages": [{"role": "user", "content": "Write a long story."}],
                    "max_tokens": 300, "ignore_eos": True}
            async with aiohttp.ClientSession() as session:
                task = asyncio.create_task(session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body))
                await asyncio.sleep(0.3)  # the request is being generated
                proc.send_signal(signal.SIGTERM)
                resp = await asyncio.wait_for(task, 60)
                return resp.status, await resp.json()

        status, body = asyncio.run(client())
        assert status == 200 and body["usage"]["completion_tokens"] == 300
        assert proc.wait(timeout=60) == 0
        rest = proc.stdout.read()
        assert "draining 1 in flight" in rest and "engines stopped" in rest, rest
        assert _children(proc.pid) == []
        record_figure("graceful shutdown (SIGTERM to cascadia serve)", in_flight=1, completed=1, exit_code=0,
                      child_processes_left=0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
