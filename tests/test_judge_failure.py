"""Judge failure (issue 6, item 2): a judge that is down, slower than its timeout or returns
garbage. The configured policy applies (escalate or accept), the request completes, and
cascadia_judge_failures counts it -- over real HTTP on 127.0.0.1 with fake engines, and
for the LLM judge against a loopback endpoint that misbehaves."""

import asyncio
import math
import subprocess
import sys

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from router.cascade import Cascade, Stage
from router.judges import Judge, LLMJudge
from router.metrics import RouterMetrics
from router.server import make_app
from test_router_front import THRESHOLD, FakeEngine
from server_thread import record_figure
from test_server import delta, metric_samples


class BrokenJudge(Judge):
    """A plug-in judge that fails in one of three ways."""

    name = "broken"

    def __init__(self, mode: str):
        self.mode = mode
        self.calls = 0

    async def score(self, request, answer) -> float:
        self.calls += 1
        if self.mode == "raises":
            raise RuntimeError("judge backend crashed")
        if self.mode == "slow":
            await asyncio.sleep(5.0)  # far beyond the cascade's 0.2 s timeout
            return 99.0
        return float("nan")  # garbage


def run(cascade: Cascade, engines: dict, test):
    app = make_app(cascade, model_name="cascade", member_engines=engines, metrics=RouterMetrics())

    async def main():
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            return await asyncio.wait_for(test(client), 30.0)

    return asyncio.run(main())


async def ask_twice(client):
    before = await metric_samples(client)
    bodies = []
    for text in ("easy one", "another easy one"):
        resp = await client.post("/v1/chat/completions",
                                 json={"model": "cascade", "messages": [{"role": "user", "content": text}],
                                       "max_tokens": 4})
        bodies.append((resp.status, await resp.json()))
    return bodies, before, await metric_samples(client)


@pytest.mark.parametrize("mode", ["raises", "slow", "garbage"])
@pytest.mark.parametrize("policy", ["escalate", "accept"])
def test_a_failing_plugin_judge_applies_the_policy_and_is_counted(mode, policy):
    small, large = FakeEngine("small"), FakeEngine("large")
    judge = BrokenJudge(mode)
    cascade = Cascade([Stage("small", small, THRESHOLD), Stage("large", large, None)], judge,
                      on_judge_failure=policy, judge_timeout_s=0.2)
    bodies, before, after = run(cascade, {"small": small, "large": large}, ask_twice)
    expected_stage = 1 if policy == "escalate" else 0
    for status, body in bodies:
        assert status == 200 and body["cascade"]["stage"] == expected_stage
        assert body["choices"][0]["message"]["content"]
    assert judge.calls == 2
    assert delta(before, after, "cascadia_judge_failures_total", stage="small") == 2
    assert delta(before, after, "cascadia_escalations_total", stage="small") == (2 if policy == "escalate" else 0)
    record_figure(f"judge failure (plug-in {mode}, policy {policy})", requests=2,
                  completed=sum(st == 200 for st, _ in bodies), answered_by_stage=expected_stage,
                  failures_counted=delta(before, after, "cascadia_judge_failures_total", stage="small"))


async def _judge_endpoint(mode: str):
    async def handler(request):
        if mode == "slow":
            await asyncio.sleep(3.0)
        if mode == "garbage":
            return web.Response(text="<html>not json</html>", content_type="text/html")
        return web.json_response({"choices": [{"message": {"content": "Rating: [[8]]"}}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


@pytest.mark.parametrize("mode", ["down", "slow", "garbage", "working"])
def test_llm_judge_endpoint_down_slow_or_garbage_still_answers(mode):
    small, large = FakeEngine("small"), FakeEngine("large")

    async def main():
        server = None
        if mode == "down":
            url = "http://127.0.0.1:9"  # the discard port: connection refused
        else:
            server = await _judge_endpoint(mode)
            url = str(server.make_url("/")).rstrip("/")
        judge = LLMJudge(url, "grader", timeout_s=0.5, on_failure="escalate")
        cascade = Cascade([Stage("small", small, THRESHOLD), Stage("large", large, None)], judge)
        app = make_app(cascade, model_name="cascade", member_engines={"small": small, "large": large},
                       metrics=RouterMetrics())
        try:
            async with TestClient(TestServer(app, host="127.0.0.1")) as client:
                return await asyncio.wait_for(ask_twice(client), 30.0)
        finally:
            await judge.close()
            if server is not None:
                await server.close()

    bodies, before, after = asyncio.run(main())
    failures = delta(before, after, "cascadia_judge_failures_total", stage="small")
    for status, body in bodies:
        assert status == 200 and body["choices"][0]["message"]["content"]
        if mode == "working":  # rated 8 on 1-10 -> 100 * 7 / 9 >= the threshold: accepted at stage 1
            assert body["cascade"]["stage"] == 0 and body["cascade"]["scores"] == [pytest.approx(700 / 9)]
        else:  # no score: escalated by the policy
            assert body["cascade"]["stage"] == 1
    assert failures == (0 if mode == "working" else 2)
    record_figure(f"judge failure (LLM judge endpoint {mode})", requests=2,
                  completed=sum(st == 200 for st, _ in bodies), failures_counted=failures)


def test_cascade_rejects_an_unknown_policy_or_a_bad_timeout():
    eng = FakeEngine("e")
    with pytest.raises(ValueError, match="on_judge_failure"):
        Cascade([Stage("e", eng, None)], None, on_judge_failure="retry")
    with pytest.raises(ValueError, match="judge_timeout_s"):
        Cascade([Stage("e", eng, None)], None, judge_timeout_s=0)


@pytest.mark.parametrize("argv, needle", [
    (["--judge", "llm"], "--judge llm needs --judge-url"),
    (["--judge", "llm", "--judge-url", "ftp://x", "--judge-model", "m"], "--judge-url must start with http"),
    (["--judge", "no_such_module_xyz:Judge"], "--judge:"),
    (["--judge-url", "http://127.0.0.1:1"], "are for --judge llm"),
    (["--judge-timeout", "0"], "--judge-timeout must be > 0"),
    (["--judge", "llm", "--judge-url", "http://127.0.0.1:1", "--judge-model", "m", "--judge-api-key-env",
      "CASCADIA_TEST_UNSET_VAR"], "is not set"),
])
def test_judge_flag_errors_are_one_line_and_exit_2(argv, needle):
    proc = subprocess.run([sys.executable, "-m", "cascadia", "serve", *argv], capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr
