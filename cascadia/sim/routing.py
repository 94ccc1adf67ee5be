"""How many cascade stages each simulated request visits: from a quality profile replayed
under thresholds (each trace request borrows a profile row by seeded sampling), or from
given per-stage shares."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from cascadia.quality import QualityProfile, match_requests, stop_stages


def visits_from_profile(profile: QualityProfile, thresholds: Sequence[float], n_requests: int,
                        seed: int = 0) -> np.ndarray:
    """visits[i] = 1 + the stage at which request i's borrowed profile row stops."""
    rows = match_requests(profile, n_requests, seed)
    stops = np.asarray(stop_stages(profile, np.asarray(thresholds, dtype=np.float64)))
    return stops[rows] + 1


def visits_from_shares(stage_shares: Sequence[float], n_requests: int, seed: int = 0) -> np.ndarray:
    """stage_shares[i] = fraction of requests that visit stage i (non-increasing, first 1.0);
    exactly round(share * n) requests visit each stage, chosen at random."""
    shares = np.asarray(stage_shares, dtype=np.float64)
    if shares.ndim != 1 or shares.size == 0 or abs(shares[0] - 1.0) > 1e-9:
        raise ValueError(f"stage_shares must start with 1.0 (every request visits stage 0), got {list(shares)}")
    if np.any(np.diff(shares) > 1e-12) or shares.min() < 0:
        raise ValueError(f"stage_shares must be non-increasing and >= 0, got {list(shares)}")
    counts = np.rint(shares * n_requests).astype(np.int64)
    order = np.random.default_rng(seed).permutation(n_requests)
    visits = np.zeros(n_requests, dtype=np.int64)
    for c in counts:  # the first c requests of the permutation visit this stage too
        visits[order[:c]] += 1
    return visits
