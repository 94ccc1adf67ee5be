"""Online re-planning: watch the live workload, re-plan when it has shifted, roll out the
new plan -- all off the request path.

The loop (`ReplanController.run`), every ``check_every_s`` plan seconds:
1. sample the monitor's window (router/monitor.py) and export it as metrics;
2. compare it with the running plan's baseline; a signal beyond its threshold starts a
   *shift*; the shift must last ``hold_s`` without a break (hysteresis: a burst shorter
   than that changes nothing) and the window must be full;
3. then the planner (`planner.bilevel.replan`) runs in a worker process (`ProcessPlanner`)
   on the window's requests, repeated to cover ``horizon_s``, as its workload -- the event
   loop keeps serving while it works; `replan` itself only moves when the new plan is
   predicted faster by more than its ``margin`` or the running plan misses its
   ``slo_p95_s`` (a second hysteresis, on the outcome);
4. a new plan is rolled out with `router.rollout.apply_diff` (new replicas healthy before
   they take traffic, old ones drained), and its workload becomes the baseline; a kept
   plan makes the window the baseline instead, so the same shift is not evaluated again
   and again. Evaluations are at least ``cooldown_s`` apart.

Re-planning keeps the running cascade's models (`PlannerOptions.sub_cascades` off): a
rolling update cannot change which models serve. Thresholds of the new plan are in the
planner's judge units; when the live judge is another one (`serve` re-calibrated the
plan's thresholds at start), each new threshold is re-derived from the window's live
scores to escalate the share the new plan plans for.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from router.monitor import Baseline, DriftThresholds, WorkloadMonitor, describe_drift, drift_values, shifts

REPLANNED, KEPT, FAILED = "replanned", "kept", "failed"


@dataclass(frozen=True)
class ReplanPolicy:
    """When to re-plan. Times are plan seconds (wall seconds times the time dilation)."""

    # A shift must last this long before the planner runs. A burst stays in the monitor's
    # window for a window's length after it ends, so a hold shorter than the window filters
    # little: with hold = window, a burst at 3x the rate has to last over half a window to
    # count (rate threshold 0.5).
    hold_s: float = 60.0
    cooldown_s: float = 300.0  # at least this long between two evaluations
    check_every_s: float = 5.0
    min_requests: int = 50  # arrivals the window needs before anything is decided
    drain_timeout_s: float = 60.0  # per retired replica, during the rollout
    # the window's requests are repeated to cover this long for the planner (see
    # WorkloadMonitor.recent_trace: a short window hides how far behind a plan falls)
    horizon_s: float = 120.0
    thresholds: DriftThresholds = field(default_factory=DriftThresholds)

    def __post_init__(self) -> None:
        for name in ("hold_s", "cooldown_s", "check_every_s", "drain_timeout_s", "horizon_s"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)) or (name == "check_every_s" and value == 0):
                raise ValueError(f"replan {name} must be a non-negative number (check_every_s > 0), got {value}")
        if self.min_requests < 1:
            raise ValueError(f"replan min_requests must be >= 1, got {self.min_requests}")


@dataclass(frozen=True)
class ReplanEvent:
    """One evaluation, for the log, the metrics and tests."""

    t_s: float  # plan seconds since the monitor started
    outcome: str  # replanned | kept | failed
    signals: dict[str, float]
    reason: str
    planner_s: float  # wall seconds the planner took
    rollout_s: float = 0.0  # wall seconds the rollout took
    actions: int = 0


class _Metrics:
    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.rate = Gauge("cascadia_workload_arrival_rate_rps", "Arrival rate over the monitor's window "
                          "(plan seconds)", registry=r)
        self.input_tokens = Gauge("cascadia_workload_input_tokens_mean", "Mean prompt tokens over the window",
                                  registry=r)
        self.output_tokens = Gauge("cascadia_workload_output_tokens_mean", "Mean answer tokens over the window",
                                   registry=r)
        self.stage_share = Gauge("cascadia_workload_stage_share", "Share of the window's finished requests that "
                                 "reached the stage", ["stage"], registry=r)
        self.escalation = Gauge("cascadia_workload_escalation_rate", "Share of the stage's judged answers that "
                                "were escalated, over the window", ["stage"], registry=r)
        self.score = Gauge("cascadia_workload_judge_score_mean", "Mean judge score of the stage's answers over "
                           "the window", ["stage"], registry=r)
        self.drift = Gauge("cascadia_workload_drift", "Drift of each signal from the running plan's baseline "
                           "(relative for rate and lengths, absolute for shares and scores)", ["signal"], registry=r)
        self.shifted = Gauge("cascadia_workload_shift_held_seconds", "How long the current shift has lasted "
                             "(plan seconds; 0: no shift)", registry=r)
        self.evaluations = Counter("cascadia_replan_evaluations", "Planner runs by outcome (replanned, kept, "
                                   "failed)", ["outcome"], registry=r)
        self.planner_s = Histogram("cascadia_replan_planner_seconds", "Wall time of one planner run",
                                   buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600), registry=r)
        self.rollout_s = Histogram("cascadia_replan_rollout_seconds", "Wall time of rolling out a new plan",
                                   buckets=(0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1800), registry=r)


class ReplanController:
    """See the module docstring. ``planner(plan, trace)`` returns a
    `planner.bilevel.ReplanDecision` (e.g. a `ProcessPlanner`); ``start_replica(action)``
    starts a replica of a start/resize action's layout (the deployment's own kind);
    ``recalibrate``: the live judge is not the plan's, so thresholds are re-derived."""

    def __init__(self, cascade, plan, monitor: WorkloadMonitor,
                 planner: Callable[[Any, Any], Awaitable[Any]], start_replica: Callable[[Any], Awaitable[Any]], *,
                 policy: ReplanPolicy = ReplanPolicy(), registry: CollectorRegistry | None = None,
                 recalibrate: bool = False, log: Callable[[str], None] = print):
        self.cascade, self.plan, self.monitor = cascade, plan, monitor
        self.planner, self.start_replica, self.policy = planner, start_replica, policy
        self.recalibrate, self.log = recalibrate, log
        self.metrics = _Metrics(registry if registry is not None else CollectorRegistry())
        self._metrics_attached = registry is not None
        self.baseline = Baseline.of_plan(plan)
        self.events: list[ReplanEvent] = []
        self._shift_since: float | None = None
        self._last_evaluation = -math.inf

    def attach_metrics(self, registry: CollectorRegistry) -> None:
        """Export on the server's registry (its /metrics) instead of a private one."""
        if not self._metrics_attached:
            self.metrics = _Metrics(registry)
            self._metrics_attached = True

    def _export(self, sample, values: dict[str, float]) -> None:
        m = self.metrics
        m.rate.set(sample.rate_rps)
        m.input_tokens.set(sample.input_tokens_mean)
        m.output_tokens.set(sample.output_tokens_mean)
        names = [s.name for s in self.cascade.stages]
        for name, share in zip(names, sample.stage_shares):
            m.stage_share.labels(name).set(share)
        for name, rate, score in zip(names, sample.escalation_rates, sample.score_means):
            m.escalation.labels(name).set(rate)
            m.score.labels(name).set(score)
        for signal, value in values.items():
            m.drift.labels(signal).set(value if math.isfinite(value) else -1.0)

    def observe(self):
        """Sample the window and export it (and its drift) as metrics: (sample, drift values,
        whether the window is full enough to decide on)."""
        sample = self.monitor.sample()
        full = sample.window_s >= self.monitor.window_s and sample.arrivals >= self.policy.min_requests
        if full and self.baseline.score_means is None and sample.finished >= self.policy.min_requests:
            # the first full window under this plan: the judge scores it is expected to see
            self.baseline = dataclasses.replace(self.baseline, score_means=sample.score_means)
        values = drift_values(sample, self.baseline)
        self._export(sample, values)
        return sample, values, full

    async def step(self) -> ReplanEvent | None:
        """One check (see the module docstring); the evaluation's event when one ran."""
        sample, values, full = self.observe()
        shifted = shifts(values, self.policy.thresholds) if full else {}
        if not shifted:
            if self._shift_since is not None:
                self.log("replan: the workload is back within its thresholds; shift dropped")
            self._shift_since = None
            self.metrics.shifted.set(0)
            return None
        if self._shift_since is None:
            self._shift_since = sample.t_s
            self.log(f"replan: workload shift at t={sample.t_s:.1f} s: {describe_drift(shifted)}; holding "
                     f"{self.policy.hold_s:g} s before planning")
        held = sample.t_s - self._shift_since
        self.metrics.shifted.set(held)
        if held < self.policy.hold_s or sample.t_s - self._last_evaluation < self.policy.cooldown_s:
            return None
        self._last_evaluation = sample.t_s
        return await self._plan_and_roll_out(sample, shifted)

    async def _plan_and_roll_out(self, sample, shifted: dict[str, float]) -> ReplanEvent:
        t0 = time.monotonic()
        try:
            trace = self.monitor.recent_trace(f"live window at t={sample.t_s:.0f} s", self.policy.horizon_s)
            self.log(f"replan: planning for the last {self.monitor.window_s:g} s ({sample.arrivals} requests, "
                     f"{sample.rate_rps:.2f} req/s, repeated over {trace.duration_s:.0f} s) off the request path")
            decision = await self.planner(self.plan, trace)
        except Exception as e:  # the planner failing must not take serving down
            event = ReplanEvent(sample.t_s, FAILED, shifted, f"planner failed: {e}", time.monotonic() - t0)
            return self._finish(event, Baseline.of_sample(sample))
        planner_s = time.monotonic() - t0
        self.metrics.planner_s.observe(planner_s)
        if not decision.replan:
            event = ReplanEvent(sample.t_s, KEPT, shifted, decision.reason, planner_s)
            return self._finish(event, Baseline.of_sample(sample))
        from router.rollout import apply_diff

        d = self._recalibrated(decision.diff, decision.plan) if self.recalibrate else decision.diff
        self.log(f"replan: {decision.reason}; rolling out {len(d.actions)} action(s):\n  "
                 + d.describe().replace("\n", "\n  "))
        t1 = time.monotonic()
        try:
            report = await apply_diff(self.cascade, d, self.start_replica,
                                      drain_timeout_s=self.policy.drain_timeout_s, log=self.log)
        except Exception as e:
            event = ReplanEvent(sample.t_s, FAILED, shifted, f"rollout failed: {e}", planner_s,
                                time.monotonic() - t1, len(d.actions))
            return self._finish(event, Baseline.of_sample(sample))
        self.metrics.rollout_s.observe(report.seconds)
        self.plan = decision.plan
        event = ReplanEvent(sample.t_s, REPLANNED, shifted, decision.reason, planner_s, report.seconds,
                            len(d.actions))
        return self._finish(event, Baseline.of_plan(decision.plan))

    def _finish(self, event: ReplanEvent, baseline: Baseline) -> ReplanEvent:
        self.baseline = baseline
        self._shift_since = None
        self.metrics.shifted.set(0)
        self.metrics.evaluations.labels(event.outcome).inc()
        self.events.append(event)
        self.log(f"replan: {event.outcome} at t={event.t_s:.1f} s ({describe_drift(event.signals)}): {event.reason} "
                 f"[planner {event.planner_s:.1f} s" + (f", rollout {event.rollout_s:.1f} s]" if event.actions else "]"))
        return event

    def _recalibrated(self, d, new_plan):
        """The diff with each new threshold re-derived from the window's live scores so that
        the stage escalates the share the new plan plans for (see the module docstring)."""
        from cascadia.plan_diff import SET_THRESHOLD, PlanDiff
        from router.judges import recalibrate_threshold

        shares = new_plan.stage_shares
        out = []
        for a in d.actions:
            if a.kind == SET_THRESHOLD:
                scores = self.monitor.scores(a.stage)
                if not scores:  # no live scores at this stage: nothing to re-derive from; keep it
                    continue
                share = shares[a.stage + 1] / shares[a.stage] if shares[a.stage] > 0 else 1.0
                a = dataclasses.replace(a, old_threshold=self.cascade.stages[a.stage].threshold,
                                        new_threshold=recalibrate_threshold(scores, min(max(share, 0.0), 1.0)))
            out.append(a)
        return PlanDiff(tuple(out), d.kept)

    async def run(self, stop: asyncio.Event) -> None:
        """Check every ``check_every_s`` plan seconds until ``stop`` is set (or the task is
        cancelled, which cancels a rollout in progress: replicas it started are the
        deployment's to stop). While a planner run or rollout is under way the window is
        still sampled, so the workload metrics stay current."""
        wall_period_s = self.policy.check_every_s / self.monitor.time_scale
        check: asyncio.Task | None = None
        try:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), wall_period_s)
                except asyncio.TimeoutError:
                    pass
                if stop.is_set():
                    break
                if check is not None and not check.done():
                    try:
                        self.observe()
                    except Exception as e:  # metrics only: never stop serving for them
                        self.log(f"replan: sampling failed: {type(e).__name__}: {e}")
                    continue
                check = asyncio.create_task(self._checked())
        finally:
            if check is not None and not check.done():
                check.cancel()
                await asyncio.gather(check, return_exceptions=True)

    async def _checked(self) -> None:
        try:
            await self.step()
        except Exception as e:  # never let a bug in the controller stop serving
            self.log(f"replan: check failed: {type(e).__name__}: {e}")


def _load_planner() -> None:
    import planner.bilevel  # noqa: F401


def _replan_job(plan, trace, profile, source, options, margin, slo_p95_s):
    """Runs in the worker process."""
    from planner.bilevel import replan

    return replan(plan, trace, profile, quality_source=source, margin=margin, slo_p95_s=slo_p95_s,
                  options=options)


class ProcessPlanner:
    """`planner.bilevel.replan` in one worker process (spawned: no state shared with the
    router), so the planner's CPU work and its GIL never stall the event loop that serves.
    ``profile``/``source``: the quality profile the plan was made from
    (`planner.quality_input.stage_profile`); ``cache_dir``: latency tables reused across
    runs; ``processes``: the planner's own simulation workers (1 keeps it to one core)."""

    def __init__(self, profile, source, *, margin: float = 0.15, slo_p95_s: float | None = None,
                 cache_dir: str | None = None, processes: int = 1, solver: str | None = None):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.profile, self.source, self.margin, self.slo_p95_s = profile, source, margin, slo_p95_s
        self.cache_dir, self.processes, self.solver = cache_dir, processes, solver
        self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        # start the worker and load the planner now: a shift should not wait for imports
        self._pool.submit(_load_planner)

    def options_for(self, plan):
        """The running plan's own settings, within its models (no sub-cascades: a rolling
        update cannot change which models serve)."""
        from planner.bilevel import PlannerOptions

        solver = self.solver or (plan.prediction.solver if plan.prediction.solver in ("cbc", "highs") else "cbc")
        return PlannerOptions(objective=plan.prediction.objective, solver=solver, engine=plan.engine,
                              seed=plan.prediction.simulation_seed, sub_cascades=False, cache_dir=self.cache_dir,
                              processes=self.processes)

    async def __call__(self, plan, trace):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, _replan_job, plan, trace, self.profile, self.source,
                                          self.options_for(plan), self.margin, self.slo_p95_s)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def controller_for(dep, profile, source, *, policy: ReplanPolicy, window_s: float, margin: float = 0.15,
                   slo_p95_s: float | None = None, cache_dir: str | None = None, time_dilation: float = 1.0,
                   log: Callable[[str], None] = print) -> ReplanController:
    """The controller for a `router.serve.Deployment` of a plan: a monitor on the plan's
    clock, the planner in a worker process, replicas started the deployment's own way."""
    if dep.plan is None or dep.start_replica is None:
        raise ValueError("online re-planning needs a deployment of a plan (serve --plan)")
    monitor = WorkloadMonitor(len(dep.cascade.stages), window_s=window_s, time_scale=time_dilation)
    planner = ProcessPlanner(profile, source, margin=margin, slo_p95_s=slo_p95_s, cache_dir=cache_dir)
    return ReplanController(dep.cascade, dep.plan, monitor, planner, dep.start_replica, policy=policy,
                            recalibrate=dep.thresholds_recalibrated, log=log)
