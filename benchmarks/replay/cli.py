"""`cascadia replay`, `cascadia report` and `cascadia profile-quality`: argument parsing and
the steps each command runs. Only argparse loads at registration; aiohttp, numpy's users
and transformers load when a command runs. Bad input raises cascadia.cli.UsageError (one
line on stderr, exit code 2)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path


def add_replay_parsers(sub) -> None:
    p = sub.add_parser(
        "replay", help="replay a trace against a live OpenAI-compatible endpoint and record every request",
        description="Open-loop client: requests are released on the trace's (time-scaled) timestamps or on a "
                    "Poisson/gamma process, whatever the server's speed; each one streams, and its send time, "
                    "TTFT, every token time, E2E, token counts, status and answering stage are written as one "
                    "JSON line. Failed requests are recorded, never dropped. Prompts have the traced input "
                    "length (exact with the model's tokenizer when it is local, else ~1 token per word); "
                    "max_tokens is the traced output length, with ignore_eos.")
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--trace", required=True, help="trace file (Azure/BurstGPT CSV, Mooncake JSONL, ShareGPT JSON) "
                                                  "or a built-in name: azure-conv, azure-code")
    p.add_argument("--format", choices=["azure", "burstgpt", "mooncake", "sharegpt"],
                   help="trace format (default: guessed from the file)")
    p.add_argument("--limit", type=int, help="replay only the first N requests")
    p.add_argument("--window", metavar="START:END", help="use requests arriving in [START, END) seconds")
    timing = p.add_mutually_exclusive_group()
    timing.add_argument("--time-scale", type=float, default=1.0,
                        help="multiply the trace's arrival times (2 = half the rate)")
    timing.add_argument("--rate", type=float, help="ignore the trace's timestamps: a gamma renewal process at "
                                                   "this mean rate (requests/s)")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="with --rate: gamma shape (1 = Poisson, < 1 burstier; default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of --rate arrivals and of prompt words; request i is "
                                                       "sent as x-request-id replay-sSEED-i (default 0)")
    p.add_argument("--length-scale", type=float, default=1.0,
                   help="multiply input and output token counts (shrink a GPU trace for a CPU server)")
    p.add_argument("--max-concurrency", type=int, help="at most C requests in flight (default: unbounded)")
    p.add_argument("--model", help="model name to request (default: the first one /v1/models lists)")
    p.add_argument("--prompts", help="real prompts instead of synthetic ones: MT-Bench question.jsonl, or "
                                     "'mtbench' for the shipped questions (first turns, cycled)")
    p.add_argument("--endpoint", choices=["completions", "chat"],
                   help="completions (default with synthetic prompts) or chat (default with --prompts)")
    p.add_argument("--tokenizer", help="local Hugging Face model directory whose tokenizer sizes prompts "
                                       "(default: the SmolLM2 cache directory if present; 'none' = ~1 token "
                                       "per word; 'sim' = 4 characters per token, as a server on simulated "
                                       "engines counts)")
    p.add_argument("--no-ignore-eos", action="store_true",
                   help="let answers stop at EOS (default: ignore_eos, exactly the traced output length)")
    p.add_argument("--logprobs", action="store_true",
                   help="ask for the sampled tokens' logprobs (the report's judge score for servers without "
                        "Cascadia's judge_answer: 100 x exp(mean logprob), the logprob judge)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request (default 600)")
    p.add_argument("--extra-body", metavar="JSON", help="JSON object merged into every request body, e.g. "
                                                        "'{\"temperature\": 0}'")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="records file to write (JSON lines)")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser(
        "report", help="latency/SLO tables of replay records and simulator output, side by side",
        description="Reads `cascadia replay` records (JSONL) and/or `cascadia simulate --json` output and prints "
                    "TTFT, TPOT, ITL and E2E mean/p50/p90/p95/p99, throughput, failures, per-stage shares; with "
                    "--slo goodput and attainment; with --reference the minimum SLO scale at 95%% attainment "
                    "(deadline = scale x each request's latency served alone by the plan).")
    p.add_argument("inputs", nargs="+", help="records .jsonl from `cascadia replay` or .json from `cascadia "
                                             "simulate --json`")
    p.add_argument("--slo", metavar="ttft:MS,tpot:MS,e2e:MS", help="absolute SLOs in milliseconds (any subset)")
    p.add_argument("--reference", metavar="PLAN.json", help="plan whose unloaded per-request latency is each "
                                                            "request's deadline unit (see --slo-scale)")
    p.add_argument("--slo-scale", metavar="S1,S2,...", help="with --reference: report attainment at these scales "
                                                            "(default 1,2,5,10)")
    p.add_argument("--time-dilation", type=float, default=1.0, metavar="D",
                   help="replay records of a server with simulated engines at D simulated s per wall s (`serve "
                        "--time-dilation D`): report their times x D, in plan time (default 1)")
    p.add_argument("--labels", metavar="A,B,...", help="column names (default: file names)")
    p.add_argument("--plot", metavar="PNG", help="draw latency CDFs and attainment vs SLO scale")
    p.add_argument("--json", metavar="OUT", help="also write every metric as JSON")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "profile-quality", help="judge every member model of a served cascade on prompts: a quality profile",
        description="Sends each prompt to every member model of a Cascadia server (the members /v1/models lists "
                    "with a 'parent'), asking the server to score each answer with its configured judge "
                    "(`cascade: {judge_answer: true}`), and writes the planner's long profile format "
                    "(request_id, model, routing_score, quality_score, prompt) for `cascadia plan --quality`.")
    p.add_argument("--url", required=True, help="Cascadia server base URL")
    p.add_argument("--prompts", required=True, help="MT-Bench question.jsonl or 'mtbench' (the shipped questions)")
    p.add_argument("--limit", type=int, help="only the first N prompts")
    p.add_argument("--max-tokens", type=int, default=128, help="answer length cap (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    p.add_argument("--models", help="comma-separated members to profile (default: all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="profile CSV to write")
    p.set_defaults(func=cmd_profile_quality)


def _usage(msg: str):
    from cascadia.cli import UsageError

    return UsageError(msg)


def _load_trace(args):
    from cascadia.cli import _load_trace as load

    if args.rate is not None and args.rate <= 0:
        raise _usage("--rate must be > 0")
    if args.burstiness <= 0:
        raise _usage("--burstiness must be > 0")
    if args.rate is None and args.burstiness != 1.0:
        raise _usage("--burstiness only applies with --rate")
    # the trace-shape flags are simulate's; --rate here is a process of its own, applied later
    shaped = argparse.Namespace(**{**vars(args), "rate": None})
    return load(shaped)


def _prompt_source(args):
    from benchmarks.replay import prompts as pr

    if args.prompts and args.prompts not in pr.BUILTIN_PROMPTS and not Path(args.prompts).is_file():
        raise _usage(f"--prompts: no such file: {args.prompts}")
    counter = pr.SimPrompts(args.seed) if args.tokenizer == "sim" else pr.WordPrompts(args.seed)
    tok_dir = None if args.tokenizer in ("none", "sim") else (args.tokenizer or pr.default_tokenizer_dir())
    if tok_dir is not None:
        if not Path(tok_dir).is_dir():
            raise _usage(f"--tokenizer: no such directory: {tok_dir}")
        try:
            counter = pr.TokenizerPrompts(pr.load_tokenizer(tok_dir), str(tok_dir), args.seed)
        except (OSError, ValueError) as e:
            raise _usage(f"--tokenizer {tok_dir}: cannot load a tokenizer: {e}".splitlines()[0]) from None
    if not args.prompts:
        return counter
    from cascadia.errors import FileFormatError

    try:
        return pr.FilePrompts(list(pr.load_prompt_file(args.prompts).values()), args.prompts, counter)
    except (FileFormatError, ValueError) as e:
        raise _usage(f"--prompts: {e}") from None


def _extra_body(text: str | None) -> dict:
    if not text:
        return {}
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise _usage(f"--extra-body is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise _usage("--extra-body must be a JSON object")
    return doc


async def _pick_model(url: str, model: str | None) -> str:
    import aiohttp

    from benchmarks.replay.client import Unreachable, served_models

    async with aiohttp.ClientSession() as session:
        try:
            data = await served_models(session, url)
        except Unreachable as e:
            raise _usage(str(e)) from None
    ids = [str(m.get("id")) for m in data if isinstance(m, dict)]
    if model is None:
        if not ids:
            raise _usage(f"{url}/v1/models lists no model; pass --model")
        return ids[0]
    if ids and model not in ids:
        raise _usage(f"--model {model!r} is not served at {url}; it serves {ids}")
    return model


def cmd_replay(args) -> int:
    from benchmarks.replay.client import ClientConfig, replay
    from benchmarks.replay.records import OK, write_records
    from benchmarks.replay.workload import arrival_schedule, build_requests

    if not args.url.startswith(("http://", "https://")):
        raise _usage(f"--url must start with http:// or https://, got {args.url!r}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise _usage("--max-concurrency must be >= 1")
    if args.request_timeout <= 0:
        raise _usage("--request-timeout must be > 0")
    extra = _extra_body(args.extra_body)
    trace = _load_trace(args)
    model = asyncio.run(_pick_model(args.url, args.model))
    source = _prompt_source(args)
    schedule = arrival_schedule(trace, args.rate, args.burstiness, args.seed)
    requests = build_requests(trace, schedule, source)
    endpoint = args.endpoint or ("chat" if args.prompts else "completions")
    cfg = ClientConfig(url=args.url, model=model, endpoint=endpoint, max_concurrency=args.max_concurrency,
                       request_timeout_s=args.request_timeout, extra_body=extra,
                       ignore_eos=not args.no_ignore_eos, logprobs=args.logprobs,
                       request_id_prefix=f"replay-s{args.seed}")
    arrivals = f"Poisson/gamma {args.rate:g} req/s (burstiness {args.burstiness:g})" if args.rate \
        else f"trace timestamps x{args.time_scale:g}"
    print(f"replaying {len(requests)} requests of {trace.name} to {args.url} model {model!r} ({endpoint}); "
          f"arrivals: {arrivals}, over {float(schedule[-1]):.1f} s; prompts: {source.description}", file=sys.stderr)
    from tqdm import tqdm

    with tqdm(total=len(requests), unit="req", file=sys.stderr, disable=args.no_progress) as bar:
        records = asyncio.run(replay(requests, cfg, progress=bar))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_records(records, args.out)
    meta = {"url": args.url, "model": model, "endpoint": endpoint, "trace": trace.name, "requests": len(records),
            "arrivals": arrivals, "length_scale": args.length_scale, "prompts": source.description,
            "max_concurrency": args.max_concurrency, "extra_body": extra, "ignore_eos": not args.no_ignore_eos}
    Path(str(args.out) + ".meta.json").write_text(json.dumps(meta, indent=1))
    failed = sum(r.status != OK for r in records)
    errors = sorted({r.error for r in records if r.error})[:3]
    print(f"wrote {len(records)} records to {args.out}: {len(records) - failed} ok, {failed} failed"
          + (f" (e.g. {'; '.join(errors)})" if errors else ""))
    return 0


def cmd_report(args) -> int:
    from benchmarks.replay.report import report_main

    return report_main(args)


def cmd_profile_quality(args) -> int:
    from benchmarks.replay.profile_quality import profile_quality_main

    return profile_quality_main(args)
