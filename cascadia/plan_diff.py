"""The ordered actions that turn one plan into another while the old one keeps serving.

Minimality: a replica whose (GPU type, tp, pp, nodes) is the same in both plans at the
same stage with the same model is kept untouched. Of the rest, a stage with k old and m
new replicas needs max(k, m) actions: min(k, m) ``resize`` (one replica restarted with a
new layout) and the surplus as ``start`` or ``stop``. A threshold changes with one
``set_threshold``. A stage whose model changes stops all its old replicas and starts new.

Order (each step only uses GPUs that are free at that point, counted per GPU type):
starts and growing resizes that fit in GPUs the old plan leaves idle come first, so
capacity is added before anything is taken away; then shrinking resizes; then the new
thresholds; then stops, each followed by whatever start or resize its GPUs unblock.
Counting is per GPU type, not per node: the controller that applies the diff checks
node placement when it reserves GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from cascadia.perf.layout import Layout
from cascadia.plan import Plan, PlanStage

START, STOP, RESIZE, SET_THRESHOLD = "start", "stop", "resize", "set_threshold"


@dataclass(frozen=True)
class PlanAction:
    kind: str  # start | stop | resize | set_threshold
    stage: int
    model: str
    gpu: str | None = None
    old: Layout | None = None  # stop, resize
    new: Layout | None = None  # start, resize
    old_threshold: float | None = None
    new_threshold: float | None = None

    @property
    def gpu_delta(self) -> int:
        """GPUs this action takes from the pool (negative: gives back)."""
        return (self.new.n_gpus if self.new else 0) - (self.old.n_gpus if self.old else 0)

    def describe(self) -> str:
        if self.kind == SET_THRESHOLD:
            return f"stage {self.stage} ({self.model}): threshold {self.old_threshold} -> {self.new_threshold}"
        old = self.old.describe() if self.old else ""
        new = self.new.describe() if self.new else ""
        arrow = f"{old} -> {new}" if self.kind == RESIZE else (new or old)
        return f"stage {self.stage} ({self.model}): {self.kind} replica {arrow} on {self.gpu}"


@dataclass(frozen=True)
class PlanDiff:
    actions: tuple[PlanAction, ...]
    kept: tuple[tuple[int, Layout], ...]  # (stage, layout) of replicas left running

    @property
    def empty(self) -> bool:
        return not self.actions

    def describe(self) -> str:
        return "\n".join(a.describe() for a in self.actions) or "no changes"


def _stage_changes(i: int, old: PlanStage | None, new: PlanStage | None) -> tuple[list[PlanAction], list[tuple[int, Layout]]]:
    if old is not None and new is not None and old.model == new.model:
        remaining_old = [(old.gpu, r) for r in old.replicas]
        kept, remaining_new = [], []
        for r in new.replicas:
            if (new.gpu, r) in remaining_old:
                remaining_old.remove((new.gpu, r))
                kept.append((i, r))
            else:
                remaining_new.append((new.gpu, r))
    else:
        remaining_old = [(old.gpu, r) for r in old.replicas] if old else []
        remaining_new = [(new.gpu, r) for r in new.replicas] if new else []
        kept = []
    actions = []
    # Resizes only within one GPU type and one model: anything else is a stop plus a start.
    paired = 0
    if old is not None and new is not None and old.model == new.model and old.gpu == new.gpu:
        paired = min(len(remaining_old), len(remaining_new))
        for (g, a), (_, b) in zip(remaining_old[:paired], remaining_new[:paired]):
            actions.append(PlanAction(RESIZE, i, new.model, g, old=a, new=b))
    for g, r in remaining_new[paired:]:
        actions.append(PlanAction(START, i, new.model, g, new=r))
    for g, r in remaining_old[paired:]:
        actions.append(PlanAction(STOP, i, old.model, g, old=r))
    return actions, kept


def _threshold_changes(old: Plan, new: Plan) -> list[PlanAction]:
    out = []
    for i, s in enumerate(new.stages):
        before = old.stages[i].threshold if i < len(old.stages) else None
        if s.threshold != before and s.threshold is not None:
            out.append(PlanAction(SET_THRESHOLD, i, s.model, old_threshold=before, new_threshold=s.threshold))
    return out


def _order(changes: Sequence[PlanAction], thresholds: Sequence[PlanAction], old: Plan, new: Plan) -> list[PlanAction]:
    capacity = {**old.cluster.gpu_counts()}
    for g, n in new.cluster.gpu_counts().items():
        capacity[g] = max(capacity.get(g, 0), n)
    free = dict(capacity)
    for s in old.stages:
        free[s.gpu] = free.get(s.gpu, 0) - s.n_gpus
    growing = [a for a in changes if a.kind != STOP and a.gpu_delta > 0]
    shrinking = [a for a in changes if a.kind == RESIZE and a.gpu_delta <= 0]
    stops = [a for a in changes if a.kind == STOP]
    ordered: list[PlanAction] = []

    def take_fitting() -> None:
        for a in list(growing):
            if a.gpu_delta <= free.get(a.gpu, 0):
                free[a.gpu] = free.get(a.gpu, 0) - a.gpu_delta
                ordered.append(a)
                growing.remove(a)

    take_fitting()
    for a in shrinking:
        free[a.gpu] = free.get(a.gpu, 0) - a.gpu_delta
        ordered.append(a)
    take_fitting()
    ordered.extend(thresholds)
    for a in stops:
        free[a.gpu] = free.get(a.gpu, 0) - a.gpu_delta
        ordered.append(a)
        take_fitting()
    # Whatever still does not fit is left last: the new plan would not fit its own cluster.
    ordered.extend(growing)
    return ordered


def diff(old: Plan, new: Plan) -> PlanDiff:
    """Minimal ordered actions from ``old`` to ``new`` (see the module docstring)."""
    changes: list[PlanAction] = []
    kept: list[tuple[int, Layout]] = []
    for i in range(max(len(old.stages), len(new.stages))):
        a, k = _stage_changes(i, old.stages[i] if i < len(old.stages) else None,
                              new.stages[i] if i < len(new.stages) else None)
        changes.extend(a)
        kept.extend(k)
    return PlanDiff(tuple(_order(changes, _threshold_changes(old, new), old, new)), tuple(kept))
