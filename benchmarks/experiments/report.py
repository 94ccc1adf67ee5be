"""Markdown tables and plots from the comparison's JSON (no simulation here)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from benchmarks.experiments.systems import SYSTEMS

LABELS = {"cascadia": "Cascadia", "single": "single model", "cascadeserve": "CascadeServe-style (ours)",
          "no-par-search": "no par. search", "uniform": "uniform GPUs"}
KIND_LABEL = {"real": "MT-Bench (real judge, other models' scores)",
              "perfect-judge": "GSM8K (perfect judge, other models' scores)",
              "synthetic": "SYNTHETIC profile"}


def json_safe(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, np.generic):
        return json_safe(x.item())
    return x


def _num(x, fmt="{:.2f}") -> str:
    if x is None:
        return "inf"
    if isinstance(x, float) and not math.isfinite(x):
        return "inf" if x > 0 else "-"
    return fmt.format(x)


def _ratio(row: dict, key: str) -> str:
    """n/a when a ratio could not be formed (a system had no plan); inf when the other
    system never reached 95% (its value is inf, stored as null in JSON)."""
    if key not in row["ratios"]:
        return "n/a"
    return _num(row["ratios"][key])


def _cell(res: dict, key: str, fmt="{:.2f}") -> str:
    if "infeasible" in res:
        return "n/a"
    return _num(res.get(key), fmt)


def summary(doc: dict, key: str, rows_filter=lambda r: True) -> tuple[float, float, int] | None:
    """(max, mean, n) of a ratio over rows where it is finite."""
    vals = [r["ratios"][key] for r in doc["scenarios"] if rows_filter(r) and key in r["ratios"]
            and r["ratios"][key] is not None and math.isfinite(r["ratios"][key])]
    if not vals:
        return None
    return max(vals), float(np.mean(vals)), len(vals)


def markdown(doc: dict) -> str:
    lines = [f"Cluster {doc['cluster']}; Cascadia objective `{doc['objective']}`; "
             f"time speedup {doc['speedup']}; {doc['deadline']}.", ""]
    lines += ["### Minimum SLO scale (lower is better) and Cascadia's ratio", "",
              "| cascade | trace | quality | α | q_min | " + " | ".join(LABELS[s] for s in SYSTEMS)
              + " | × vs single | × vs CascadeServe-style |",
              "|---|---|---|---|---|" + "---|" * len(SYSTEMS) + "---|---|"]
    for r in doc["scenarios"]:
        sc = r["scenario"]
        cells = [_cell(r["systems"].get(s, {"infeasible": ""}), "min_slo_scale") for s in SYSTEMS]
        lines.append(f"| {sc['cascade']} | {sc['trace']} | {sc['quality']} | {sc['alpha']:g} | {sc['q_min']:.1f} | "
                     + " | ".join(cells) + f" | {_ratio(r, 'slo_vs_single')} | {_ratio(r, 'slo_vs_cascadeserve')} |")
    rate_rows = [r for r in doc["scenarios"] if any("max_rate_rps" in v for v in r["systems"].values())]
    if rate_rows:
        scale = doc["settings"]["rate_scale"]
        lines += ["", f"### Highest arrival rate (req/s) with ≥95% of requests within {scale:g}× their unloaded "
                      "latency (deployment fixed, arrivals compressed)", "",
                  "| cascade | trace | quality | α | " + " | ".join(LABELS[s] for s in SYSTEMS)
                  + " | × vs single | × vs CascadeServe-style |",
                  "|---|---|---|---|" + "---|" * len(SYSTEMS) + "---|---|"]
        for r in rate_rows:
            sc = r["scenario"]
            cells = [_cell(r["systems"].get(s, {"infeasible": ""}), "max_rate_rps", "{:.1f}") for s in SYSTEMS]
            lines.append(f"| {sc['cascade']} | {sc['trace']} | {sc['quality']} | {sc['alpha']:g} | "
                         + " | ".join(cells)
                         + f" | {_ratio(r, 'rate_vs_single')} | {_ratio(r, 'rate_vs_cascadeserve')} |")
    lines += ["", "### Summary of Cascadia's ratios (max / mean over scenarios where both are finite)", "",
              "| rows | vs single (SLO) | vs CascadeServe-style (SLO) | vs single (rate) | "
              "vs CascadeServe-style (rate) |", "|---|---|---|---|---|"]
    groups = [("all", lambda r: True)] + [(KIND_LABEL[k], (lambda k: lambda r: r["kind"] == k)(k))
                                         for k in ("real", "perfect-judge", "synthetic")]
    for name, f in groups:
        cells = []
        for key in ("slo_vs_single", "slo_vs_cascadeserve", "rate_vs_single", "rate_vs_cascadeserve"):
            s = summary(doc, key, f)
            cells.append("-" if s is None else f"{s[0]:.2f}× / {s[1]:.2f}× (n={s[2]})")
        if any(c != "-" for c in cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "### Deployments (planned on the planning window)", "",
              "| scenario | system | thresholds | stage shares | quality | GPUs | replicas |",
              "|---|---|---|---|---|---|---|"]
    for r in doc["scenarios"]:
        for s in SYSTEMS:
            res = r["systems"].get(s)
            if not res or "infeasible" in res:
                lines.append(f"| {r['key']} | {s} | n/a | | | | {res.get('infeasible', '') if res else ''} |")
                continue
            thr = ", ".join(f"{t:.1f}" for t in res["thresholds"]) or "-"
            shares = ", ".join(f"{x:.2f}" for x in res["planned_stage_shares"])
            lines.append(f"| {r['key']} | {s} | {thr} | {shares} | {res['quality']:.1f} | {res['n_gpus']} | "
                         f"{res['deployment']} |")
    return "\n".join(lines) + "\n"


def plot(doc: dict, slo_path: Path, rate_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in doc["scenarios"]:
        sc = r["scenario"]
        groups.setdefault((sc["cascade"], sc["quality"], sc["trace"]), []).append(r)
    for path, key, ylabel in ((slo_path, "min_slo_scale", "min SLO scale (95% attainment)"),
                              (rate_path, "max_rate_rps", "max sustained rate (req/s)")):
        panels = [(g, rows) for g, rows in groups.items() if any(key in v for r in rows for v in r["systems"].values())]
        if not panels:
            continue
        ncols = min(3, len(panels))
        nrows = math.ceil(len(panels) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.4 * nrows), squeeze=False)
        width = 0.8 / len(SYSTEMS)
        for ax in axes.flat[len(panels):]:
            ax.set_visible(False)
        for ax, ((cascade, quality, trace), rows) in zip(axes.flat, panels):
            xs = np.arange(len(rows))
            for j, s in enumerate(SYSTEMS):
                vals = [r["systems"].get(s, {}).get(key) for r in rows]
                vals = [v if isinstance(v, (int, float)) and v is not None and math.isfinite(v) else np.nan
                        for v in vals]
                ax.bar(xs + (j - (len(SYSTEMS) - 1) / 2) * width, vals, width, label=LABELS[s])
            ax.set_xticks(xs, [f"α={r['scenario']['alpha']:g}" for r in rows])
            ax.set_title(f"{cascade} / {trace}\n{quality.upper() if quality == 'synthetic' else quality} quality",
                         fontsize=9)
            ax.set_ylabel(ylabel, fontsize=8)
            if key == "min_slo_scale":
                ax.set_yscale("log")
        axes.flat[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Redraw the table and plots from a results JSON: python -m benchmarks.experiments.report FILE.json"""
    import argparse
    import json

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("results", help="results.json written by run_all")
    args = ap.parse_args(argv)
    path = Path(args.results)
    doc = json.loads(path.read_text())
    stem = path.with_suffix("")
    Path(f"{stem}.md").write_text(markdown(doc))
    plot(doc, Path(f"{stem}_slo.png"), Path(f"{stem}_rate.png"))
    print(f"wrote {stem}.md, {stem}_slo.png, {stem}_rate.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
