"""Replaying a quality profile under cascade thresholds: Q(θ) and the per-stage traffic.

A request starts at stage 0; it stops at the first stage i < C-1 whose routing score is
>= thresholds[i]; otherwise it reaches the last stage, which always answers. The
routing search calls this for thousands of threshold vectors, so everything is
vectorised over thresholds (K) and requests (R).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cascadia.quality.profile import QualityProfile

# Bound the (K, R, C) boolean temporaries to ~16 M entries so that a large sweep over a
# large profile does not allocate gigabytes; chunks are over thresholds, never requests.
_MAX_CELLS_PER_CHUNK = 1 << 24


# eq=False: numpy arrays have no single truth value, so generated __eq__ would raise.
@dataclass(frozen=True, eq=False)
class ReplayResult:
    """Outcome of K threshold vectors over a profile with C stages.

    ``stage_shares[k, i]``: fraction of requests that visit stage i (column 0 is 1.0);
    ``stop_shares[k, i]``: fraction whose final answer comes from stage i (rows sum to 1).
    A 1-D thresholds argument gives K = 1.
    """

    mean_quality: np.ndarray
    stage_shares: np.ndarray
    stop_shares: np.ndarray


def _threshold_matrix(profile: QualityProfile, thresholds: object) -> tuple[np.ndarray, bool]:
    """(K, C-1) float thresholds and whether the caller passed a single vector."""
    n_stages = len(profile.models)
    thr = np.asarray(thresholds, dtype=np.float64)
    single = thr.ndim <= 1
    thr = thr.reshape(1, -1) if single else thr
    if thr.ndim != 2 or thr.shape[1] != n_stages - 1:
        raise ValueError(
            f"thresholds must have shape ({n_stages - 1},) or (K, {n_stages - 1}) for the "
            f"{n_stages} stages {list(profile.models)}; got {np.shape(thresholds)}"
        )
    if np.any(np.isnan(thr)):
        raise ValueError("thresholds contain NaN")
    return thr, single


def _stop_matrix(routing: np.ndarray, thr: np.ndarray) -> np.ndarray:
    """(K, R) stage index where each request stops, for routing (R, C) and thr (K, C-1)."""
    n_requests, n_stages = routing.shape
    if n_stages == 1:
        return np.zeros((thr.shape[0], n_requests), dtype=np.int64)
    accepts = routing[None, :, : n_stages - 1] >= thr[:, None, :]
    # argmax finds the first True but also returns 0 when nothing accepts; those
    # requests fall through to the last stage.
    first = accepts.argmax(axis=2)
    return np.where(accepts.any(axis=2), first, n_stages - 1).astype(np.int64)


def _chunks(n_thresholds: int, n_requests: int, n_stages: int) -> list[slice]:
    step = max(1, _MAX_CELLS_PER_CHUNK // max(1, n_requests * n_stages))
    return [slice(k, k + step) for k in range(0, n_thresholds, step)]


def stop_stages(profile: QualityProfile, thresholds: object) -> np.ndarray:
    """Stage where each request stops: (R,) for thresholds (C-1,), (K, R) for (K, C-1)."""
    thr, single = _threshold_matrix(profile, thresholds)
    routing = profile.routing_scores
    stops = np.concatenate(
        [_stop_matrix(routing, thr[part]) for part in _chunks(len(thr), *routing.shape)]
    )
    return stops[0] if single else stops


def replay(profile: QualityProfile, thresholds: object) -> ReplayResult:
    """Mean quality and stage/stop shares for one (C-1,) or many (K, C-1) threshold vectors."""
    thr, _ = _threshold_matrix(profile, thresholds)
    n_requests, n_stages = profile.routing_scores.shape
    rows = np.arange(n_requests)
    quality_parts, count_parts = [], []
    for part in _chunks(len(thr), n_requests, n_stages):
        stops = _stop_matrix(profile.routing_scores, thr[part])
        k = stops.shape[0]
        quality_parts.append(profile.quality_scores[rows[None, :], stops].mean(axis=1))
        # Count stops per (threshold, stage) in one bincount over offset stage ids.
        offsets = (np.arange(k) * n_stages)[:, None]
        count_parts.append(
            np.bincount((stops + offsets).ravel(), minlength=k * n_stages).reshape(k, n_stages)
        )
    stop_counts = np.concatenate(count_parts)
    # A request visits stage i iff it stops at i or later; integer counts keep column 0
    # exactly 1.0 after the division.
    visit_counts = np.cumsum(stop_counts[:, ::-1], axis=1)[:, ::-1]
    return ReplayResult(
        mean_quality=np.concatenate(quality_parts),
        stage_shares=visit_counts / n_requests,
        stop_shares=stop_counts / n_requests,
    )


def candidate_thresholds(profile: QualityProfile, stage: int) -> np.ndarray:
    """Sorted distinct routing scores of ``stage`` plus one value above their maximum.

    Replay outcomes only change when a threshold crosses one of these scores, so a
    search over them loses nothing; the last value (max + 1, or the next float when
    +1 is lost to rounding) sends every request past the stage.
    """
    n_stages = len(profile.models)
    if not 0 <= stage < n_stages - 1:
        raise ValueError(
            f"stage {stage} has no threshold: stages 0..{n_stages - 2} do "
            f"(the last of {n_stages} always answers)"
        )
    values = np.unique(profile.routing_scores[:, stage])
    top = float(values[-1])
    above = top + 1.0 if top + 1.0 > top else float(np.nextafter(top, np.inf))
    return np.append(values, above)


def match_requests(profile: QualityProfile, n_requests: int, seed: int) -> np.ndarray:
    """Profile row for each of ``n_requests`` trace requests, sampled with replacement."""
    if n_requests < 0:
        raise ValueError(f"n_requests must be >= 0, got {n_requests}")
    rng = np.random.default_rng(seed)
    return rng.integers(0, profile.n_requests, size=n_requests, dtype=np.int64)
