"""Online re-planning end to end on simulated engines (issue 7, item 4).

The initial plan is the planner's own for the first half of the workload: Azure
conversation requests at RATE_RPS. Halfway, the rate triples (a later slice of the same
trace, at 3 x RATE_RPS). With the controller on, exactly one re-plan happens (no
oscillation), no request fails, and the share of post-shift requests within the SLO
(end-to-end within 2x, and 4x, the plan's predicted p95) is higher than with the
controller off. Both runs send the same requests with the same ids (simulated answers,
and so escalations, are drawn per id); their figures go to RELIABILITY.md.

Scale: answers are a quarter of the trace's lengths and the "GPUs" are 16 L40S, so that the
load that overruns the first plan is one this 2-core machine's router can carry in real
time (time dilation 1: plan seconds are wall seconds).
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import numpy as np
import pytest

from cascadia.catalog import get_model
from cascadia.quality import builtin_profile_path, load_quality
from cascadia.specs.cluster import parse_cluster
from cascadia.traces import builtin_trace_path, load_trace, scale_rate, window
from cascadia.traces.trace import Trace
from planner.bilevel import PlannerOptions, plan
from planner.quality_input import stage_profile
from router.replanner import REPLANNED, ReplanPolicy, controller_for
from router.serve import plan_deployment, serve
from server_thread import record_figure

CASCADE = ["llama-3-8b", "llama-3-70b"]
CLUSTER = "2x8xL40S"
RATE_RPS = 8.0
FIRST_S = SECOND_S = 50.0  # plan seconds before and after the shift (it comes halfway)
ANSWER_SCALE = 0.25
DILATION = 1.0


def _slice(trace: Trace, start_s: float, duration_s: float, rate_rps: float) -> Trace:
    """`duration_s` of the trace from `start_s`, at `rate_rps` (its bursts kept), answers scaled."""
    # the source covers the slice at its own rate (about 5.5 req/s) with room to spare
    part = scale_rate(window(trace, start_s, start_s + duration_s * max(3.0, rate_rps / 3.0)), rate_rps)
    part = window(part, 0.0, duration_s)
    assert part.duration_s > 0.9 * duration_s, "the trace slice is too short"
    out = np.maximum(1, np.rint(part.output_tokens * ANSWER_SCALE)).astype(np.int64)
    return Trace(part.name, part.arrival_s, part.input_tokens, out)


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replan")
    conv = load_trace(builtin_trace_path("azure-conv"))
    first = _slice(conv, 120.0, FIRST_S, RATE_RPS)
    second = _slice(conv, 300.0, SECOND_S, 3 * RATE_RPS)
    prof, src = stage_profile(load_quality(builtin_profile_path("mtbench")), CASCADE)
    cache = str(tmp / "tables")
    p = plan([get_model(m) for m in CASCADE], parse_cluster(CLUSTER), first, prof, 88.0, quality_source=src,
             options=PlannerOptions(cache_dir=cache, processes=1, seed=2, sub_cascades=False,
                                    objective="end-to-end"))
    path = tmp / "plan.json"
    p.save(path)
    arrivals = np.concatenate([first.arrival_s, FIRST_S + second.arrival_s])
    inputs = np.concatenate([first.input_tokens, second.input_tokens])
    outputs = np.concatenate([first.output_tokens, second.output_tokens])
    return path, p, (prof, src, cache), (arrivals, inputs, outputs)


async def _replay(url: str, arrivals, inputs, outputs) -> list[tuple[float, int, float]]:
    """Open loop: each request at its arrival (plan seconds / dilation); (arrival, status, e2e plan s)."""
    out: list[tuple[float, int, float]] = []
    t0 = time.monotonic()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:

        async def one(k: int):
            await asyncio.sleep(max(0.0, t0 + arrivals[k] / DILATION - time.monotonic()))
            body = {"model": "cascadia", "prompt": "w" * (4 * int(inputs[k]) - 1), "max_tokens": int(outputs[k]),
                    "ignore_eos": True}
            start = time.monotonic()
            try:
                # the same id in both runs: simulated answers, and so escalations, are drawn per id
                async with session.post(url + "/v1/completions", json=body,
                                        headers={"x-request-id": f"replan-{k}"}) as r:
                    await r.read()
                    status = r.status
            except aiohttp.ClientError:
                status = -1
            out.append((float(arrivals[k]), status, (time.monotonic() - start) * DILATION))

        await asyncio.gather(*(one(k) for k in range(len(arrivals))))
    return out


def _run(path, quality, load, *, replanning: bool):
    prof, src, cache = quality
    logs: list[str] = []

    async def main():
        dep = await plan_deployment(str(path), "sim", time_dilation=DILATION, warmup_requests=40, log=logs.append)
        controller = None
        if replanning:  # as `serve --replan --replan-window 10 --replan-hold 10 ...` sets it up
            controller = controller_for(
                dep, prof, src, window_s=10.0, cache_dir=cache, time_dilation=DILATION, log=logs.append,
                policy=ReplanPolicy(hold_s=10.0, cooldown_s=60.0, check_every_s=1.0, min_requests=30,
                                    drain_timeout_s=120.0, horizon_s=60.0))
        ready, stop = asyncio.Event(), asyncio.Event()
        server = asyncio.create_task(serve(dep, "127.0.0.1", 0, log=logs.append, ready=ready, stop=stop,
                                           controller=controller))
        await asyncio.wait_for(ready.wait(), 60)
        url = next(line.split(" on ")[1].split()[0] for line in logs if line.startswith("Cascadia serving"))
        records = await asyncio.wait_for(_replay(url, *load), 600)
        stop.set()
        await asyncio.wait_for(server, 120)
        if controller is not None:
            controller.planner.close()
        return records, controller

    return asyncio.run(main()), logs


def _attainment(records, slo_s: float) -> float:
    after = [(status, e2e) for t, status, e2e in records if t >= FIRST_S]
    return sum(1 for status, e2e in after if status == 200 and e2e <= slo_s) / len(after)


def _p95_after_shift(records) -> float:
    return float(np.percentile([e2e for t, _, e2e in records if t >= FIRST_S], 95))


@pytest.mark.timeout(900)
def test_rate_triples_halfway_one_replan_no_failures_better_slo_attainment(workload):
    path, p, quality, load = workload
    (records_on, controller), logs_on = _run(path, quality, load, replanning=True)
    (records_off, _), _ = _run(path, quality, load, replanning=False)
    replan_log = "\n".join(line for line in logs_on if "replan" in line or "rollout" in line)
    print(replan_log)
    assert len(records_on) == len(records_off) == len(load[0])
    failed_on = sum(1 for _, s, _ in records_on if s != 200)
    assert failed_on == 0, replan_log
    events = controller.events
    assert [e.outcome for e in events] == [REPLANNED], replan_log  # exactly one, no oscillation
    assert events[0].t_s > FIRST_S and "rate" in events[0].signals  # after the shift, for the rate
    # the SLO: end-to-end within k x the plan's predicted p95 (k = 2 the main one)
    scales = (2.0, 4.0)
    on = [_attainment(records_on, k * p.prediction.e2e_p95_s) for k in scales]
    off = [_attainment(records_off, k * p.prediction.e2e_p95_s) for k in scales]
    p95_on, p95_off = _p95_after_shift(records_on), _p95_after_shift(records_off)
    print(f"attainment after the shift at {scales} x the plan's p95 ({p.prediction.e2e_p95_s:.2f} s): "
          f"{[f'{a:.1%}' for a in on]} with re-planning, {[f'{a:.1%}' for a in off]} without; "
          f"e2e p95 after the shift {p95_on:.1f} s vs {p95_off:.1f} s")
    record_figure("online re-planning (sim)", requests=len(records_on), replans=len(events),
                  replan_at_s=round(events[0].t_s, 1), planner_s=round(events[0].planner_s, 1),
                  rollout_s=round(events[0].rollout_s, 1), actions=events[0].actions, failed=failed_on,
                  failed_off=sum(1 for _, s, _ in records_off if s != 200),
                  plan_p95_s=round(p.prediction.e2e_p95_s, 2), slo_scales=scales,
                  attainment_after_shift_on=[round(a, 3) for a in on],
                  attainment_after_shift_off=[round(a, 3) for a in off],
                  e2e_p95_after_shift_on_s=round(p95_on, 1), e2e_p95_after_shift_off_s=round(p95_off, 1))
    assert all(a > b for a, b in zip(on, off)), (on, off)
