"""Serve a list of requests on a real vLLM engine (AsyncLLM, in this process) and record
when every token arrived.

Open loop: an arrival task releases each request at its scheduled offset into a queue,
independently of how fast the engine answers; a send loop starts one streaming
generation per released request. Prompts are random token ids of exactly the requested
length, and generation ignores EOS with max_tokens = the requested output length, so
every request has the exact shape of its trace record.

Times in records are seconds since the arrival clock started (time.perf_counter based).

    python -m benchmarks.live_vllm --requests reqs.jsonl --out records.jsonl [--max-throughput]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from cascadia.vllm_adapter import AsyncEngine, EngineSettings, GenerationParams


@dataclass(frozen=True)
class LiveRequest:
    arrival_s: float
    input_tokens: int
    output_tokens: int
    request_id: str = ""


@dataclass
class LiveRecord:
    request_id: str
    arrival_s: float  # scheduled arrival
    n_in: int
    n_out_requested: int
    send_s: float | None = None
    first_token_s: float | None = None
    finish_s: float | None = None
    token_times: list[float] = field(default_factory=list)
    n_out: int = 0
    status: str = "pending"  # ok | error
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LiveRun:
    records: tuple[LiveRecord, ...]
    mode: str  # "open-loop" or "max-throughput"
    settings: dict
    effective: dict
    startup_s: float
    wall_s: float


def load_requests(path: str | Path) -> list[LiveRequest]:
    """Requests from JSON (a list, or {"requests": [...]}) or JSONL; each needs
    arrival_s, input_tokens, output_tokens (request_id optional). Sorted by arrival."""
    text = Path(path).read_text()
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:  # JSONL: one object per line
        doc = None
    if isinstance(doc, list):
        rows = doc
    elif isinstance(doc, dict):
        rows = doc["requests"] if "requests" in doc else [doc]
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    out = []
    for i, row in enumerate(rows):
        try:
            req = LiveRequest(
                arrival_s=float(row["arrival_s"]),
                input_tokens=int(row["input_tokens"]),
                output_tokens=int(row["output_tokens"]),
                request_id=str(row.get("request_id", f"req-{i}")),
            )
        except KeyError as e:
            raise ValueError(f"{path}: request {i} has no field {e.args[0]!r}") from None
        if req.input_tokens < 1 or req.output_tokens < 1 or req.arrival_s < 0:
            raise ValueError(f"{path}: request {i}: input_tokens and output_tokens must be >= 1, arrival_s >= 0")
        out.append(req)
    return sorted(out, key=lambda r: r.arrival_s)


def random_prompt(n_tokens: int, vocab_size: int, rng: random.Random) -> list[int]:
    lo = min(1000, vocab_size // 4)  # skip the special and byte tokens at the low ids
    return [rng.randrange(lo, vocab_size) for _ in range(n_tokens)]


async def _arrivals(requests: Sequence[LiveRequest], queue: asyncio.Queue, t0: float) -> None:
    for i, req in enumerate(requests):
        delay = t0 + req.arrival_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        queue.put_nowait((i, req))
    queue.put_nowait(None)


async def _serve_one(engine: AsyncEngine, req: LiveRequest, record: LiveRecord, prompt: list[int],
                     t0: float) -> None:
    params = GenerationParams(max_tokens=req.output_tokens, ignore_eos=True, detokenize=False)
    record.send_s = time.perf_counter() - t0
    try:
        async for chunk in engine.generate(record.request_id, prompt, params):
            now = time.perf_counter() - t0
            if chunk.token_ids:
                if record.first_token_s is None:
                    record.first_token_s = now
                record.token_times.extend([now] * len(chunk.token_ids))
                record.n_out += len(chunk.token_ids)
        record.finish_s = time.perf_counter() - t0
        record.status = "ok"
    except Exception as e:  # one failed request must not stop the benchmark
        record.finish_s = time.perf_counter() - t0
        record.status = "error"
        record.error = f"{type(e).__name__}: {e}"


async def serve_requests(engine: AsyncEngine, requests: Sequence[LiveRequest], *, vocab_size: int,
                         seed: int = 0) -> list[LiveRecord]:
    """Replay `requests` open-loop against a started engine; one record per request."""
    rng = random.Random(seed)
    # Prompts are made before the clock starts so building them never delays a send.
    prompts = [random_prompt(r.input_tokens, vocab_size, rng) for r in requests]
    records = [LiveRecord(request_id=r.request_id or f"req-{i}", arrival_s=r.arrival_s, n_in=r.input_tokens,
                          n_out_requested=r.output_tokens) for i, r in enumerate(requests)]
    queue: asyncio.Queue = asyncio.Queue()
    t0 = time.perf_counter()
    arrivals = asyncio.create_task(_arrivals(requests, queue, t0))
    tasks = []
    while (item := await queue.get()) is not None:
        i, req = item
        tasks.append(asyncio.create_task(_serve_one(engine, req, records[i], prompts[i], t0)))
    await arrivals
    await asyncio.gather(*tasks)
    return records


async def _warm_up(engine: AsyncEngine, vocab_size: int) -> None:
    prompt = random_prompt(32, vocab_size, random.Random(-1))
    params = GenerationParams(max_tokens=4, ignore_eos=True, detokenize=False)
    async for _ in engine.generate("warmup", prompt, params):
        pass


async def run_live_async(requests: Sequence[LiveRequest], settings: EngineSettings | None = None, *,
                         engine: AsyncEngine | None = None, max_throughput: bool = False,
                         warm_up: bool = True, seed: int = 0) -> LiveRun:
    """Serve the requests on `engine`, or on a new engine started from `settings` and shut
    down afterwards. Passing a started engine lets several runs (e.g. a rate sweep) share one."""
    from cascadia.vllm_adapter import start_async_engine

    if (engine is None) == (settings is None):
        raise ValueError("pass exactly one of settings (start an engine) or engine (reuse one)")
    if max_throughput:
        requests = [LiveRequest(0.0, r.input_tokens, r.output_tokens, r.request_id) for r in requests]
    owned = engine is None
    if owned:
        engine = start_async_engine(settings)
    try:
        effective = engine.effective_settings()
        if warm_up:
            await _warm_up(engine, effective.vocab_size)
        t0 = time.perf_counter()
        records = await serve_requests(engine, requests, vocab_size=effective.vocab_size, seed=seed)
        wall_s = time.perf_counter() - t0
    finally:
        if owned:
            engine.shutdown()
    return LiveRun(records=tuple(records), mode="max-throughput" if max_throughput else "open-loop",
                   settings=engine.settings.as_dict(), effective=effective.as_dict(),
                   startup_s=engine.startup_s, wall_s=wall_s)


def run_live(requests: Sequence[LiveRequest], settings: EngineSettings, **kwargs) -> LiveRun:
    """Start an engine, serve the requests open-loop (or all at t=0), shut it down."""
    return asyncio.run(run_live_async(requests, settings, **kwargs))


def throughput(records: Sequence[LiveRecord]) -> dict:
    """Output tokens/s and requests/s over the span from the first send to the last finish."""
    ok = [r for r in records if r.status == "ok"]
    if not ok:
        return {"requests_ok": 0, "requests_failed": len(records), "span_s": 0.0,
                "output_tokens_per_s": 0.0, "requests_per_s": 0.0}
    start = min(r.send_s for r in ok if r.send_s is not None)
    end = max(r.finish_s for r in ok if r.finish_s is not None)
    span = max(end - start, 1e-9)
    tokens = sum(r.n_out for r in ok)
    return {"requests_ok": len(ok), "requests_failed": len(records) - len(ok), "span_s": span,
            "output_tokens": tokens, "output_tokens_per_s": tokens / span, "requests_per_s": len(ok) / span}


def meta_path_for(out: Path) -> Path:
    """The JSON sidecar of a records file: `<out>.meta.json`."""
    out = Path(out)
    return out.with_name(out.name + ".meta.json")


def write_run(run: LiveRun, out: Path, requests_file: str | None = None) -> None:
    """JSONL, one record per line, and a sidecar with the engine settings and summary."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as fh:
        for r in run.records:
            fh.write(json.dumps(r.to_dict()) + "\n")
    meta = {
        "mode": run.mode, "requests_file": requests_file, "n_requests": len(run.records),
        "settings": run.settings, "effective": run.effective,
        "startup_s": run.startup_s, "wall_s": run.wall_s, "throughput": throughput(run.records),
    }
    meta_path_for(out).write_text(json.dumps(meta, indent=1))


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.live_vllm", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", required=True, help="JSON or JSONL with arrival_s, input_tokens, output_tokens")
    p.add_argument("--out", required=True, help="records JSONL to write (sidecar: <out>.meta.json)")
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="smollm2-135m-instruct (packaged) or a local Hugging Face model directory")
    p.add_argument("--max-throughput", action="store_true", help="submit every request at t=0")
    p.add_argument("--limit", type=int, default=None, help="serve only the first N requests")
    p.add_argument("--kv-cache-gib", type=float, default=1.0)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        requests = load_requests(args.requests)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.limit is not None:
        requests = requests[: args.limit]
    model_dir = Path(args.model).expanduser()
    if not model_dir.is_dir():
        if args.model != "smollm2-135m-instruct":
            print(f"error: {args.model} is neither a directory nor smollm2-135m-instruct", file=sys.stderr)
            return 2
        from cascadia.model_store import ModelStoreError, ensure_smollm2

        try:
            model_dir = ensure_smollm2()
        except ModelStoreError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    settings = EngineSettings(model=str(model_dir), dtype=args.dtype, kv_cache_gib=args.kv_cache_gib,
                              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                              seed=args.seed)
    run = run_live(requests, settings, max_throughput=args.max_throughput, seed=args.seed)
    write_run(run, Path(args.out), requests_file=str(args.requests))
    tp = throughput(run.records)
    print(f"{run.mode}: {tp['requests_ok']} ok, {tp['requests_failed']} failed, "
          f"{tp['output_tokens_per_s']:.1f} output tokens/s, {tp['requests_per_s']:.3f} requests/s "
          f"over {tp['span_s']:.1f} s (engine start {run.startup_s:.1f} s)")
    print(f"records: {args.out}  settings: {meta_path_for(Path(args.out))}")
    return 0 if tp["requests_failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
