"""The workload monitor and the re-planning controller on a scripted clock (issue 7, item 4):
window statistics, drift, hysteresis, cool-down, what a kept / failed / accepted re-plan
does. The end-to-end run on simulated engines is tests/test_replan_live.py."""

from __future__ import annotations

import asyncio
import math
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from cascadia.plan_diff import SET_THRESHOLD, PlanAction, PlanDiff
from router.cascade import Cascade, CascadeResult, Stage, StageVisit, Timings, Usage
from router.judges import LogprobJudge
from router.monitor import Baseline, DriftThresholds, WorkloadMonitor, drift_values, shifts
from router.replanner import FAILED, KEPT, REPLANNED, ReplanController, ReplanPolicy
from test_serve_plan import plan_file  # noqa: F401  (a planner-made 2-stage plan)


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def result(stage: int, scores: tuple[float, ...], prompt: int = 100, answer: int = 50, e2e_s: float = 1.0):
    visits = tuple(StageVisit(i, f"s{i}", scores[i] if i < len(scores) else None, i == stage, 0.5, 0.0,
                              Usage(prompt, answer)) for i in range(stage + 1))
    return CascadeResult("x", stage, f"s{stage}", scores, Usage(prompt, answer), Timings(0.1, e2e_s, 0.0), "length",
                         visits)


def feed(monitor: WorkloadMonitor, clock: Clock, *, rate_rps: float, seconds: float, start_id: int = 0,
         stage_of=lambda k: 0, score_of=lambda k: 80.0, answer: int = 50, finish: bool = True) -> int:
    """Requests at an even rate for `seconds` (clock advances); each finishes at once."""
    n = int(round(rate_rps * seconds))
    for k in range(start_id, start_id + n):
        clock.t += 1.0 / rate_rps
        monitor.arrived(f"r{k}", 100, 2 * answer)
        if finish:
            st = stage_of(k)
            scores = tuple(score_of(k) for _ in range(st + 1)) if st == 0 else (score_of(k),)
            monitor.finished(f"r{k}", result(st, scores[:1], answer=answer, e2e_s=0.0))
    return start_id + n


def test_window_statistics_and_in_flight_answers_are_estimated():
    clock = Clock()
    m = WorkloadMonitor(2, window_s=10.0, clock=clock)
    k = feed(m, clock, rate_rps=4.0, seconds=10.0, stage_of=lambda k: 1 if k % 4 == 0 else 0,
             score_of=lambda k: 40.0 if k % 4 == 0 else 90.0)
    s = m.sample()
    assert s.arrivals == 40 and s.finished == 40 and s.rate_rps == pytest.approx(4.0)
    assert s.stage_shares == pytest.approx((1.0, 0.25))
    assert s.escalation_rates[0] == pytest.approx(0.25)
    assert s.score_means[0] == pytest.approx(0.25 * 40 + 0.75 * 90)
    assert s.output_tokens_mean == 50 and s.input_tokens_mean == 100
    # 10 more requests that never finish (max_tokens 100, finished ones answer half of it)
    feed(m, clock, rate_rps=4.0, seconds=2.5, start_id=k, finish=False)
    s = m.sample()
    assert s.arrivals == 40 and s.finished == 30  # the oldest 10 left the window
    assert s.output_tokens_mean == pytest.approx(50.0)  # in flight: 0.5 x max_tokens, not left out
    trace = m.recent_trace()
    assert len(trace) == 40 and trace.arrival_s[0] == 0.0 and trace.output_tokens.tolist()[-1] == 50


def test_time_scale_puts_the_window_on_the_plan_clock():
    clock = Clock()
    m = WorkloadMonitor(1, window_s=20.0, time_scale=10.0, clock=clock)  # 1 wall s = 10 plan s
    for k in range(30):
        clock.t += 0.1  # one request per plan second
        m.arrived(f"r{k}", 10, 10)
    clock.t += 0.05  # sample between two arrivals
    s = m.sample()
    assert s.window_s == 20.0 and s.arrivals == 20 and s.rate_rps == pytest.approx(1.0)


def test_repeating_the_window_keeps_its_rate():
    clock = Clock()
    m = WorkloadMonitor(1, window_s=10.0, clock=clock)
    feed(m, clock, rate_rps=3.0, seconds=10.0)
    one, six = m.recent_trace(), m.recent_trace(horizon_s=60.0)
    assert len(six) == 6 * len(one)
    assert six.duration_s == pytest.approx(50.0 + one.duration_s)
    assert six.mean_rate_rps == pytest.approx(one.mean_rate_rps, rel=0.1)
    assert any("repeated 6 times" in n for n in six.notes)


def test_drift_is_symmetric_and_only_beyond_limits_counts():
    base = Baseline(4.0, 1000.0, 200.0, (1.0, 0.3), (70.0,))
    sample = SimpleNamespace(rate_rps=8.0, arrivals=10, finished=10, input_tokens_mean=1000.0,
                             output_tokens_mean=100.0, stage_shares=(1.0, 0.35), score_means=(55.0,))
    v = drift_values(sample, base)
    assert v["rate"] == pytest.approx(1.0) and v["output_length"] == pytest.approx(1.0)  # doubled / halved
    assert v["input_length"] == 0.0 and v["stage_share_1"] == pytest.approx(0.05)
    assert v["judge_score_0"] == pytest.approx(15.0)
    assert set(shifts(v, DriftThresholds())) == {"rate", "output_length", "judge_score_0"}
    assert set(shifts(v, DriftThresholds(rate=1.5, output_length=1.5, judge_score=20))) == set()
    with pytest.raises(ValueError, match="rate"):
        DriftThresholds(rate=0)


class FakePlanner:
    def __init__(self, decisions):
        self.decisions, self.calls = list(decisions), []

    async def __call__(self, plan, trace):
        self.calls.append((plan, trace))
        d = self.decisions.pop(0)
        if isinstance(d, Exception):
            raise d
        return d


def plan_like(rate: float, shares=(1.0, 0.3)):
    return SimpleNamespace(workload=SimpleNamespace(mean_rate_rps=rate, input_tokens_mean=100.0,
                                                    output_tokens_mean=50.0), stage_shares=shares)


def decision(replan: bool, plan=None, actions=()):
    return SimpleNamespace(replan=replan, plan=plan, diff=PlanDiff(tuple(actions), ()), reason="because")


def controller(planner, *, clock, recalibrate=False, **policy):
    cascade = Cascade([Stage("s0", object(), 60.0), Stage("s1", object(), None)], LogprobJudge())
    monitor = WorkloadMonitor(2, window_s=10.0, clock=clock)
    registry = CollectorRegistry()
    opts = dict(hold_s=10.0, cooldown_s=30.0, check_every_s=1.0, min_requests=10)
    opts.update(policy)
    c = ReplanController(cascade, plan_like(4.0), monitor, planner, None, policy=ReplanPolicy(**opts),
                         registry=registry, recalibrate=recalibrate, log=lambda _: None)
    return c, monitor, registry


def run_for(c, monitor, clock, *, rate_rps: float, seconds: float, start_id: int, **kw) -> int:
    """Traffic in 1-s steps with a controller check after each."""
    for _ in range(int(seconds)):
        start_id = feed(monitor, clock, rate_rps=rate_rps, seconds=1.0, start_id=start_id, **kw)
        asyncio.run(c.step())
    return start_id


def test_steady_traffic_and_short_bursts_never_reach_the_planner():
    clock = Clock()
    planner = FakePlanner([])
    c, m, registry = controller(planner, clock=clock)
    k = run_for(c, m, clock, rate_rps=4.0, seconds=20, start_id=0, stage_of=lambda k: int(k % 10 < 3))
    k = run_for(c, m, clock, rate_rps=12.0, seconds=3, start_id=k, stage_of=lambda k: int(k % 10 < 3))  # a burst
    run_for(c, m, clock, rate_rps=4.0, seconds=15, start_id=k, stage_of=lambda k: int(k % 10 < 3))
    assert planner.calls == [] and c.events == []
    assert registry.get_sample_value("cascadia_workload_arrival_rate_rps") == pytest.approx(4.0)
    assert registry.get_sample_value("cascadia_workload_stage_share", {"stage": "s1"}) == pytest.approx(0.3)


def test_a_held_shift_is_evaluated_once_and_a_kept_plan_moves_the_baseline():
    clock = Clock()
    planner = FakePlanner([decision(False)])
    c, m, registry = controller(planner, clock=clock)
    k = run_for(c, m, clock, rate_rps=4.0, seconds=12, start_id=0, stage_of=lambda k: int(k % 10 < 3))
    run_for(c, m, clock, rate_rps=12.0, seconds=40, start_id=k, stage_of=lambda k: int(k % 10 < 3))
    assert [e.outcome for e in c.events] == [KEPT]
    held_from = c.events[0].t_s
    assert "rate" in c.events[0].signals
    _, trace = planner.calls[0]
    assert trace.mean_rate_rps == pytest.approx(12.0, rel=0.1)  # the planner saw the shifted load
    assert c.baseline.rate_rps == pytest.approx(12.0, rel=0.1)  # the shift is the new normal
    assert registry.get_sample_value("cascadia_replan_evaluations_total", {"outcome": "kept"}) == 1
    assert held_from >= 12 + 10  # not before the hold time


def test_a_failing_planner_is_recorded_and_cooldown_spaces_evaluations():
    clock = Clock()
    planner = FakePlanner([RuntimeError("solver crashed"), decision(False)])
    c, m, registry = controller(planner, clock=clock, cooldown_s=30.0)
    third = dict(stage_of=lambda k: int(k % 10 < 3))
    k = run_for(c, m, clock, rate_rps=4.0, seconds=12, start_id=0, **third)
    k = run_for(c, m, clock, rate_rps=12.0, seconds=20, start_id=k, **third)
    assert [e.outcome for e in c.events] == [FAILED] and "solver crashed" in c.events[0].reason
    first_at = c.events[0].t_s
    k = run_for(c, m, clock, rate_rps=40.0, seconds=15, start_id=k, **third)  # a new shift, inside the cool-down
    assert len(c.events) == 1
    run_for(c, m, clock, rate_rps=40.0, seconds=20, start_id=k, **third)  # cool-down over
    assert [e.outcome for e in c.events] == [FAILED, KEPT]
    assert c.events[1].t_s - first_at >= 30.0
    assert registry.get_sample_value("cascadia_replan_evaluations_total", {"outcome": "failed"}) == 1


def test_an_accepted_plan_is_rolled_out_with_thresholds_from_live_scores():
    clock = Clock()
    new_plan = plan_like(12.0, shares=(1.0, 0.5))
    act = PlanAction(SET_THRESHOLD, 0, "s0", old_threshold=60.0, new_threshold=70.0)
    planner = FakePlanner([decision(True, new_plan, [act])])
    c, m, registry = controller(planner, clock=clock, recalibrate=True)
    k = run_for(c, m, clock, rate_rps=4.0, seconds=12, start_id=0, stage_of=lambda k: int(k % 10 < 3),
                score_of=lambda k: float((37 * k) % 100))
    run_for(c, m, clock, rate_rps=12.0, seconds=30, start_id=k, stage_of=lambda k: int(k % 10 < 3),
            score_of=lambda k: float((37 * k) % 100))
    assert [e.outcome for e in c.events] == [REPLANNED] and c.plan is new_plan
    # the planner's 70 is in its judge's units; live scores are spread evenly over 0..99, so
    # escalating the new plan's half of them takes a threshold near 50
    assert 45 <= c.cascade.stages[0].threshold <= 55
    assert c.baseline.rate_rps == 12.0  # the new plan's own workload
    assert registry.get_sample_value("cascadia_replan_evaluations_total", {"outcome": "replanned"}) == 1


def test_policy_rejects_nonsense():
    with pytest.raises(ValueError, match="hold_s"):
        ReplanPolicy(hold_s=-1)
    with pytest.raises(ValueError, match="check_every_s"):
        ReplanPolicy(check_every_s=0)
    with pytest.raises(ValueError, match="min_requests"):
        ReplanPolicy(min_requests=0)
    assert math.isfinite(ReplanPolicy().horizon_s)


@pytest.mark.parametrize("argv, needle", [
    (["--replan"], "--replan needs --plan"),
    (["--replan-quality", "mtbench"], "are for --replan"),
    (["PLAN", "--replan"], "needs the plan's quality profile"),
    (["PLAN", "--replan", "--replan-quality", "no-such-profile.csv"], "--replan-quality:"),
    (["PLAN", "--replan", "--replan-quality", "mtbench", "--replan-window", "0"], "--replan-window must be > 0"),
    (["PLAN", "--replan", "--replan-quality", "mtbench", "--replan-hold", "-5"], "--replan-hold must be >= 0"),
    (["PLAN", "--replan", "--replan-quality", "mtbench", "--replan-margin", "1.5"], "--replan-margin must be in"),
    (["PLAN", "--replan", "--replan-synthetic-quality", "70"], "gives 1 means for 2 stages"),
])
def test_replan_flag_errors_are_one_line_and_exit_2(argv, needle, plan_file):  # noqa: F811
    import subprocess
    import sys

    path, _ = plan_file
    argv = ["--plan", str(path)] + argv[1:] if argv[0] == "PLAN" else argv
    proc = subprocess.run([sys.executable, "-m", "cascadia", "serve", *argv], capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr, proc.stderr


def test_serve_with_replan_exports_the_workload_and_stops_cleanly(plan_file):  # noqa: F811
    """`cascadia serve --replan` end to end: the controller runs beside the server, its
    metrics are on /metrics, and SIGTERM leaves no process behind (the planner's worker
    included)."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    import aiohttp

    from server_thread import served_port
    from test_shutdown import _children

    path, _ = plan_file
    proc = subprocess.Popen([sys.executable, "-m", "cascadia", "serve", "--plan", str(path), "--engine", "sim",
                             "--port", "0", "--time-dilation", "20", "--replan", "--replan-quality", "mtbench",
                             "--replan-window", "20", "--replan-hold", "20"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        port = served_port(proc, lines)
        assert port, "".join(lines)
        assert any("online re-planning on: window 20 s, hold 20 s" in line for line in lines), "".join(lines)

        async def client():
            url = f"http://127.0.0.1:{port}"
            async with aiohttp.ClientSession() as session:
                for k in range(30):  # 30 requests over ~1.5 wall s = 30 plan s
                    body = {"model": "cascadia", "prompt": "w" * 400, "max_tokens": 16}
                    async with session.post(url + "/v1/completions", json=body) as r:
                        assert r.status == 200
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.5)  # a check (every 5 plan s = 0.25 wall s) runs
                async with session.get(url + "/metrics") as r:
                    return await r.text()

        text = asyncio.run(client())
        rate = float(re.search(r"^cascadia_workload_arrival_rate_rps (\S+)$", text, flags=re.M).group(1))
        assert rate > 0, text
        assert re.search(r'^cascadia_workload_stage_share\{stage="llama-3-8b"\} 1\.0$', text, flags=re.M)
        assert "cascadia_replan_planner_seconds" in text
        children = _children(proc.pid)
        assert children, "the planner's worker process is not running"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        for _ in range(50):  # the worker exits once its parent's pipe closes
            if not any(os.path.exists(f"/proc/{pid}") for pid in children):
                break
            time.sleep(0.1)
        assert not any(os.path.exists(f"/proc/{pid}") for pid in children), children
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
