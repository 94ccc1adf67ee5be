"""Rolling updates: apply a plan diff (cascadia/plan_diff.py, e.g. from the planner's
`replan`) to a running cascade with no request lost.

Each action in the diff's order (capacity is added before it is taken away):
- ``start``: start the replica (`start_replica`), wait until it answers its health check,
  then put it into its stage's pool -- traffic only moves to replicas that are ready;
- ``resize``: start the new-shape replica as above, then retire an old-shape one;
- ``stop``: retire a replica of that shape (`ReplicaPool.retire`): it gets no new requests,
  the ones it has not started on move to the other replicas, the rest finish (up to
  `drain_timeout_s`), then it is shut down;
- ``set_threshold``: the stage's new threshold applies to requests that start afterwards.

The cascade's stages (models, in order) must be the same in both plans: a plan that changes
which models serve needs a new deployment, and `apply_diff` says so before touching
anything. Stages are matched by index and checked by model name.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from cascadia.plan_diff import RESIZE, SET_THRESHOLD, START, STOP, PlanAction, PlanDiff

StartReplica = Callable[[PlanAction], Awaitable[Any]]


class RolloutError(RuntimeError):
    """The diff cannot be applied to this cascade; the message says why."""


@dataclass
class RolloutReport:
    steps: list[tuple[str, float]] = field(default_factory=list)  # (action, seconds)
    started: int = 0
    retired: int = 0
    cut_at_drain_deadline: int = 0
    thresholds: int = 0
    seconds: float = 0.0


def check_applicable(cascade, diff: PlanDiff) -> None:
    names = [s.name for s in cascade.stages]
    for a in diff.actions:
        if not 0 <= a.stage < len(names) or names[a.stage] != a.model:
            raise RolloutError(f"the new plan changes the cascade's models (stage {a.stage} is "
                               f"{names[a.stage] if a.stage < len(names) else 'absent'}, the diff says {a.model}): "
                               f"serve the new plan as a new deployment instead of a rolling update")
    for a in diff.actions:
        if a.kind in (STOP, RESIZE) and not hasattr(cascade.stages[a.stage].pool, "retire"):
            raise RolloutError(f"stage {a.stage} ({a.model}) is not a replica pool: its replicas cannot change")


async def _ready(engine, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not await engine.health():
        if time.monotonic() > deadline:
            raise RolloutError(f"a new replica of {engine.name} was not healthy within {timeout_s:g} s")
        await asyncio.sleep(0.05)


async def apply_diff(cascade, diff: PlanDiff, start_replica: StartReplica, *, drain_timeout_s: float = 60.0,
                     ready_timeout_s: float = 600.0, log=print) -> RolloutReport:
    """Apply `diff` to `cascade` (see the module docstring); `start_replica(action)` starts
    the engine for a start/resize action's new layout."""
    check_applicable(cascade, diff)
    report = RolloutReport()
    t_all = time.monotonic()
    for a in diff.actions:
        t0 = time.monotonic()
        pool = cascade.stages[a.stage].pool
        if a.kind in (START, RESIZE):
            engine = await start_replica(a)
            await _ready(engine, ready_timeout_s)
            pool.add_replica(engine, a.new)
            report.started += 1
        if a.kind in (STOP, RESIZE):
            i = pool.find_replica(a.old)
            if i is None:
                raise RolloutError(f"stage {a.stage} ({a.model}) has no running replica {a.old.describe()} to stop")
            _, left = await pool.retire(i, drain_timeout_s)
            report.retired += 1
            report.cut_at_drain_deadline += left
        if a.kind == SET_THRESHOLD:
            cascade.set_threshold(a.stage, a.new_threshold)
            report.thresholds += 1
        report.steps.append((a.describe(), time.monotonic() - t0))
        log(f"rollout: {a.describe()} ({time.monotonic() - t0:.1f} s)")
    report.seconds = time.monotonic() - t_all
    return report
