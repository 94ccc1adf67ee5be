"""Prometheus metrics of the router, in a registry this object owns (several apps in one
process, e.g. tests, never share counters). Names are prefixed ``cascadia_``."""

from __future__ import annotations

import math

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector,
                               generate_latest)

from router.cascade import CascadeResult

SCORE_BUCKETS = tuple(float(b) for b in range(10, 101, 10))
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class RouterMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        if registry is None:  # the router process's RSS, CPU and open files (process_*), e.g. under overload
            ProcessCollector(registry=r)
        self.requests = Counter("cascadia_requests", "Finished requests by served model, answering stage and "
                                "status (ok, client_error, unauthorized, overloaded, engine_error, aborted)", ["model", "stage", "status"],
                                registry=r)
        self.escalations = Counter("cascadia_escalations", "Answers rejected by the judge and passed on, by the "
                                   "stage that was rejected", ["stage"], registry=r)
        self.judge_failures = Counter("cascadia_judge_failures", "Judge calls that gave no score (the judge's "
                                      "failure policy accepted or escalated instead)", ["stage"], registry=r)
        self.judge_score = Histogram("cascadia_judge_score", "Judge score (0-100) of each judged answer",
                                     ["stage"], buckets=SCORE_BUCKETS, registry=r)
        self.judge_latency = Histogram("cascadia_judge_latency_seconds", "Time the judge took to score an answer",
                                       ["stage"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.ttft = Histogram("cascadia_ttft_seconds", "Request start to the first token sent to the client "
                              "(includes held stages and judging)", ["model"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.e2e = Histogram("cascadia_e2e_seconds", "Request start to its last token", ["model"],
                             buckets=LATENCY_BUCKETS_S, registry=r)
        self.queue_depth = Gauge("cascadia_stage_queue_depth", "Requests inside a stage (waiting or generating)",
                                 ["stage"], registry=r)
        self.replicas_down = Gauge("cascadia_replicas_down", "Replicas of the stage marked down (failed, healing)",
                                   ["stage"], registry=r)
        self.replica_failures = Gauge("cascadia_replica_failures", "Replica failures seen by the stage's pool since "
                                      "start", ["stage"], registry=r)
        self.replica_heal = Histogram("cascadia_replica_heal_seconds", "Time from a replica failing to serving "
                                      "again (restart included)", ["stage"], buckets=LATENCY_BUCKETS_S + (300.0, 900.0),
                                      registry=r)
        self._heals_seen: dict[str, int] = {}
        self.replica_healthy = Gauge("cascadia_replica_healthy", "1 if the stage's engine answers its health "
                                     "check, else 0", ["stage"], registry=r)

    def record_result(self, model: str, result: CascadeResult) -> None:
        for visit in result.visits:
            if visit.score is not None:
                if math.isfinite(visit.score):
                    self.judge_score.labels(visit.stage_name).observe(visit.score)
                else:
                    self.judge_failures.labels(visit.stage_name).inc()
                self.judge_latency.labels(visit.stage_name).observe(visit.judge_s)
            if not visit.accepted:
                self.escalations.labels(visit.stage_name).inc()
        self.requests.labels(model, result.stage_name, "ok").inc()
        self.ttft.labels(model).observe(result.timings.ttft_s)
        self.e2e.labels(model).observe(result.timings.e2e_s)

    def record_failure(self, model: str, status: str) -> None:
        """A request that got no answer; ``stage`` is ``none``."""
        self.requests.labels(model, "none", status).inc()

    def set_stage_state(self, stage: str, *, in_flight: int, healthy: bool, pool=None) -> None:
        self.queue_depth.labels(stage).set(in_flight)
        self.replica_healthy.labels(stage).set(1.0 if healthy else 0.0)
        if pool is not None and hasattr(pool, "heal_times_s"):  # a ReplicaPool: per-replica failure state
            self.replicas_down.labels(stage).set(len(pool.down))
            self.replica_failures.labels(stage).set(pool.failures)
            new = pool.heal_times_s[self._heals_seen.get(stage, 0):]
            for healed_s in new:
                self.replica_heal.labels(stage).observe(healed_s)
            self._heals_seen[stage] = len(pool.heal_times_s)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
