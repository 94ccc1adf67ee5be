"""Routing level of the bi-level planner: which thresholds θ (one per stage but the last).

For a θ, replaying the quality profile gives the mean quality Q(θ) and the share of
requests each stage sees; a caller-supplied ``latency_of_shares(shares) -> (L, solution)``
(the deployment MILP over latency tables, in planner/bilevel.py) gives the latency L(θ).
Two scalarisations over the evaluated points:

- the weighted Tchebycheff form min max{λ1·(L − L*)/ΔL, λ2·(Q* − Q)/ΔQ}, swept over λ,
  traces the latency-quality Pareto front;
- the paper's penalty J(θ) = L(θ) + μ·max{0, (q_min − Q(θ)) / (z1* − z2*)} picks the plan
  for a quality target (z1*: everything to the last stage, z2*: everything stops at the
  first).

Q and the shares only change when a threshold crosses a profile score, so θ lives on the
grid of distinct scores (``candidate_thresholds``), thinned to score quantiles when a
profile has many distinct scores. The search evaluates a coarse quantile grid, then
refines around the incumbent by pattern search with a halving step, and stops when the
best J has not changed for ``stable_rounds`` rounds. The MILP is memoised by shares
rounded *up* to ``share_quantum`` (planning for at least the traffic a stage will see).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from cascadia.quality import QualityProfile, candidate_thresholds, replay

LatencyOfShares = Callable[[tuple[float, ...]], tuple[float, Any]]


@dataclass(frozen=True)
class RoutingPoint:
    """One threshold vector, its replayed quality and shares, and the latency the
    deployment level gives those shares (inf when no deployment exists)."""

    thresholds: tuple[float, ...]
    quality: float
    stage_shares: tuple[float, ...]  # exact replay shares
    planned_shares: tuple[float, ...]  # rounded up: what the deployment was sized for
    latency_s: float
    solution: Any = field(compare=False, repr=False, default=None)


@dataclass
class SharesMemo:
    """``latency_of_shares`` memoised by shares rounded up to ``quantum``."""

    latency_of_shares: LatencyOfShares
    quantum: float = 0.05
    cache: dict[tuple[float, ...], tuple[float, Any]] = field(default_factory=dict)
    hits: int = 0
    misses: int = 0
    _fresh: set = field(default_factory=set)  # filled by a batch, not yet read

    def rounded(self, shares: Sequence[float]) -> tuple[float, ...]:
        # The small epsilon stops 0.30000000000000004 from rounding up to 0.35.
        steps = [math.ceil(float(s) / self.quantum - 1e-9) for s in shares]
        return tuple(min(1.0, round(k * self.quantum, 10)) for k in steps)

    def fill(self, many: Sequence[Sequence[float]]) -> None:
        """Compute the missing keys of a batch at once when the latency function can
        (``latency_of_shares.prefetch``: the deployment level solves a batch's MILPs in
        parallel); counted as misses when first read."""
        prefetch = getattr(self.latency_of_shares, "prefetch", None)
        keys = [k for k in dict.fromkeys(self.rounded(s) for s in many) if k not in self.cache]
        if prefetch is None or len(keys) < 2:
            return
        self.cache.update(prefetch(keys))
        self._fresh.update(keys)

    def __call__(self, shares: Sequence[float]) -> tuple[tuple[float, ...], float, Any]:
        key = self.rounded(shares)
        if key in self.cache and key not in self._fresh:
            self.hits += 1
        else:
            self.misses += 1
            self._fresh.discard(key)
            if key not in self.cache:
                self.cache[key] = self.latency_of_shares(key)
        latency, solution = self.cache[key]
        return key, float(latency), solution


def threshold_grid(profile: QualityProfile, max_points_per_stage: int = 64) -> tuple[np.ndarray, ...]:
    """Per judged stage, the sorted thresholds worth trying: every distinct routing score
    plus one above the maximum, thinned to score quantiles past ``max_points_per_stage``
    (the first and the "nobody stops here" values are always kept)."""
    grids = []
    for stage in range(len(profile.models) - 1):
        values = candidate_thresholds(profile, stage)
        if len(values) > max_points_per_stage:
            qs = np.quantile(profile.routing_scores[:, stage], np.linspace(0, 1, max_points_per_stage - 1))
            values = np.unique(np.concatenate([[values[0]], qs, [values[-1]]]))
        grids.append(values)
    return tuple(grids)


def coarse_indices(grid: np.ndarray, n_points: int) -> np.ndarray:
    """About ``n_points`` evenly spaced indices into ``grid``, both ends included."""
    if len(grid) <= n_points:
        return np.arange(len(grid))
    return np.unique(np.rint(np.linspace(0, len(grid) - 1, n_points)).astype(np.int64))


def least_escalation_points(profile: QualityProfile, grids: tuple[np.ndarray, ...], q_min: float, k: int,
                            max_mesh: int = 250_000) -> list[tuple[int, ...]]:
    """Index vectors of up to ``k`` grid points that meet ``q_min`` with the fewest
    escalations (the sum of the shares of stages 2..C), or [] when none does or the
    mesh is too large to replay whole. They seed the search: pattern search on J can
    stall on the discrete grid short of a target some grid point reaches."""
    if not grids or k <= 0 or int(np.prod([len(g) for g in grids])) > max_mesh:
        return []
    idx = np.stack(np.meshgrid(*[np.arange(len(g)) for g in grids], indexing="ij"), axis=-1).reshape(-1, len(grids))
    thr = np.stack([grids[s][idx[:, s]] for s in range(len(grids))], axis=1).astype(np.float64)
    rep = replay(profile, thr)
    ok = np.flatnonzero(rep.mean_quality >= q_min - 1e-9)
    escalated = rep.stage_shares[ok, 1:].sum(axis=1)
    return [tuple(int(v) for v in idx[i]) for i in ok[np.argsort(escalated, kind="stable")][:k]]


def extremes(profile: QualityProfile) -> tuple[float, float]:
    """(z1*, z2*): mean quality when everything goes to the last stage / stops at the first."""
    means = profile.quality_scores.mean(axis=0)
    return float(means[-1]), float(means[0])


def penalty_objective(latency_s: float, quality: float, q_min: float, z1: float, z2: float, mu: float) -> float:
    """The paper's J(θ); |z1* − z2*| guards against a cascade whose last stage is not the best."""
    spread = abs(z1 - z2) or 1.0
    return latency_s + mu * max(0.0, (q_min - quality) / spread)


def pareto_filter(points: Sequence[RoutingPoint]) -> list[RoutingPoint]:
    """Points no other point beats on both lower latency and higher quality, by latency."""
    finite = sorted((p for p in points if math.isfinite(p.latency_s)), key=lambda p: (p.latency_s, -p.quality))
    front: list[RoutingPoint] = []
    for p in finite:
        if not front or p.quality > front[-1].quality:
            front.append(p)
    return front


def tchebycheff_front(points: Sequence[RoutingPoint], n_weights: int = 21) -> list[RoutingPoint]:
    """Minimisers of max{λ·(L − L*)/ΔL, (1 − λ)·(Q* − Q)/ΔQ} for λ on an even grid of
    [0, 1], non-dominated and sorted by latency. With λ = 0 or 1 the Tchebycheff
    minimiser is only weakly efficient, so ties are broken by the other objective."""
    finite = [p for p in points if math.isfinite(p.latency_s)]
    if not finite:
        return []
    lat = np.array([p.latency_s for p in finite])
    qual = np.array([p.quality for p in finite])
    d_lat = float(lat.max() - lat.min()) or 1.0
    d_qual = float(qual.max() - qual.min()) or 1.0
    norm_lat = (lat - lat.min()) / d_lat
    norm_gap = (qual.max() - qual) / d_qual
    chosen: dict[int, None] = {}
    for lam in np.linspace(0.0, 1.0, n_weights):
        score = np.maximum(lam * norm_lat, (1.0 - lam) * norm_gap)
        best = np.flatnonzero(np.isclose(score, score.min(), rtol=0, atol=1e-12))
        tie_break = norm_lat[best] + norm_gap[best]
        chosen.setdefault(int(best[np.argmin(tie_break)]), None)
    return pareto_filter([finite[i] for i in chosen])


@dataclass(frozen=True)
class RoutingSearchResult:
    best: RoutingPoint | None  # min J; None when no θ has a deployment
    best_objective: float
    meets_target: bool
    front: tuple[RoutingPoint, ...]
    evaluated: tuple[RoutingPoint, ...]  # every θ whose latency was asked for, in order
    z1: float
    z2: float
    q_min: float
    mu: float
    grid_size: tuple[int, ...]
    rounds: int
    memo_hits: int
    memo_misses: int

    def ranked(self) -> list[RoutingPoint]:
        """Evaluated points by J (best first), one per distinct planned-share vector."""
        seen: set[tuple[float, ...]] = set()
        out = []
        for p in sorted(self.evaluated, key=lambda p: self.objective(p)):
            if p.planned_shares not in seen and math.isfinite(p.latency_s):
                seen.add(p.planned_shares)
                out.append(p)
        return out

    def objective(self, p: RoutingPoint) -> float:
        return penalty_objective(p.latency_s, p.quality, self.q_min, self.z1, self.z2, self.mu)


class _Evaluator:
    def __init__(self, profile: QualityProfile, grids: tuple[np.ndarray, ...], memo: SharesMemo):
        self.profile, self.grids, self.memo = profile, grids, memo
        self.points: dict[tuple[int, ...], RoutingPoint] = {}
        self.order: list[RoutingPoint] = []

    def evaluate(self, index_vectors: Sequence[tuple[int, ...]]) -> list[RoutingPoint]:
        new = [iv for iv in dict.fromkeys(index_vectors) if iv not in self.points]
        if new:
            thr = np.array([[self.grids[s][i] for s, i in enumerate(iv)] for iv in new], dtype=np.float64)
            rep = replay(self.profile, thr.reshape(len(new), len(self.grids)))
            self.memo.fill([tuple(float(x) for x in row) for row in rep.stage_shares])
            for k, iv in enumerate(new):
                shares = tuple(float(x) for x in rep.stage_shares[k])
                planned, latency, solution = self.memo(shares)
                point = RoutingPoint(tuple(float(x) for x in thr[k]), float(rep.mean_quality[k]), shares,
                                     planned, latency, solution)
                self.points[iv] = point
                self.order.append(point)
        return [self.points[iv] for iv in index_vectors]


def search_routing(profile: QualityProfile, latency_of_shares: LatencyOfShares, q_min: float, *,
                   mu: float = 1e4, share_quantum: float = 0.05, max_points_per_stage: int = 64,
                   coarse_points: int = 9, stable_rounds: int = 3, max_rounds: int = 30, rel_tol: float = 1e-6,
                   n_weights: int = 21, target_seeds: int = 2, progress: Callable[[int], None] | None = None) -> RoutingSearchResult:
    """Minimise J(θ) for ``q_min`` and trace the Tchebycheff front over the evaluated θ.

    ``mu`` is in the latency's unit per unit of normalised quality shortfall; the default
    makes any shortfall cost more than any latency a real plan has, so a θ that meets the
    target always beats one that does not. The first batch is the coarse grid plus the
    ``target_seeds`` grid points that meet ``q_min`` with the fewest escalations, so the
    search finds a feasible θ whenever the grid has one. ``progress(n)`` is told of n new
    evaluations.
    """
    z1, z2 = extremes(profile)
    grids = threshold_grid(profile, max_points_per_stage)
    memo = SharesMemo(latency_of_shares, share_quantum)
    ev = _Evaluator(profile, grids, memo)

    def j_of(p: RoutingPoint) -> float:
        return penalty_objective(p.latency_s, p.quality, q_min, z1, z2, mu) if math.isfinite(p.latency_s) else math.inf

    def run(batch: list[tuple[int, ...]]) -> list[RoutingPoint]:
        before = len(ev.order)
        out = ev.evaluate(batch)
        if progress is not None and len(ev.order) > before:
            progress(len(ev.order) - before)
        return out

    coarse = [coarse_indices(g, coarse_points) for g in grids]
    steps = [max(1, int(np.max(np.diff(c)))) if len(c) > 1 else 1 for c in coarse]
    start = list(itertools.product(*[c.tolist() for c in coarse])) if grids else [()]
    start += [iv for iv in least_escalation_points(profile, grids, q_min, target_seeds) if iv not in start]
    scored = [(j_of(p), iv) for p, iv in zip(run(start), start)]
    best_j, best_iv = min(scored)
    stable = rounds = 0
    while grids and rounds < max_rounds and stable < stable_rounds:
        rounds += 1
        moves = itertools.product(*[(-st, 0, st) for st in steps])
        batch = []
        for delta in moves:
            iv = tuple(min(len(g) - 1, max(0, i + d)) for i, d, g in zip(best_iv, delta, grids))
            batch.append(iv)
        round_best = min((j_of(p), iv) for p, iv in zip(run(batch), batch))
        improved = round_best[0] < best_j - rel_tol * max(1.0, abs(best_j))
        if improved:
            best_j, best_iv = round_best
            stable = 0
        else:
            stable += 1
            if all(st == 1 for st in steps):
                break  # the neighbourhood at the finest step has been seen: a local optimum
            steps = [max(1, st // 2) for st in steps]
    best = ev.points[best_iv] if grids else ev.order[0]
    if not math.isfinite(best.latency_s):
        best = None
    return RoutingSearchResult(
        best=best, best_objective=best_j, meets_target=best is not None and best.quality >= q_min - 1e-9,
        front=tuple(tchebycheff_front(ev.order, n_weights)), evaluated=tuple(ev.order), z1=z1, z2=z2,
        q_min=q_min, mu=mu, grid_size=tuple(len(g) for g in grids), rounds=rounds,
        memo_hits=memo.hits, memo_misses=memo.misses)
