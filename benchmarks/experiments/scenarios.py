"""What the comparison runs: cluster, cascades, traces (windows and time scale), quality
profiles and targets. Pure data and loaders; nothing runs at import time.

Quality (all on 0-100):
- 2-stage Llama-3 8B -> 70B: the real MT-Bench profile (GPT-4 grades 1-10, x10) of
  Mixtral-8x7B -> GPT-4-1106, mapped onto llama-3-8b -> llama-3-70b (headline), and GSM8K
  correctness (0/1, x100) of the same two models, a *perfect judge*; both are other
  models' scores, mapped onto the self-hosted models, and labelled so.
- 3-stage DeepSeek 7B -> 70B -> 671B-AWQ: no public per-request profile exists, so a seeded
  *synthetic* profile (planner.quality_input.synthetic_profile) with means 70 / 80 / 90.

Targets: q = z2* + alpha * (z1* - z2*), z2* = everything stops at stage 1, z1* = everything
goes to the last stage.

Workload: each trace is cut into a planning window and a *different* evaluation window
(original trace minutes), then time-scaled (arrival times divided by ``speedup``) so that
the offered load makes the 32 GPUs work. The planner and the baselines only see the
planning window; every number reported comes from the evaluation window with another seed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from cascadia.catalog import get_model
from cascadia.quality import QualityProfile, builtin_profile_path, load_quality
from cascadia.specs.cluster import ClusterSpec, parse_cluster
from cascadia.specs.model import ModelSpec
from cascadia.traces import Trace, builtin_trace_path, load_trace, scale_time, window
from planner.quality_input import SYNTHETIC, QualitySource, stage_profile, synthetic_profile

CLUSTER = "4x8xH100"
CASCADES: dict[str, tuple[str, ...]] = {
    "llama": ("llama-3-8b", "llama-3-70b"),
    "deepseek": ("deepseek-r1-distill-qwen-7b", "deepseek-r1-distill-llama-70b", "deepseek-v3-671b-awq"),
}
QUALITY_BY_CASCADE: dict[str, tuple[str, ...]] = {"llama": ("mtbench", "gsm8k"), "deepseek": ("synthetic",)}
SYNTHETIC_MEANS = (70.0, 80.0, 90.0)
SYNTHETIC_SEED = 7
ALPHAS = (0.25, 0.5, 0.75, 0.9)
TRACES = ("azure-conv", "azure-code")
# Arrival times are divided by this. Conv runs ~4.8 req/s and code ~2.4 req/s in minutes 0-10
# of the original traces. Conv x10 (~47 req/s) loads 32 H100 serving Llama-3-70B alone to a
# min SLO scale of ~3.4-4.6; code is far burstier (2k-token prompts arriving in clumps, most
# answers < 20 tokens), so x3 (~7 req/s) already gives the stand-alone 70B a min SLO scale
# of ~30 at 30% GPU utilisation.
SPEEDUP = {"azure-conv": 10.0, "azure-code": 3.0}


@dataclass(frozen=True)
class Settings:
    """Run-wide knobs; ``quick()`` is the smoke version."""

    plan_window_s: tuple[float, float] = (0.0, 300.0)  # original trace seconds
    eval_window_s: tuple[float, float] = (300.0, 600.0)
    alphas: tuple[float, ...] = ALPHAS
    traces: tuple[str, ...] = TRACES
    cascades: tuple[str, ...] = ("llama", "deepseek")
    qualities: tuple[str, ...] = ("mtbench", "gsm8k", "synthetic")
    plan_seed: int = 11
    eval_seed: int = 12345
    rate_scale: float = 5.0  # fixed SLO scale for the max-sustained-rate metric
    rate_probes: int = 6  # simulations per system and scenario for that metric
    rate_qualities: tuple[str, ...] = ("mtbench", "synthetic")  # where the rate metric runs
    # Requests of each stage's trace the latency tables simulate. The planner's default (256)
    # is ~5 s of conv traffic at x10: too short for a queue to build near capacity, so tables
    # under-state loaded latency and plans under-provision (see README).
    table_requests: int = 2048
    quick: bool = False

    @classmethod
    def quick_settings(cls) -> "Settings":
        return cls(plan_window_s=(0.0, 120.0), eval_window_s=(120.0, 240.0), alphas=(0.5,),
                   traces=("azure-conv",), cascades=("llama",), qualities=("mtbench",), rate_probes=3,
                   quick=True)


@dataclass(frozen=True)
class Scenario:
    cascade: str  # key of CASCADES
    trace: str
    quality: str  # mtbench | gsm8k | synthetic
    alpha: float
    q_min: float
    z1: float  # everything to the last stage
    z2: float  # everything stops at the first

    @property
    def key(self) -> str:
        return f"{self.cascade}/{self.trace}/{self.quality}/a{self.alpha:g}"

    @property
    def models(self) -> tuple[str, ...]:
        return CASCADES[self.cascade]


def cluster() -> ClusterSpec:
    return parse_cluster(CLUSTER)


def cascade_models(name: str) -> list[ModelSpec]:
    return [get_model(m) for m in CASCADES[name]]


def target(z1: float, z2: float, alpha: float) -> float:
    return z2 + alpha * (z1 - z2)


@functools.cache
def quality(cascade: str, kind: str) -> tuple[QualityProfile, QualitySource]:
    """The stage-named 0-100 profile and its label for a cascade."""
    names = CASCADES[cascade]
    if kind == "synthetic":
        prof = synthetic_profile(SYNTHETIC_MEANS, seed=SYNTHETIC_SEED, models=names)
        return stage_profile(prof, names, {n: n for n in names}, kind=SYNTHETIC)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dropped rows are in the profile's notes
        prof = load_quality(builtin_profile_path(kind))
    return stage_profile(prof, names)  # weakest profile model -> first stage


def scenarios(settings: Settings) -> list[Scenario]:
    out = []
    for cascade in settings.cascades:
        for kind in QUALITY_BY_CASCADE[cascade]:
            if kind not in settings.qualities:
                continue
            prof, _ = quality(cascade, kind)
            means = prof.quality_scores.mean(axis=0)
            z1, z2 = float(means[-1]), float(means[0])
            for trace in settings.traces:
                for alpha in settings.alphas:
                    out.append(Scenario(cascade, trace, kind, alpha, target(z1, z2, alpha), z1, z2))
    return out


@functools.cache
def _full_trace(name: str) -> Trace:
    return load_trace(builtin_trace_path(name))


def workload(trace: str, span_s: tuple[float, float], speedup: float | None = None) -> Trace:
    """Minutes ``span_s`` of the original trace, arrivals divided by the speedup."""
    w = window(_full_trace(trace), *span_s)
    return scale_time(w, 1.0 / (speedup or SPEEDUP[trace]))


def describe_workload(trace: Trace) -> dict:
    return {"requests": len(trace), "duration_s": trace.duration_s, "rate_rps": trace.mean_rate_rps,
            "mean_input_tokens": float(np.mean(trace.input_tokens)),
            "mean_output_tokens": float(np.mean(trace.output_tokens))}
