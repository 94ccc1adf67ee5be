"""`QualityProfile`: judge scores of every cascade model on the same sampled requests.

The routing level never runs a model: it replays a profile to learn, for given
thresholds, how good the answers would be and how much traffic each stage would see.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from cascadia.errors import FileFormatError


class QualityFormatError(FileFormatError):
    """A quality file could not be read; the message is ``"<file>:<line>: <what is wrong>"``."""


def _frozen_scores(values: Any, label: str, shape: tuple[int, int]) -> np.ndarray:
    arr = np.array(values, dtype=np.float64, copy=True)
    if arr.shape != shape:
        raise ValueError(f"{label} has shape {arr.shape}, expected (requests, models) = {shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{label} has missing or non-finite scores")
    arr.setflags(write=False)
    return arr


# eq=False: numpy arrays have no single truth value, so generated __eq__ would raise.
@dataclass(frozen=True, eq=False)
class QualityProfile:
    """Scores of R requests × M models; columns are stages in cascade order.

    ``routing_scores`` is what the live judge would say of each answer (thresholds apply
    to it); ``quality_scores`` is what the quality target measures. ``single_score`` is
    True when the source had only one score, so both arrays are the same numbers.
    ``n_dropped`` counts source requests left out because some model had no score for
    them, and ``notes`` says which; ``prompts`` holds the request texts when known.
    """

    models: tuple[str, ...]
    request_ids: tuple[str, ...]
    routing_scores: np.ndarray
    quality_scores: np.ndarray
    score_range: tuple[float, float]
    single_score: bool
    source: str
    n_dropped: int = 0
    notes: tuple[str, ...] = field(default=())
    prompts: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        models = tuple(str(m) for m in self.models)
        request_ids = tuple(str(r) for r in self.request_ids)
        if len(set(models)) != len(models):
            raise ValueError(f"duplicate model names in {models}")
        if len(set(request_ids)) != len(request_ids):
            raise ValueError("duplicate request ids in the profile")
        if not models or not request_ids:
            raise ValueError(
                f"a quality profile needs at least one model and one request "
                f"(got {len(models)} models, {len(request_ids)} requests)"
            )
        shape = (len(request_ids), len(models))
        routing = _frozen_scores(self.routing_scores, "routing_scores", shape)
        quality = _frozen_scores(self.quality_scores, "quality_scores", shape)
        low, high = (float(x) for x in self.score_range)
        if not low <= high:
            raise ValueError(f"score_range {self.score_range} is not (low, high)")
        if self.prompts is not None and len(self.prompts) != len(request_ids):
            raise ValueError(f"{len(self.prompts)} prompts for {len(request_ids)} requests")
        object.__setattr__(self, "models", models)
        object.__setattr__(self, "request_ids", request_ids)
        object.__setattr__(self, "routing_scores", routing)
        object.__setattr__(self, "quality_scores", quality)
        object.__setattr__(self, "score_range", (low, high))
        object.__setattr__(self, "notes", tuple(self.notes))
        if self.prompts is not None:
            object.__setattr__(self, "prompts", tuple(self.prompts))

    @property
    def n_requests(self) -> int:
        return len(self.request_ids)

    def column(self, model: str) -> int:
        """Index of ``model``'s column; KeyError naming the models the profile has."""
        try:
            return self.models.index(model)
        except ValueError:
            raise KeyError(
                f"model {model!r} is not in quality profile {self.source!r}; "
                f"available: {list(self.models)}"
            ) from None

    def restrict(self, models: Sequence[str]) -> "QualityProfile":
        """A profile with only ``models``, in that order (the cascade's stage order)."""
        if isinstance(models, str):
            raise TypeError("restrict() takes a sequence of model names, not one string")
        if len(set(models)) != len(models):
            raise ValueError(f"duplicate model names in {list(models)}")
        if not models:
            raise ValueError("restrict() needs at least one model")
        cols = [self.column(m) for m in models]
        return dataclasses.replace(
            self,
            models=tuple(models),
            routing_scores=self.routing_scores[:, cols],
            quality_scores=self.quality_scores[:, cols],
        )

    def with_prompts(self, prompts: Mapping[str, str]) -> "QualityProfile":
        """Attach request texts by request id; every request must have one."""
        missing = [r for r in self.request_ids if r not in prompts]
        if missing:
            raise KeyError(f"no prompt for {len(missing)} request(s), e.g. {missing[:3]}")
        return dataclasses.replace(self, prompts=tuple(prompts[r] for r in self.request_ids))

    def to_long_rows(self) -> list[dict[str, Any]]:
        """One dict per (request, model), request-major: the long format of the design."""
        rows = []
        for r, request_id in enumerate(self.request_ids):
            for m, model in enumerate(self.models):
                row: dict[str, Any] = {
                    "request_id": request_id,
                    "model": model,
                    "routing_score": float(self.routing_scores[r, m]),
                    "quality_score": float(self.quality_scores[r, m]),
                }
                if self.prompts is not None:
                    row["prompt"] = self.prompts[r]
                rows.append(row)
        return rows
