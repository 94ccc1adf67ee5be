"""A cascade (models small to large, with thresholds) and a latency SLO."""

from __future__ import annotations

from dataclasses import dataclass

from cascadia.specs.model import SpecError


@dataclass(frozen=True)
class CascadeSpec:
    """Stage i's answer is accepted when the judge's score >= thresholds[i]; the last
    stage always answers, so there is one threshold fewer than stages."""

    models: tuple[str, ...]
    thresholds: tuple[float, ...] | None = None
    judge: str = "logprob"

    def __post_init__(self) -> None:
        if not self.models:
            raise SpecError("cascade has no models")
        if self.thresholds is not None and len(self.thresholds) != len(self.models) - 1:
            raise SpecError(
                f"cascade of {len(self.models)} models needs {len(self.models) - 1} thresholds, got {len(self.thresholds)}"
            )

    @property
    def n_stages(self) -> int:
        return len(self.models)

    @classmethod
    def parse(cls, text: str, judge: str = "logprob") -> "CascadeSpec":
        models = tuple(m.strip() for m in text.split(",") if m.strip())
        return cls(models=models, judge=judge)


@dataclass(frozen=True)
class SLOSpec:
    """Latency targets in ms (None = not constrained). `scale` multiplies all of them: the
    paper reports the smallest scale at which 95% of requests meet their deadlines."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None
    scale: float = 1.0
    attainment: float = 0.95

    @classmethod
    def parse(cls, text: str) -> "SLOSpec":
        """`ttft:500,tpot:50,e2e:10000`."""
        kw: dict[str, float] = {}
        for part in text.split(","):
            if not part.strip():
                continue
            key, sep, val = part.partition(":")
            key = key.strip().lower()
            if not sep or key not in ("ttft", "tpot", "e2e"):
                raise SpecError(f"SLO {text!r}: expected ttft:MS,tpot:MS,e2e:MS, got {part!r}")
            try:
                kw[f"{key}_ms"] = float(val)
            except ValueError:
                raise SpecError(f"SLO {text!r}: {key} must be a number of ms, got {val!r}") from None
            if kw[f"{key}_ms"] <= 0:
                raise SpecError(f"SLO {text!r}: {key} must be positive")
        return cls(**kw)
