"""Per-iteration fidelity of the calibrated performance model: predicted vs measured
iteration time on the batch shapes held out of the fit (labels `eval:`), by kind.

    .venv/bin/python benchmarks/fidelity_iterations.py \
        cascadia/data/calibration/smollm2-135m-instruct-cpu.json

Reads the calibration file and the raw samples saved next to it by `cascadia profile`.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np

from cascadia.catalog import get_model
from cascadia.perf.calibration import (HELD_OUT_PREFIX, Calibration, file_sha256, predict, relative_errors,
                                       spec_for_dtype)
from cascadia.perf.profiler import samples_path_for
from cascadia.perf.samples import ProfileRun, split_by_label


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("calibration")
    args = ap.parse_args()
    calib = Calibration.load(args.calibration)
    run = ProfileRun.load(samples_path_for(args.calibration))
    spec = spec_for_dtype(get_model(calib.model), calib.dtype)
    print(f"calibration {args.calibration}\n  sha256 {file_sha256(args.calibration)}\n  samples sha256 "
          f"{calib.samples_sha256}")
    e = calib.effective_figures()
    print(f"  fitted: matmul {e['matmul_flops'] / 1e9:.1f} GFLOP/s, attention {e['attention_flops'] / 1e9:.1f} "
          f"GFLOP/s, memory {e['memory_bandwidth_Bps'] / 1e9:.2f} GB/s, overlap p {calib.efficiency.overlap_p:.2f}, "
          f"{calib.efficiency.overhead_s * 1e3:.2f} ms/iteration + {calib.efficiency.per_seq_s * 1e3:.3f} ms/sequence")
    groups: dict[str, list] = defaultdict(list)
    for s in run.samples:
        split, kind = s.label.split(":")[:2]
        groups[f"{split}:{kind}"].append(s)
    print(f"\n{'set:kind':<16}{'samples':>8}{'mean |err|':>12}{'max |err|':>11}{'mean signed':>13}")
    for key in sorted(groups, key=lambda k: (not k.startswith("fit"), k)):
        samples = groups[key]
        err = relative_errors(samples, predict(samples, spec, calib.device, calib.efficiency, calib.layout))
        print(f"{key:<16}{len(samples):>8}{np.mean(np.abs(err)):>12.1%}{np.max(np.abs(err)):>11.1%}"
              f"{np.mean(err):>+13.1%}")
    _, held = split_by_label(run.samples, HELD_OUT_PREFIX)
    err = relative_errors(held, predict(held, spec, calib.device, calib.efficiency, calib.layout))
    print(f"\nheld-out shapes (never in the fit): {len(held)} samples, mean |error| {np.mean(np.abs(err)):.1%}, "
          f"median {np.median(np.abs(err)):.1%}, max {np.max(np.abs(err)):.1%}")


if __name__ == "__main__":
    main()
