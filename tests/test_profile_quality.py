"""`cascadia profile-quality`: the server scores a member's answer with its own judge when
asked (`cascade.judge_answer`), and the client turns every member's judged answers into a
long-format profile that `cascadia plan` accepts. Servers on 127.0.0.1 only."""

import asyncio
import csv
import json
import math
import threading

import pytest
from aiohttp.test_utils import TestClient, TestServer

from cascadia.cli import main
from cascadia.quality import load_quality
from test_router_front import EASY_LOGPROB, HARD_LOGPROB
from test_server import build, sse_events

EASY, HARD = 100 * math.exp(EASY_LOGPROB), 100 * math.exp(HARD_LOGPROB)


def ask(model, text, judge=None, **extra):
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 4, **extra}
    if judge is not None:
        body["cascade"] = {"judge_answer": judge}
    return body


def on_server(test):
    app, small, large = build()

    async def run():
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            return await test(client)

    return asyncio.run(run())


def test_member_answer_scored_by_the_servers_judge_only_when_asked():
    async def test(client):
        out = []
        for body in (ask("small", "easy", True), ask("large", "hard", True), ask("small", "easy"),
                     ask("cascade", "easy", True), ask("cascade", "hard", True)):
            r = await client.post("/v1/chat/completions", json=body)
            assert r.status == 200
            out.append((await r.json())["cascade"])
        return out

    member_easy, member_hard, unasked, accepted, escalated = on_server(test)
    assert member_easy["answer_score"] == pytest.approx(EASY) and member_easy["scores"] == []
    assert member_hard["answer_score"] == pytest.approx(HARD)
    assert "answer_score" not in unasked
    assert accepted["stage"] == 0 and accepted["answer_score"] == pytest.approx(accepted["scores"][0])
    assert escalated["stage"] == 1 and escalated["answer_score"] == pytest.approx(HARD)  # stage 2's own answer


def test_streamed_member_answer_carries_the_score_on_its_last_chunk_and_bad_flag_is_400():
    async def test(client):
        r = await client.post("/v1/chat/completions", json=ask("small", "easy", True, stream=True))
        events = await sse_events(r)
        bad = await client.post("/v1/chat/completions", json=ask("small", "easy", "yes"))
        return events, bad.status, await bad.json()

    events, status, body = on_server(test)
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]" and chunks[-1]["cascade"]["answer_score"] == pytest.approx(EASY)
    assert all("answer_score" not in c["cascade"] for c in chunks[:-1])
    assert status == 400 and body["error"]["param"] == "cascade.judge_answer"


class PlanServer:
    """`cascadia serve --plan --engine sim` in a thread with its own event loop."""

    def __init__(self, plan_path):
        self.plan_path, self.ready, self.logs = str(plan_path), threading.Event(), []
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self):
        from router.serve import plan_deployment, serve

        self.loop, self.stop = asyncio.get_running_loop(), asyncio.Event()
        dep = await plan_deployment(self.plan_path, "sim", time_dilation=200.0, warmup_requests=20,
                                    log=self.logs.append)
        ready = asyncio.Event()
        task = asyncio.create_task(serve(dep, "127.0.0.1", 0, log=self.logs.append, ready=ready, stop=self.stop))
        await ready.wait()
        self.url = next(x.split(" on ")[1].split()[0] for x in self.logs if x.startswith("Cascadia serving"))
        self.ready.set()
        await task

    def __enter__(self):
        self.thread.start()
        assert self.ready.wait(120), self.logs
        return self

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(60)


def test_profile_of_a_served_plan_feeds_cascadia_plan(tmp_path, capsys):
    cascade = "llama-3-8b,llama-3-70b"
    common = ["--cluster", "1x8xH100", "--trace", "azure-conv", "--window", "0:120", "--no-progress",
              "--cache-dir", str(tmp_path / "cache"), "--processes", "1"]
    first = tmp_path / "plan.json"
    assert main(["plan", "--cascade", cascade, "--quality", "mtbench", "--q-min", "86", "--out", str(first),
                 *common]) == 0
    out = tmp_path / "profile.csv"
    with PlanServer(first) as srv:
        rc = main(["profile-quality", "--url", srv.url, "--prompts", "mtbench", "--limit", "8", "--max-tokens", "16",
                   "--no-progress", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "16 rows, 0 without a score" in text
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["model"] for r in rows[:2]] == ["llama-3-8b", "llama-3-70b"] and rows[0]["request_id"] == "81-1"
    assert all(0.0 <= float(r["routing_score"]) <= 100.0 and r["prompt"] for r in rows)
    prof = load_quality(out)
    assert prof.n_requests == 8 and set(prof.models) == {"llama-3-8b", "llama-3-70b"} and prof.single_score
    second = tmp_path / "plan2.json"
    q_min = float(prof.quality_scores.mean(axis=0).min()) * 100.0 / prof.score_range[1] - 0.5  # reachable
    assert main(["plan", "--cascade", cascade, "--quality", str(out), "--q-min", f"{q_min:.2f}", "--out",
                 str(second), *common]) == 0
    planned = json.loads(second.read_text())
    assert planned["quality"]["kind"] == "real" and "profile.csv" in json.dumps(planned["quality"])


def test_profile_quality_bad_input_is_one_line_exit_2(tmp_path, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for argv, message in ((["--url", f"http://127.0.0.1:{port}", "--prompts", "mtbench"], "cannot reach"),
                          (["--url", f"http://127.0.0.1:{port}", "--prompts", "/no/such.jsonl"], "no such file"),
                          (["--url", f"http://127.0.0.1:{port}", "--prompts", "mtbench", "--limit", "0"], "--limit")):
        rc = main(["profile-quality", *argv, "--out", str(tmp_path / "p.csv")])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and message in err, err
