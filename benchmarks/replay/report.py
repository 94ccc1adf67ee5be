"""`cascadia report`: live replay records and simulator output in one table.

Steps kept apart: load each input as per-request timings (``load_run``), compute the
metrics (cascadia.metrics, pure), format the table (``format_table``), draw the plot
(``plot_runs``). Nothing here measures anything.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from benchmarks.replay.records import RecordsFormatError, read_records, timings
from cascadia.metrics import SLO, RequestTimings, attainment_curve, summarize

DEFAULT_SCALES = (1.0, 2.0, 5.0, 10.0)
PLOT_SCALES = np.geomspace(0.1, 100.0, 121)


@dataclass(frozen=True)
class Run:
    label: str
    kind: str  # "live" (replay records) or "simulated" (cascadia simulate --json)
    timings: RequestTimings
    input_tokens: np.ndarray
    output_tokens: np.ndarray
    judge_scores: np.ndarray | None = None  # per request, NaN when unknown; None for simulated runs


def _sim_run(path: Path, doc: dict, label: str) -> Run:
    req = doc.get("requests")
    need = ("arrival_s", "ttft_s", "tpot_s", "e2e_s", "final_stage", "input_tokens", "output_tokens")
    if not isinstance(req, dict) or any(k not in req for k in need):
        missing = [k for k in need if not isinstance(req, dict) or k not in req]
        raise RecordsFormatError(path, None, f"simulator output lacks requests.{missing} (re-run `cascadia "
                                             f"simulate --json` with this version)")
    arr = {k: np.asarray(req[k], dtype=np.float64) for k in need}
    n = arr["arrival_s"].shape[0]
    if any(a.shape != (n,) for a in arr.values()):
        raise RecordsFormatError(path, None, "simulator output: per-request lists differ in length")
    ok = np.isfinite(arr["e2e_s"])
    t = RequestTimings(start_s=arr["arrival_s"], end_s=np.where(ok, arr["arrival_s"] + arr["e2e_s"], np.nan),
                       ttft_s=np.where(ok, arr["ttft_s"], np.nan),
                       tpot_s=np.where(ok & (arr["output_tokens"] > 1), arr["tpot_s"], np.nan), e2e_s=arr["e2e_s"],
                       output_tokens=arr["output_tokens"], ok=ok, final_stage=arr["final_stage"])
    return Run(label, "simulated", t, arr["input_tokens"].astype(np.int64), arr["output_tokens"].astype(np.int64))


def load_run(path: str | Path, label: str | None = None) -> Run:
    """A `cascadia replay` records file (JSONL) or `cascadia simulate --json` output."""
    path = Path(path)
    label = label or path.stem
    text = path.read_text(encoding="utf-8")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        doc = None  # JSON lines (or not JSON at all: read_records says where)
    if isinstance(doc, dict) and "summary" in doc and "requests" in doc:
        return _sim_run(path, doc, label)
    if not text.strip():
        raise RecordsFormatError(path, None, "file is empty")
    records = read_records(path)
    scores = np.array([np.nan if r.judge_score() is None else r.judge_score() for r in records])
    return Run(label, "live", timings(records), np.array([r.input_tokens for r in records]),
               np.array([r.output_tokens if r.status == "ok" else r.max_tokens for r in records]), scores)


def dilated(run: Run, factor: float) -> Run:
    """A live run served by simulated engines at `factor` simulated seconds per wall second
    (`cascadia serve --time-dilation`), in simulated (plan) time: every time x factor."""
    if run.kind != "live" or factor == 1.0:
        return run
    t = run.timings
    scaled = RequestTimings(start_s=t.start_s * factor, end_s=t.end_s * factor, ttft_s=t.ttft_s * factor,
                            tpot_s=t.tpot_s * factor, e2e_s=t.e2e_s * factor, output_tokens=t.output_tokens,
                            ok=t.ok, final_stage=t.final_stage, itl_s=t.itl_s * factor)
    return Run(run.label, run.kind, scaled, run.input_tokens, run.output_tokens, run.judge_scores)


def versus_prediction(results: Sequence[dict], predicted_e2e_p95_s: float) -> list[str]:
    """One line per run: its E2E p95 against the plan's predicted one."""
    lines = []
    for r in results:
        got = r["e2e_s"]["p95"]
        diff = "n/a" if not (math.isfinite(got) and predicted_e2e_p95_s > 0) \
            else f"{(got - predicted_e2e_p95_s) / predicted_e2e_p95_s:+.1%}"
        lines.append(f"  {r['label']} ({r['kind']}): E2E p95 {_ms(got)} ms, {diff} vs the plan")
    return lines


def parse_slo(text: str | None) -> SLO | None:
    """``ttft:MS,tpot:MS,e2e:MS`` (any subset) -> SLO in seconds."""
    if not text:
        return None
    bounds: dict[str, float] = {}
    for part in text.split(","):
        key, sep, value = part.partition(":")
        key = key.strip().lower()
        if not sep or key not in ("ttft", "tpot", "e2e"):
            raise ValueError(f"--slo: expected ttft:MS, tpot:MS or e2e:MS, got {part!r}")
        if f"{key}_s" in bounds:
            raise ValueError(f"--slo: {key} given twice")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--slo: {key} is not a number of milliseconds: {value!r}") from None
        if not (math.isfinite(ms) and ms > 0):
            raise ValueError(f"--slo: {key} must be > 0 ms, got {value}")
        bounds[f"{key}_s"] = ms / 1e3
    return SLO(**bounds)


def parse_scales(text: str | None) -> tuple[float, ...]:
    if not text:
        return DEFAULT_SCALES
    try:
        scales = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--slo-scale: expected comma-separated numbers, got {text!r}") from None
    if any(not (math.isfinite(s) and s > 0) for s in scales):
        raise ValueError(f"--slo-scale: scales must be > 0, got {text!r}")
    return scales


def run_metrics(run: Run, slo: SLO | None, unloaded_s: np.ndarray | None, scales: Sequence[float]) -> dict:
    s = summarize(run.timings, slo, unloaded_s)
    known = run.judge_scores[np.isfinite(run.judge_scores)] if run.judge_scores is not None else np.zeros(0)
    s["judge_score_mean"] = float(known.mean()) if known.size else float("nan")
    s["judged"] = int(known.size)
    if unloaded_s is not None:
        s["attainment_at_scale"] = {f"{x:g}": float(a) for x, a in
                                    zip(scales, attainment_curve(run.timings.e2e_s, unloaded_s, scales))}
    return {"label": run.label, "kind": run.kind} | s


def _ms(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x * 1e3:.1f}"


def _shares(xs: list[float]) -> str:
    return " / ".join(f"{x:.0%}" for x in xs) if xs else "n/a"


def format_table(results: Sequence[dict]) -> str:
    """Rows of metrics, one column per run."""
    rows: list[tuple[str, list[str]]] = [
        ("source", [r["kind"] for r in results]),
        ("requests (failed)", [f"{r['requests']} ({r['failed']})" for r in results]),
        ("throughput req/s", [f"{r['requests_per_s']:.3f}" for r in results]),
        ("output tokens/s", [f"{r['output_tokens_per_s']:.1f}" for r in results]),
    ]
    for key, name in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", "ITL"), ("e2e_s", "E2E")):
        for stat in ("mean", "p50", "p90", "p95", "p99"):
            rows.append((f"{name} {'median' if stat == 'p50' else stat} ms", [_ms(r[key][stat]) for r in results]))
    if any(r["judged"] for r in results):
        rows.append(("judge score mean (n)", [f"{r['judge_score_mean']:.1f} ({r['judged']})" if r["judged"]
                                              else "n/a" for r in results]))
    rows.append(("stage visited shares", [_shares(r["stage_visited_shares"]) for r in results]))
    rows.append(("stage answered shares", [_shares(r["stage_answered_shares"]) for r in results]))
    if any("slo_attainment" in r for r in results):
        rows.append(("SLO attainment", [f"{r['slo_attainment']:.1%}" for r in results]))
        rows.append(("goodput req/s", [f"{r['goodput_rps']:.3f}" for r in results]))
    if any("min_slo_scale" in r for r in results):
        rows.append(("min SLO scale (95%)", [f"{r['min_slo_scale']:.2f}" for r in results]))
        for scale in results[0].get("attainment_at_scale", {}):
            rows.append((f"attainment at scale {scale}", [f"{r['attainment_at_scale'][scale]:.1%}"
                                                           for r in results]))
    width = max(len(name) for name, _ in rows)
    cols = [max(len(r["label"]), *(len(v[i]) for _, v in rows)) for i, r in enumerate(results)]
    lines = [f"{'':<{width}}  " + "  ".join(f"{r['label']:>{c}}" for r, c in zip(results, cols))]
    lines += [f"{name:<{width}}  " + "  ".join(f"{v:>{c}}" for v, c in zip(values, cols)) for name, values in rows]
    return "\n".join(lines)


def plot_runs(runs: Sequence[Run], path: str | Path, slo: SLO | None,
              unloaded: Sequence[np.ndarray] | None) -> None:
    """E2E and TTFT CDFs; attainment vs SLO scale (relative deadlines with a reference,
    else the --slo bounds multiplied by the scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for run in runs:
        t = run.timings
        for ax, values in ((axes[0], t.e2e_s[t.ok]), (axes[1], t.ttft_s[np.isfinite(t.ttft_s)])):
            x = np.sort(values)
            if x.size:
                ax.step(x, np.arange(1, x.size + 1) / len(t), where="post", label=run.label)
    for ax, name in ((axes[0], "E2E latency (s)"), (axes[1], "TTFT (s)")):
        ax.set_xlabel(name)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[2]
    if unloaded is not None:
        for run, base in zip(runs, unloaded):
            ax.plot(PLOT_SCALES, attainment_curve(run.timings.e2e_s, base, PLOT_SCALES), label=run.label)
        ax.set_xlabel("SLO scale (deadline = scale x unloaded latency)")
    elif slo is not None:
        from cascadia.metrics import slo_attainment_abs

        for run in runs:
            ax.plot(PLOT_SCALES, [slo_attainment_abs(run.timings, slo.scaled(s)) for s in PLOT_SCALES],
                    label=run.label)
        ax.set_xlabel(f"SLO scale (x {slo.describe()})")
    else:
        ax.text(0.5, 0.5, "pass --slo or --reference\nfor attainment vs scale", ha="center", va="center",
                transform=ax.transAxes)
    if unloaded is not None or slo is not None:
        ax.set_xscale("log")
    ax.axhline(0.95, color="grey", ls="--", lw=0.8)
    ax.set_ylabel("SLO attainment")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if unloaded is not None or slo is not None:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_main(args) -> int:
    from cascadia.cli import UsageError
    from cascadia.errors import FileFormatError

    labels = args.labels.split(",") if args.labels else [None] * len(args.inputs)
    if len(labels) != len(args.inputs):
        raise UsageError(f"--labels gives {len(labels)} names for {len(args.inputs)} inputs")
    try:
        slo = parse_slo(args.slo)
        scales = parse_scales(args.slo_scale)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.slo_scale and not args.reference:
        raise UsageError("--slo-scale needs --reference (the plan that gives each request's unloaded latency)")
    dilation = getattr(args, "time_dilation", 1.0)
    if not (math.isfinite(dilation) and dilation > 0):
        raise UsageError(f"--time-dilation must be > 0, got {dilation:g}")
    runs = []
    for path, label in zip(args.inputs, labels):
        if not Path(path).is_file():
            raise UsageError(f"no such file: {path}")
        try:
            runs.append(dilated(load_run(path, label), dilation))
        except (FileFormatError, UnicodeDecodeError) as e:
            raise UsageError(str(e).splitlines()[0]) from None
    unloaded, plan = None, None
    if args.reference:
        from cascadia.plan import Plan, PlanError

        try:
            plan = Plan.load(args.reference)
        except PlanError as e:
            raise UsageError(str(e)) from None
        except FileNotFoundError:
            raise UsageError(f"--reference: no such file: {args.reference}") from None
        from benchmarks.replay.reference import unloaded_latencies_s

        unloaded = [unloaded_latencies_s(plan, r.input_tokens, r.output_tokens, r.timings.final_stage)
                    for r in runs]
    results = [run_metrics(r, slo, None if unloaded is None else unloaded[i], scales) for i, r in enumerate(runs)]
    if slo is not None:
        print(f"SLO: {slo.describe()}")
    if dilation != 1.0:
        print(f"live times x{dilation:g}: served by simulated engines at {dilation:g} simulated s per wall s "
              f"(plan time)")
    if unloaded is not None:
        print(f"relative deadlines: scale x each request's latency alone on {args.reference}")
    print(format_table(results))
    if plan is not None and plan.prediction.e2e_p95_s and math.isfinite(plan.prediction.e2e_p95_s):
        predicted = plan.prediction.e2e_p95_s
        w = plan.workload
        print(f"plan prediction: E2E p95 {_ms(predicted)} ms ({args.reference}: full-cascade simulation on the "
              f"trace it was planned for: {w.n_requests} requests at {w.mean_rate_rps:.2f} req/s)")
        print("\n".join(versus_prediction(results, predicted)))
        for r in results:
            r["plan_e2e_p95_s"] = predicted
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}")
    if args.plot:
        plot_runs(runs, args.plot, slo, unloaded)
        print(f"wrote {args.plot}")
    return 0
