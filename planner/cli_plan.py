"""`cascadia plan`: read the inputs, run the bi-level planner, write the plan and print it.

Only argparse is imported at module level, so registering the subcommand costs nothing;
the planner, pulp and tqdm load when the command runs, matplotlib only for --plot. Bad
input raises cascadia.cli.UsageError: one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    from cascadia.cli import _add_trace_args

    p = subparsers.add_parser(
        "plan", help="plan a cascade deployment (GPUs, layouts, thresholds) for a quality target",
        description="Bi-level planner: a weighted-Tchebycheff search over the cascade's thresholds, each "
                    "candidate routing sized by the deployment MILP over simulated latency tables; the "
                    "result meets --q-min at the lowest latency and is written as a plan file.")
    p.add_argument("--cascade", required=True, help="models weakest first: catalog names or config.json paths, "
                                                    "comma-separated (e.g. llama-3-8b,llama-3-70b)")
    p.add_argument("--cluster", required=True, help="GPU pool, e.g. 4x8xH100 or 2x8xH100+1x8xA100-80G, or YAML")
    p.add_argument("--q-min", dest="q_min", type=float, required=True,
                   help="quality target: mean judge score on 0-100")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--quality", help="quality profile: long or wide CSV, RouteLLM MT-Bench judgements, or a "
                                       "built-in name (mtbench, gsm8k)")
    src.add_argument("--synthetic-quality", metavar="M1,M2[,M3]",
                     help="generate a seeded synthetic profile with these mean scores (0-100) per stage")
    p.add_argument("--quality-format", choices=["long", "mtbench", "wide"], help="profile format (default: sniffed)")
    p.add_argument("--quality-map", metavar="STAGE_MODEL=PROFILE_MODEL,...",
                   help="which profile model stands for each cascade model (default: weakest to strongest "
                        "by mean score)")
    p.add_argument("--seed", type=int, default=0, help="seed for synthetic quality, stage sampling, simulation")
    p.add_argument("--out", required=True, help="plan file to write (JSON)")
    p.add_argument("--plot", metavar="PNG", help="also draw the latency-quality Pareto front (needs matplotlib)")
    p.add_argument("--objective", choices=["max-stage", "end-to-end"], default="max-stage",
                   help="max-stage: the paper's worst-stage p95; end-to-end: a request's latency summed over "
                        "the stages it visits (MILP surrogate, re-scored by simulation)")
    p.add_argument("--solver", choices=["cbc", "highs"], default="cbc", help="MILP solver (default cbc)")
    p.add_argument("--no-sub-cascades", action="store_true",
                   help="plan the full cascade only, as the paper does (default: also plan every sub-cascade "
                        "that can reach --q-min, down to the last model alone, and keep the fastest)")
    p.add_argument("--judge-latency-ms", type=float, default=0.0,
                   help="time the judge adds after every judged stage (default 0)")
    p.add_argument("--judge-model", metavar="MODEL",
                   help="the live judge is an LLM served by this cascade model: its judging requests count in "
                        "that model's workload and in the predicted latency (default: a judge outside the pool)")
    p.add_argument("--judge-output-tokens", type=int, default=8,
                   help="with --judge-model: tokens the judge writes per verdict (default 8, a rating)")
    p.add_argument("--share-quantum", type=float, default=0.05,
                   help="stage shares are rounded up to this for tables and MILPs (default 0.05)")
    p.add_argument("--cache-dir", help="latency-table cache (default $CASCADIA_CACHE/tables or ~/.cache/cascadia)")
    p.add_argument("--processes", type=int, help="simulation worker processes (default 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_trace_args(p)
    p.set_defaults(func=cmd_plan)
    return p


def _models(text: str):
    from cascadia.catalog import get_model
    from cascadia.cli import UsageError
    from cascadia.specs.model import SpecError, model_from_hf_config

    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError("--cascade names no models")
    if len(set(names)) != len(names):
        raise UsageError(f"--cascade repeats a model: {names}")
    out = []
    for name in names:
        try:
            out.append(model_from_hf_config(name) if Path(name).exists() else get_model(name))
        except (KeyError, SpecError) as e:
            raise UsageError(f"--cascade: {e.args[0]}") from None
    return out


def _quality(args, names):
    from cascadia.cli import UsageError
    from cascadia.quality import BUILTIN_PROFILES, QualityFormatError, builtin_profile_path, load_quality
    from planner.quality_input import (SYNTHETIC, QualityInputError, parse_means, parse_quality_map,
                                       stage_profile, synthetic_profile)

    try:
        if args.synthetic_quality:
            means = parse_means(args.synthetic_quality)
            if len(means) != len(names):
                raise UsageError(f"--synthetic-quality gives {len(means)} means for {len(names)} stages")
            prof = synthetic_profile(means, seed=args.seed, models=names)
            return stage_profile(prof, names, {n: n for n in names}, kind=SYNTHETIC)
        path = builtin_profile_path(args.quality) if args.quality in BUILTIN_PROFILES else Path(args.quality)
        if not Path(path).exists():
            raise UsageError(f"--quality: no such file or built-in profile: {args.quality}")
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # dropped rows are recorded in the profile's notes
            prof = load_quality(path, args.quality_format)
        return stage_profile(prof, names, parse_quality_map(args.quality_map))
    except (QualityFormatError, QualityInputError) as e:
        raise UsageError(str(e)) from None


class _Progress:
    """tqdm bar over routing evaluations; tables and MILP solves in the postfix."""

    def __init__(self, disabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(desc="planning", unit="eval", file=sys.stderr, disable=disabled, leave=False)
        self.counts = {"table": 0, "milp": 0, "simulate": 0}

    def __call__(self, event: str, n: int) -> None:
        if event == "eval":
            self.bar.update(n)
        else:
            self.counts[event] = self.counts.get(event, 0) + n
            self.bar.set_postfix(tables=self.counts["table"], milp=self.counts["milp"], refresh=False)

    def close(self) -> None:
        self.bar.close()


def _fmt_s(x) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.2f}"


def format_plan(plan, trace_name: str, wall_s: float) -> str:
    """The summary the command prints (pure: plan in, text out)."""
    q, pr, st = plan.quality, plan.prediction, dict(plan.search)
    head = f"{'stage':<6}{'model':<32}{'GPU':<10}{'GPUs':>5}  {'layouts':<22}{'threshold':>10}{'share':>8}{'p95 (s)':>9}"
    lines = [f"cascade {' -> '.join(m.name for m in plan.models)} on {plan.cluster.describe()}; trace {trace_name} "
             f"({plan.workload.n_requests} requests, {plan.workload.mean_rate_rps:.2f} req/s); "
             f"objective {pr.objective}", head]
    for i, s in enumerate(plan.stages):
        thr = "-" if s.threshold is None else f"{s.threshold:g}"
        lines.append(f"{i:<6}{s.model:<32}{s.gpu:<10}{s.n_gpus:>5}  {s.describe_layouts():<22}{thr:>10}"
                     f"{s.share:>8.1%}{_fmt_s(s.predicted_p95_s):>9}")
    label = {"perfect-judge": "PERFECT JUDGE (routing on 0/1 correctness)", "synthetic": "SYNTHETIC profile",
             "real": "real judge scores"}[q.kind]
    mapping = ", ".join(f"{a}={b}" for a, b in q.stage_to_profile)
    lines += [
        f"quality {q.predicted:.1f} (target {q.target:g}; all to last {q.all_to_last:.1f}, all stop at first "
        f"{q.all_stop_first:.1f}) -- {label}: {q.source}; {q.scale}; mapping {mapping}",
        f"predicted end-to-end p95 {_fmt_s(pr.e2e_p95_s)} s (full-cascade simulation), max stage p95 "
        f"{_fmt_s(pr.max_stage_p95_s)} s, max sustainable rate {_fmt_s(pr.max_sustainable_rate_rps)} req/s",
        (f"judge: an LLM served by {plan.judge.served_by}: {plan.judge.prompt_overhead_tokens}-token template + "
         f"question + answer in, {plan.judge.output_tokens} tokens out per verdict, in that stage's load"
         if plan.judge.served_by else f"judge: {plan.judge.name}, {plan.judge.latency_s * 1e3:g} ms per verdict"),
        f"solver {pr.solver} {pr.solver_status}: objective {_fmt_s(pr.solver_objective_s)} s, bound "
        f"{_fmt_s(pr.solver_bound_s)} s, gap {pr.solver_gap:.2%}",
        f"search: {st.get('threshold_grid_points', 0):.0f} threshold-grid points, "
        f"{st.get('routing_evaluations', 0):.0f} evaluated in {st.get('search_rounds', 0):.0f} refinement rounds; "
        f"{st.get('milp_solves', 0):.0f} MILP solves ({st.get('milp_memo_hits', 0):.0f} memo hits); "
        f"{st.get('latency_tables', 0):.0f} latency tables ({st.get('table_simulations', 0):.0f} simulations, "
        f"{st.get('table_cache_hits', 0):.0f} cache hits); {st.get('cascade_simulations', 0):.0f} cascade "
        f"simulations; {wall_s:.1f} s",
    ]
    if plan.alternatives:
        lines.append(f"sub-cascades ({st.get('sub_cascades_planned', 0):.0f} planned; the search counts above are "
                     f"their sum):")
        chosen = " -> ".join(m.name for m in plan.models)
        for label, p95, why in plan.alternatives:
            mark = "*" if label == chosen else " "
            lines.append(f"  {mark} {label}: " + (f"predicted end-to-end p95 {_fmt_s(p95)} s" if not why else why))
    return "\n".join(lines)


def plot_front(plan, path: str) -> None:
    """Latency-quality Pareto front with the chosen plan and the target marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    lat = [p.latency_s for p in plan.front]
    qual = [p.quality for p in plan.front]
    ax.plot(lat, qual, "o-", label="Pareto front (Tchebycheff sweep)")
    ax.plot([plan.prediction.solver_objective_s], [plan.quality.predicted], "r*", ms=14, label="chosen plan")
    if plan.quality.target is not None:
        ax.axhline(plan.quality.target, color="grey", ls="--", label=f"q_min {plan.quality.target:g}")
    ax.set_xlabel(f"deployment objective ({plan.prediction.objective}) p95 latency (s)")
    ax.set_ylabel("mean quality (0-100)")
    kind = "" if plan.quality.kind == "real" else f" [{plan.quality.kind}]"
    ax.set_title(" -> ".join(m.name for m in plan.models) + kind, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_plan(args: argparse.Namespace) -> int:
    from cascadia.cli import UsageError, _load_trace
    from cascadia.plan import JudgeInfo, Plan
    from cascadia.specs.cluster import parse_cluster
    from cascadia.specs.model import SpecError

    wall0 = time.perf_counter()
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib (pip install matplotlib)") from None
    if not 0.0 <= args.q_min <= 100.0:
        raise UsageError(f"--q-min must be a mean score on 0-100, got {args.q_min:g}")
    if not 0.0 < args.share_quantum <= 1.0:
        raise UsageError("--share-quantum must be in (0, 1]")
    if args.judge_latency_ms < 0:
        raise UsageError("--judge-latency-ms must be >= 0")
    models = _models(args.cascade)
    if args.judge_model and args.judge_model not in [m.name for m in models]:
        raise UsageError(f"--judge-model {args.judge_model!r} is not in the cascade {[m.name for m in models]}")
    if args.judge_output_tokens < 1:
        raise UsageError("--judge-output-tokens must be >= 1")
    try:
        cluster = parse_cluster(args.cluster)
    except SpecError as e:
        raise UsageError(f"--cluster: {e}") from None
    trace = _load_trace(args)
    profile, source = _quality(args, [m.name for m in models])

    from planner.bilevel import Infeasible, PlannerOptions, plan

    opts = PlannerOptions(objective=args.objective, solver=args.solver, share_quantum=args.share_quantum,
                          seed=args.seed, cache_dir=args.cache_dir, processes=args.processes,
                          sub_cascades=not args.no_sub_cascades)
    judge = JudgeInfo(name=f"profile judge ({source.kind}: {source.source})", score_low=0.0, score_high=100.0,
                      latency_s=args.judge_latency_ms / 1e3, served_by=args.judge_model or None,
                      output_tokens=args.judge_output_tokens)
    progress = _Progress(args.no_progress)
    try:
        result = plan(models, cluster, trace, profile, args.q_min, quality_source=source, judge=judge,
                      options=opts, progress=progress)
    finally:
        progress.close()
    if isinstance(result, Infeasible):
        raise UsageError(result.reason)
    assert isinstance(result, Plan)
    result.save(args.out)
    print(format_plan(result, trace.name, time.perf_counter() - wall0))
    if args.plot:
        plot_front(result, args.plot)
        print(f"wrote {args.plot}")
    print(f"wrote {args.out}")
    return 0
