"""Turning a quality profile into the planner's input: columns named by cascade stage,
scores on the 0-100 scale of the paper's judge, and a label that says where they came from.

Rescaling rule (recorded in every plan): a profile whose score range is ``[low, high]``
with ``0 <= low < high`` is multiplied by ``100 / high`` — MT-Bench's 1-10 grades become
10-100 (x10), 0/1 correctness becomes 0/100 (x100), a 0-100 judge is unchanged. This keeps
"score 8 of 10" equal to "80", which is how the paper's targets (70/80/85/90) read. A range
with a negative low end is mapped linearly onto 0-100 instead.

Quality-source kinds: ``real`` (a judge's scores), ``perfect-judge`` (routing on 0/1
correctness itself: the live judge would have to know the right answer) and
``synthetic`` (generated; see ``synthetic_profile``).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from cascadia.quality import QualityProfile

SCORE_MAX = 100.0
REAL, PERFECT_JUDGE, SYNTHETIC = "real", "perfect-judge", "synthetic"


class QualityInputError(ValueError):
    """The profile cannot be used for this cascade; the message says why in one line."""


@dataclass(frozen=True)
class ScoreScale:
    """``new = old * multiplier + offset`` took ``from_range`` onto 0-100."""

    from_range: tuple[float, float]
    multiplier: float
    offset: float

    def describe(self) -> str:
        low, high = self.from_range
        if self.offset == 0.0:
            return f"scores x{self.multiplier:g} ({low:g}-{high:g} -> {self.apply(low):g}-{self.apply(high):g})"
        return f"scores linear {low:g}-{high:g} -> 0-100"

    def apply(self, value):
        return value * self.multiplier + self.offset


@dataclass(frozen=True)
class QualitySource:
    """Where the planner's quality numbers come from; stored in the plan as is."""

    kind: str  # REAL | PERFECT_JUDGE | SYNTHETIC
    source: str  # file name and format, or the synthetic recipe
    stage_to_profile: tuple[tuple[str, str], ...]  # (cascade model, profile model)
    scale: str  # ScoreScale.describe()
    content_hash: str  # sha256 of the scores actually used
    notes: tuple[str, ...] = ()

    def label(self) -> str:
        if self.kind == PERFECT_JUDGE:
            return "perfect judge (routing on 0/1 correctness itself)"
        if self.kind == SYNTHETIC:
            return "SYNTHETIC quality profile"
        return "real judge scores"


def score_scale(score_range: tuple[float, float]) -> ScoreScale:
    low, high = (float(x) for x in score_range)
    if high <= low:
        # A degenerate range (every score equal) cannot say how good anything is.
        raise QualityInputError(f"the profile's scores are all {low:g}: nothing to route on")
    if low >= 0.0:
        return ScoreScale((low, high), SCORE_MAX / high, 0.0)
    return ScoreScale((low, high), SCORE_MAX / (high - low), -low * SCORE_MAX / (high - low))


def is_binary(profile: QualityProfile) -> bool:
    r, q = profile.routing_scores, profile.quality_scores
    return bool(np.all((r == 0.0) | (r == 1.0)) and np.all((q == 0.0) | (q == 1.0)))


def profile_hash(profile: QualityProfile) -> str:
    h = hashlib.sha256()
    h.update("\0".join(profile.models).encode())
    h.update("\0".join(profile.request_ids).encode())
    h.update(np.ascontiguousarray(profile.routing_scores).tobytes())
    h.update(np.ascontiguousarray(profile.quality_scores).tobytes())
    return h.hexdigest()


def parse_quality_map(text: str | None) -> dict[str, str]:
    """``STAGE_MODEL=PROFILE_MODEL,...`` -> dict; model names may contain '/' but not ',' or '='."""
    if not text:
        return {}
    out: dict[str, str] = {}
    for part in text.split(","):
        stage, sep, prof = part.partition("=")
        if not sep or not stage.strip() or not prof.strip():
            raise QualityInputError(f"--quality-map: expected STAGE_MODEL=PROFILE_MODEL, got {part!r}")
        out[stage.strip()] = prof.strip()
    return out


def _stage_columns(profile: QualityProfile, cascade: Sequence[str], mapping: Mapping[str, str]) -> list[str]:
    unknown = [m for m in mapping if m not in cascade]
    if unknown:
        raise QualityInputError(f"--quality-map names {unknown}, which are not in the cascade {list(cascade)}")
    if mapping:
        missing = [m for m in cascade if m not in mapping]
        if missing:
            raise QualityInputError(f"--quality-map gives no profile model for {missing}")
        chosen = [mapping[m] for m in cascade]
        absent = [p for p in chosen if p not in profile.models]
        if absent:
            raise QualityInputError(
                f"--quality-map: {absent} not in the quality profile, which has {list(profile.models)}")
        if len(set(chosen)) != len(chosen):
            raise QualityInputError(f"--quality-map maps two stages onto one profile model: {chosen}")
        return chosen
    if len(profile.models) != len(cascade):
        raise QualityInputError(
            f"the quality profile has {len(profile.models)} models {list(profile.models)} but the cascade has "
            f"{len(cascade)} stages; pass --quality-map STAGE_MODEL=PROFILE_MODEL,...")
    # Weakest to strongest by mean quality; a stable sort keeps the file's order on ties.
    means = profile.quality_scores.mean(axis=0)
    order = np.argsort(means, kind="stable")
    return [profile.models[i] for i in order]


def stage_profile(profile: QualityProfile, cascade: Sequence[str], mapping: Mapping[str, str] | None = None,
                  kind: str | None = None) -> tuple[QualityProfile, QualitySource]:
    """The profile restricted to the cascade, columns renamed to the cascade's models and
    rescaled to 0-100, with the label that says what it is.

    ``kind`` overrides detection (the synthetic generator passes SYNTHETIC); otherwise a
    profile whose one score is 0/1 is a perfect judge and anything else is real.
    """
    columns = _stage_columns(profile, list(cascade), dict(mapping or {}))
    picked = profile.restrict(columns)
    scale = score_scale(picked.score_range)
    if kind is None:
        kind = PERFECT_JUDGE if (picked.single_score and is_binary(picked)) else REAL
    scaled = dataclasses.replace(
        picked,
        models=tuple(cascade),
        routing_scores=scale.apply(picked.routing_scores),
        quality_scores=scale.apply(picked.quality_scores),
        score_range=(0.0, SCORE_MAX) if scale.offset else (scale.apply(scale.from_range[0]), SCORE_MAX),
    )
    notes = list(profile.notes)
    if kind == PERFECT_JUDGE:
        notes.append("routing score = 0/1 correctness: a perfect judge, an upper bound on what a live judge reaches")
    source = QualitySource(
        kind=kind, source=profile.source, stage_to_profile=tuple(zip(cascade, columns)),
        scale=scale.describe(), content_hash=profile_hash(scaled), notes=tuple(notes))
    return scaled, source


def _clipped_mean(x: np.ndarray, shift: float) -> float:
    return float(np.clip(np.rint(x + shift), 0.0, SCORE_MAX).mean())


def synthetic_profile(means: Sequence[float], *, seed: int = 0, n_requests: int = 400,
                      correlation: float = 0.6, spread: float = 18.0, judge_noise: float = 6.0,
                      models: Sequence[str] | None = None) -> QualityProfile:
    """A seeded profile whose per-model quality scores have the given means on 0-100.

    Each request has a latent difficulty shared by all models (``correlation`` of a
    model's score variance comes from it), so a request a small model fails is likely
    hard for the large one too, as in real profiles. Scores are integers in 0-100; a shift
    per model, found by bisection, puts the clipped mean on target. The routing score is
    the quality score plus Gaussian judge noise (sd ``judge_noise``): an imperfect judge.
    """
    means = [float(m) for m in means]
    if not means or any(not 0.0 < m < SCORE_MAX for m in means):
        raise QualityInputError(f"synthetic quality means must be in (0, 100), got {means}")
    if not 0.0 <= correlation <= 1.0:
        raise QualityInputError(f"correlation must be in [0, 1], got {correlation}")
    names = list(models) if models is not None else [f"synthetic-{i}" for i in range(len(means))]
    if len(names) != len(means):
        raise QualityInputError(f"{len(means)} synthetic means for {len(names)} models")
    rng = np.random.default_rng(seed)
    difficulty = rng.standard_normal(n_requests)
    quality = np.empty((n_requests, len(means)))
    for j, target in enumerate(means):
        own = rng.standard_normal(n_requests)
        raw = spread * (np.sqrt(correlation) * difficulty + np.sqrt(1.0 - correlation) * own)
        lo, hi = -SCORE_MAX, 2 * SCORE_MAX
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if _clipped_mean(raw, mid) < target else (lo, mid)
        quality[:, j] = np.clip(np.rint(raw + (lo + hi) / 2), 0.0, SCORE_MAX)
    routing = np.clip(np.rint(quality + judge_noise * rng.standard_normal(quality.shape)), 0.0, SCORE_MAX)
    recipe = (f"synthetic(means={','.join(f'{m:g}' for m in means)}, seed={seed}, n={n_requests}, "
              f"correlation={correlation:g}, spread={spread:g}, judge_noise={judge_noise:g})")
    return QualityProfile(
        models=tuple(names), request_ids=tuple(f"syn-{i}" for i in range(n_requests)),
        routing_scores=routing, quality_scores=quality, score_range=(0.0, SCORE_MAX),
        single_score=judge_noise == 0.0, source=recipe,
        notes=("SYNTHETIC: generated scores, not measurements of any model",))


def parse_means(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise QualityInputError(f"--synthetic-quality: expected numbers like 70,85,92, got {text!r}") from None
