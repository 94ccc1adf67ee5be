"""`cascadia replay` against a real Cascadia server on 127.0.0.1 (simulated engines, or fake
engines that fail on purpose): records, statuses, recorded errors, the arrival schedule,
the concurrency cap and one-line exit-2 errors."""

import asyncio
import re
import json
import threading

import numpy as np
import pytest

from benchmarks.replay.client import ClientConfig, replay
from benchmarks.replay.prompts import TokenizerPrompts, WordPrompts, default_tokenizer_dir, load_tokenizer
from benchmarks.replay.records import ERROR, OK, read_records
from benchmarks.replay.workload import ReplayRequest, arrival_schedule
from cascadia.cli import main
from cascadia.traces import builtin_trace_path, load_trace, scale_lengths
from router.cascade import Cascade, Stage
from router.judges import LogprobJudge
from router.metrics import RouterMetrics
from router.protocol import EngineError, TokenChunk
from router.server import make_app
from test_router_front import FakeEngine

SCHEDULE_SLACK_S = 0.25  # a release may trail its schedule by the event loop's delay, never lead it


def sim_stage_engines(time_dilation: float = 50.0):
    from cascadia.catalog import get_model
    from cascadia.perf.layout import Layout
    from cascadia.sim.cluster import StageDeployment
    from cascadia.sim.config import EngineConfig
    from cascadia.specs.gpu import get_gpu
    from router.engines.sim import SimulatedEngine

    stage = StageDeployment(get_model("llama-3-8b"), get_gpu("H100"), (Layout(1),), EngineConfig())
    return [SimulatedEngine.from_stage(f"sim-{k}", stage, time_dilation=time_dilation) for k in (1, 2)]


class FlakyEngine(FakeEngine):
    """Every ``every``-th request fails: before any token (a 503) or after two tokens
    (an error event inside the SSE stream)."""

    def __init__(self, name, *, every=3, mid_stream=False, **kw):
        super().__init__(name, **kw)
        self.every, self.mid_stream, self.calls = every, mid_stream, 0

    async def generate(self, req):
        self.calls += 1
        failing = self.calls % self.every == 0
        if failing and not self.mid_stream:
            raise EngineError(f"{self.name}: replica died")
        for i in range(min(self.n_tokens, req.max_tokens)):
            if failing and i == 2:
                raise EngineError(f"{self.name}: replica died mid-stream")
            last = i == min(self.n_tokens, req.max_tokens) - 1
            yield TokenChunk((100 + i,), f"w{i} ", (-0.1,), finished=last, finish_reason="length" if last else None,
                             prompt_tokens=3 if i == 0 else None)


class ServerThread:
    """A Cascadia app on 127.0.0.1:<free port> in its own thread and event loop."""

    def __init__(self, cascade, members, model="cascadia"):
        self.app = make_app(cascade, model_name=model, member_engines=members, metrics=RouterMetrics())
        self.loop = asyncio.new_event_loop()
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        from aiohttp import web

        asyncio.set_event_loop(self.loop)
        self.runner = web.AppRunner(self.app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        self.started.set()
        self.loop.run_forever()

    def __enter__(self):
        self.thread.start()
        assert self.started.wait(30), "server did not start"
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


@pytest.fixture
def sim_server():
    engines = sim_stage_engines()
    cascade = Cascade([Stage("sim-1", engines[0], 60.0), Stage("sim-2", engines[1], None)], LogprobJudge())
    with ServerThread(cascade, {e.name: e for e in engines}) as srv:
        yield srv


def test_replay_cli_records_every_request_on_schedule(sim_server, tmp_path, capsys):
    out = tmp_path / "records.jsonl"
    rc = main(["replay", "--url", sim_server.url, "--trace", "azure-conv", "--limit", "24", "--rate", "12",
               "--length-scale", "0.05", "--tokenizer", "none", "--no-progress", "--out", str(out)])
    assert rc == 0
    recs = read_records(out)
    assert len(recs) == 24 and [r.index for r in recs] == list(range(24))
    assert all(r.status == OK and r.http_status == 200 for r in recs), [r.error for r in recs]
    expected = scale_lengths(load_trace(builtin_trace_path("azure-conv")).select(slice(0, 24)), 0.05)
    assert [r.max_tokens for r in recs] == expected.output_tokens.tolist()
    assert [r.output_tokens for r in recs] == [r.max_tokens for r in recs]  # ignore_eos: exactly max_tokens
    assert [r.input_tokens for r in recs] == expected.input_tokens.tolist()  # ~1 token per word
    assert {r.stage for r in recs} <= {0, 1} and all(r.stage_name in ("sim-1", "sim-2") for r in recs)
    assert all(len(r.scores) == 1 for r in recs)  # stage 1 is always judged
    sched = arrival_schedule(expected, 12.0, 1.0, 0)
    np.testing.assert_allclose([r.scheduled_s for r in recs], sched)
    lag = np.array([r.send_s - r.scheduled_s for r in recs])
    assert np.all(lag >= -1e-6) and np.all(lag < SCHEDULE_SLACK_S), lag
    for r in recs:
        assert r.send_s <= r.token_times_s[0] <= r.end_s and r.ttft_s > 0 and r.e2e_s >= r.ttft_s
        assert r.token_times_s == sorted(r.token_times_s)
    meta = json.loads((tmp_path / "records.jsonl.meta.json").read_text())
    assert meta["model"] == "cascadia" and meta["endpoint"] == "completions"
    assert "24 ok, 0 failed" in capsys.readouterr().out


def test_sim_sized_prompts_are_counted_as_traced_by_simulated_engines(sim_server, tmp_path):
    from benchmarks.replay.prompts import SimPrompts
    from router.engines.sim import approx_tokens

    src = SimPrompts(seed=5)
    for i, n in enumerate([1, 3, 64, 1151, 4000]):
        text = src.text(i, n)
        assert approx_tokens(text) == src.count(text) == n and text == text.strip()
    assert src.text(0, 64) != src.text(1, 64)
    out = tmp_path / "r.jsonl"
    assert main(["replay", "--url", sim_server.url, "--trace", "azure-conv", "--limit", "6", "--rate", "20",
                 "--length-scale", "0.05", "--tokenizer", "sim", "--no-progress", "--out", str(out)]) == 0
    recs = read_records(out)
    assert all(r.status == OK for r in recs)
    assert [r.prompt_tokens for r in recs] == [r.input_tokens for r in recs]  # the server's count is the trace's


def test_a_seed_replays_the_same_request_ids_so_simulated_answers_repeat(sim_server, tmp_path):
    scores = {}
    for run, seed in (("a", 3), ("b", 3), ("c", 4)):
        out = tmp_path / f"{run}.jsonl"
        assert main(["replay", "--url", sim_server.url, "--trace", "azure-conv", "--limit", "8", "--rate", "40",
                     "--length-scale", "0.05", "--tokenizer", "sim", "--seed", str(seed), "--no-progress",
                     "--out", str(out)]) == 0
        recs = read_records(out)
        assert [r.request_id for r in recs] == [f"replay-s{seed}-{i}" for i in range(8)]
        scores[run] = [r.scores for r in recs]
    # the simulated answers (and so the judge's scores) are drawn per request id
    assert scores["a"] == scores["b"] and scores["a"] != scores["c"]


def test_trace_timestamps_are_time_scaled(sim_server, tmp_path):
    out = tmp_path / "r.jsonl"
    rc = main(["replay", "--url", sim_server.url, "--trace", "azure-conv", "--limit", "8", "--time-scale", "0.2",
               "--length-scale", "0.02", "--tokenizer", "none", "--no-progress", "--model", "sim-2",
               "--out", str(out)])
    assert rc == 0
    recs = read_records(out)
    trace = load_trace(builtin_trace_path("azure-conv")).select(slice(0, 8))
    np.testing.assert_allclose([r.scheduled_s for r in recs], trace.arrival_s * 0.2)
    assert all(0 <= r.send_s - r.scheduled_s < SCHEDULE_SLACK_S for r in recs)
    assert all(r.stage == 0 and r.stage_name == "sim-2" and r.scores == [] for r in recs)  # a member: no judge


def _requests(n, gap_s=0.0, max_tokens=4):
    return [ReplayRequest(i, i * gap_s, f"q{i}", 2, max_tokens) for i in range(n)]


@pytest.mark.parametrize("mid_stream", [False, True])
def test_server_errors_are_recorded_not_dropped(mid_stream):
    small = FlakyEngine("small", every=3, mid_stream=mid_stream, n_tokens=4)
    cascade = Cascade([Stage("small", small, None)], None, max_retries=0)  # no retry: the errors reach the client
    with ServerThread(cascade, {"small-m": FakeEngine("small-m")}) as srv:
        recs = asyncio.run(replay(_requests(9), ClientConfig(url=srv.url, model="cascadia")))
    assert len(recs) == 9
    failed = [r for r in recs if r.status == ERROR]
    assert len(failed) == 3 and all(r.end_s is not None and r.error for r in failed)
    if mid_stream:  # the 200 was already sent: the failure arrives as an SSE error event
        assert all(r.http_status == 200 and len(r.token_times_s) == 2 and "mid-stream" in r.error
                   for r in failed), [r.error for r in failed]
    else:
        assert all(r.http_status == 503 and "replica died" in r.error for r in failed)
    assert all(r.output_tokens == 4 for r in recs if r.status == OK)


def test_max_concurrency_caps_requests_in_flight():
    eng = FakeEngine("slow", n_tokens=3, delay_s=0.02)
    with ServerThread(Cascade([Stage("slow", eng, None)], None), {"m": FakeEngine("m")}) as srv:
        recs = asyncio.run(replay(_requests(6), ClientConfig(url=srv.url, model="cascadia", max_concurrency=2)))
    assert all(r.status == OK for r in recs)
    events = sorted([(r.send_s, 1) for r in recs] + [(r.end_s, -1) for r in recs], key=lambda e: (e[0], e[1]))
    peak = max(np.cumsum([e[1] for e in events]))
    assert peak == 2
    assert max(r.send_s - r.scheduled_s for r in recs) > 0.03  # later ones waited for a slot


def test_unreachable_server_is_one_line_exit_2(tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc = main(["replay", "--url", f"http://127.0.0.1:{port}", "--trace", "azure-conv", "--limit", "2",
               "--out", str(tmp_path / "r.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "cannot reach" in err
    assert not (tmp_path / "r.jsonl").exists()


@pytest.mark.parametrize("argv, message", [
    (["--trace", "TRACE_BAD"], "cannot tell the trace format"),
    (["--trace", "azure-conv", "--window", "0:0"], "empty"),
    (["--trace", "TRACE_EMPTY"], ""),
    (["--trace", "azure-conv", "--burstiness", "0.5"], "--burstiness only applies with --rate"),
    (["--trace", "azure-conv", "--rate", "-1"], "--rate must be > 0"),
    (["--trace", "azure-conv", "--extra-body", "[1]"], "JSON object"),
    (["--trace", "azure-conv", "--prompts", "/nonexistent.jsonl"], "no such file"),
    (["--trace", "azure-conv", "--max-concurrency", "0"], "--max-concurrency"),
])
def test_bad_input_is_one_line_exit_2(sim_server, tmp_path, capsys, argv, message):
    bad = tmp_path / "bad.csv"
    bad.write_text("foo,bar\n1,2\n")
    empty = tmp_path / "empty.csv"
    empty.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n")
    argv = [str(bad) if a == "TRACE_BAD" else str(empty) if a == "TRACE_EMPTY" else a for a in argv]
    rc = main(["replay", "--url", sim_server.url, *argv, "--out", str(tmp_path / "r.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("cascadia replay: error:") and message in err


def test_word_prompts_have_the_requested_word_count_and_differ_per_request():
    src = WordPrompts(seed=3)
    a, b = src.text(0, 50), src.text(1, 50)
    assert src.count(a) == 50 and a != b and a.split()[:3] != b.split()[:3]


@pytest.mark.skipif(default_tokenizer_dir() is None, reason="SmolLM2 cache directory not prepared")
def test_tokenizer_prompts_are_exact():
    tok = load_tokenizer(default_tokenizer_dir())
    src = TokenizerPrompts(tok, "smollm2")
    for i, n in enumerate([1, 7, 64, 333]):
        assert len(tok.encode(src.text(i, n))) == n


def test_gamma_arrivals_have_the_mean_rate_and_burstier_spread():
    trace = load_trace(builtin_trace_path("azure-conv")).select(slice(0, 2001))
    poisson = arrival_schedule(trace, 5.0, 1.0, seed=1)
    bursty = arrival_schedule(trace, 5.0, 0.25, seed=1)
    assert poisson[0] == 0.0 and np.all(np.diff(poisson) >= 0)
    assert 2000 / poisson[-1] == pytest.approx(5.0, rel=0.08) and 2000 / bursty[-1] == pytest.approx(5.0, rel=0.2)
    cv = lambda x: np.diff(x).std() / np.diff(x).mean()  # noqa: E731
    assert cv(poisson) == pytest.approx(1.0, abs=0.1) and cv(bursty) == pytest.approx(2.0, abs=0.4)
    assert np.array_equal(arrival_schedule(trace, None), trace.arrival_s)


def test_logprobs_of_chat_and_completions_chunks_make_the_judge_score():
    from benchmarks.replay.client import _read_event
    from benchmarks.replay.records import ReplayRecord

    rec = ReplayRecord(index=0, request_id="a", scheduled_s=0.0, input_tokens=1, max_tokens=3, status=OK)
    _read_event({"choices": [{"delta": {"content": "hi"}, "logprobs": {"content": [{"logprob": -0.5}]}}]}, rec, 1.0)
    _read_event({"choices": [{"text": " there", "logprobs": {"token_logprobs": [-0.1, -0.3]}}]}, rec, 2.0)
    assert rec.token_times_s == [1.0, 2.0] and rec.logprob_tokens == 3
    assert rec.judge_score() == pytest.approx(100 * np.exp(-0.3))
    rec.answer_score = 42.0  # the server's own judge wins
    assert rec.judge_score() == 42.0


def test_server_judge_scores_reach_the_report(sim_server, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    rc = main(["replay", "--url", sim_server.url, "--trace", "azure-conv", "--limit", "6", "--rate", "20",
               "--length-scale", "0.05", "--tokenizer", "none", "--no-progress", "--out", str(out),
               "--extra-body", '{"cascade": {"judge_answer": true}, "temperature": 0}'])
    assert rc == 0
    recs = read_records(out)
    assert all(r.answer_score is not None and 0 <= r.answer_score <= 100 for r in recs)
    assert all(r.answer_score == pytest.approx(r.scores[0]) for r in recs if r.stage == 0)
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    mean = np.mean([r.answer_score for r in recs])
    assert re.search(rf"judge score mean \(n\)\s+{mean:.1f} \(6\)", capsys.readouterr().out)
