"""Dry run of a 32-GPU plan on a 3-node Ray cluster on this machine (issue 7, "Must show").

Steps, each a `cascadia` command run as a user runs it (the exact commands are printed and
written to OUT/commands.txt; docs/deploy.md shows the same ones):

  1. `cascadia plan` for 4x8xH100 (the paper's cluster) on a window of the Azure
     conversation trace (or `--plan FILE`: use that plan);
  2. a Ray cluster of a head and workers on this machine (ray.cluster_utils.Cluster, the
     host's own address) whose nodes declare GPUs as resource counts; every node holds a
     whole number of the plan's nodes, so a tensor-parallel group never straddles two;
  3. `cascadia serve --plan --engine sim --address CLUSTER --time-dilation D`: each replica a
     simulated engine in a Ray actor inside its placement group;
  4. `cascadia replay` of ANOTHER window of the trace with another seed, arrivals
     compressed by D (the server's clock runs D simulated s per wall s), prompts sized as
     the simulated engines count them (`--tokenizer sim`);
  5. `cascadia simulate` of the plan on the replayed window (the simulator's own answer for
     that workload), then `cascadia report --reference plan.json --time-dilation D` of the
     live records and the simulation: E2E p95 in plan time vs the plan's prediction.

The summary separates the gap between the live p95 and the plan's prediction into the
workload's difference (the simulator on the replayed window vs the prediction), the
routing's (the simulator on that window with each request visiting the stages it visited
live) and the serving path's (live vs that simulation). Router and machine CPU use during
the replay are measured: the router must keep up for the times to mean anything.

    .venv/bin/python benchmarks/cluster_dry_run.py --out-dir benchmarks/results/cluster_dry_run
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks.router_overhead import stop_child
from benchmarks.sim_vs_live import start_server

CASCADIA = str(Path(sys.executable).with_name("cascadia"))
TARGET = 0.15  # the bound on |live E2E p95 / predicted - 1|


@dataclass(frozen=True)
class DryRun:
    """What to plan, which cluster to start, what to replay."""

    cascade: str = "llama-3-8b,llama-3-70b"
    cluster: str = "4x8xH100"
    trace: str = "azure-conv"
    quality: str = "mtbench"
    q_min: float = 88.0
    plan_window: str = "0:600"
    replay_window: str = "600:1200"
    time_scale: float = 0.1  # the trace's arrival times x this, in plan time (10x the traced rate)
    replay_seed: int = 7
    dilation: float = 1.0  # simulated s per wall s: real time (the router uses ~20% of a core)
    # warm-up answers the logprob judge's thresholds are re-derived from (the plan's are for
    # the quality profile's judge): the planned 13.8% escalation quantile needs many
    calibration_requests: int = 1000
    head_gpus: int = 0
    worker_gpus: tuple[int, ...] = (16, 16)
    port: int = 8000

    @property
    def replay_time_scale(self) -> float:
        """Arrivals in wall time: plan time / dilation."""
        return self.time_scale / self.dilation


def _num(x: float) -> str:
    return f"{x:.6g}"


def commands(run: DryRun, out: Path, address: str, plan: Path | None = None) -> dict[str, list[str]]:
    """The `cascadia` commands of the dry run (argv after `cascadia`), in order."""
    plan = plan or out / "plan.json"
    records, sim = out / "records.jsonl", out / "simulated.json"
    url = f"http://127.0.0.1:{run.port}"
    return {
        "plan": ["plan", "--cascade", run.cascade, "--cluster", run.cluster, "--trace", run.trace, "--window",
                 run.plan_window, "--time-scale", _num(run.time_scale), "--quality", run.quality, "--q-min",
                 _num(run.q_min), "--no-progress", "--out", str(plan)],
        "serve": ["serve", "--plan", str(plan), "--engine", "sim", "--address", address, "--time-dilation",
                  _num(run.dilation), "--calibration-requests", str(run.calibration_requests), "--port",
                  str(run.port)],
        "replay": ["replay", "--url", url, "--trace", run.trace, "--window", run.replay_window, "--time-scale",
                   _num(run.replay_time_scale), "--seed", str(run.replay_seed), "--tokenizer", "sim",
                   "--no-progress", "--out", str(records)],
        "simulate": ["simulate", "--plan", str(plan), "--trace", run.trace, "--window", run.replay_window,
                     "--time-scale", _num(run.time_scale), "--seed", str(run.replay_seed), "--json", str(sim)],
        "report": ["report", str(records), str(sim), "--labels", "live,simulated", "--reference", str(plan),
                   "--time-dilation", _num(run.dilation), "--json", str(out / "report.json")],
    }


def node_problem(plan, head_gpus: int, worker_gpus: tuple[int, ...]) -> str | None:
    """Why the loopback nodes cannot stand in for the plan's cluster, in one line; None if
    they can: each node must hold whole plan nodes (no TP group across two) and all of
    them the plan's GPUs."""
    pool = plan.cluster.pools[0]
    per_node = pool.gpus_per_node
    for k, gpus in enumerate((head_gpus, *worker_gpus)):
        if gpus % per_node:
            name = "the head" if k == 0 else f"worker {k}"
            return (f"{name} declares {gpus} GPUs, not a multiple of the plan's {per_node} per node: a "
                    f"tensor-parallel group could straddle two nodes")
    have = head_gpus + sum(worker_gpus)
    if have < plan.n_gpus:
        return f"the nodes declare {have} GPUs in all; the plan needs {plan.n_gpus}"
    return None


def start_cluster(run: DryRun):
    """Head and workers on this machine; logical CPUs enough for one actor per replica.
    Returns the cluster and each node's name by Ray node id."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "num_gpus": run.head_gpus, "include_dashboard": False})
    try:
        names = {cluster.head_node.node_id: "head"}
        for k, gpus in enumerate(run.worker_gpus, start=1):
            names[cluster.add_node(num_cpus=max(2, gpus), num_gpus=gpus).node_id] = f"worker{k}"
        cluster.wait_for_nodes()
    except BaseException:
        cluster.shutdown()
        raise
    return cluster, names


def replica_groups(address: str, names: dict[str, str]) -> dict[str, list[int]]:
    """Where the served replicas landed: per node, the GPU count of each placement group
    on it (read from Ray as a second driver while the server runs)."""
    import ray

    ray.init(address=address, log_to_driver=False)
    try:
        out: dict[str, list[int]] = {name: [] for name in names.values()}
        for pg in ray.util.placement_group_table().values():
            if pg["state"] != "CREATED":
                continue
            nodes = {pg["bundles_to_node_id"][i] for i in pg["bundles"]}
            gpus = int(sum(b.get("GPU", 0.0) for b in pg["bundles"].values()))
            # a group the plan spread over nodes (pipeline stages) is listed under all of them
            out.setdefault("+".join(sorted(names.get(n, n[:8]) for n in nodes)), []).append(gpus)
        return {k: sorted(v, reverse=True) for k, v in out.items()}
    finally:
        ray.shutdown()


def _cascadia(argv: list[str], log: Path | None = None) -> str:
    done = subprocess.run([CASCADIA, *argv], capture_output=True, text=True)
    if log is not None:
        log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"cascadia {argv[0]} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return done.stdout


def _cpu_s(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def replay_measured(cmd: list[str], server_pid: int, log: Path) -> dict:
    """Run the replay; CPU seconds of the router, of the replay client and of the whole
    machine over its wall time."""
    import psutil

    machine0, router0, t0 = psutil.cpu_times(), _cpu_s(server_pid), time.perf_counter()
    with open(log, "w") as out:
        client = psutil.Popen([CASCADIA, *cmd], stdout=out, stderr=subprocess.STDOUT)
        client_cpu = 0.0
        while client.poll() is None:
            try:
                client_cpu = _cpu_s(client.pid)
            except psutil.Error:  # exited between poll and read
                pass
            time.sleep(0.5)  # polling the child until it exits by itself (its own timeouts bound it)
    wall = time.perf_counter() - t0
    machine1 = psutil.cpu_times()
    busy = sum(getattr(machine1, f) - getattr(machine0, f) for f in ("user", "system", "nice", "softirq", "irq"))
    if client.returncode != 0:
        raise RuntimeError(f"cascadia replay failed ({client.returncode}); see {log}")
    return {"replay_wall_s": wall, "router_cpu_frac": (_cpu_s(server_pid) - router0) / wall,
            "replay_client_cpu_frac": client_cpu / wall, "machine_cpu_frac": busy / wall / psutil.cpu_count()}


def attribution(plan, run: DryRun, records_path: Path) -> dict:
    """The simulator on the replayed window twice: with the plan's shares (seeded as
    `cascadia simulate`), and with each request visiting exactly the stages it visited live."""
    from benchmarks.replay.records import read_records
    from cascadia.plan import simulate_plan
    from cascadia.traces import builtin_trace_path, load_trace, scale_time, window

    start, end = (float(x) for x in run.replay_window.split(":"))
    trace = scale_time(window(load_trace(builtin_trace_path(run.trace)), start, end), run.time_scale)
    records = read_records(records_path)
    n = len(plan.stages)
    live_stage = np.array([r.stage if r.stage is not None else n - 1 for r in records], dtype=np.int64)
    shares = tuple(float(np.mean(live_stage >= i)) for i in range(n))
    planned = simulate_plan(plan, trace, seed=run.replay_seed)
    as_live = _simulate_visits(plan, trace, live_stage + 1)
    return {"sim_planned_shares_e2e_p95_s": float(np.nanpercentile(planned.e2e_s, 95)),
            "sim_live_visits_e2e_p95_s": float(np.nanpercentile(as_live.e2e_s, 95)),
            "live_stage_shares": shares, "planned_stage_shares": list(plan.stage_shares)}


def _simulate_visits(plan, trace, visits: np.ndarray):
    from cascadia.sim.cluster import StageDeployment, simulate

    pools = {p.gpu.name: p for p in plan.cluster.pools}
    stages = [StageDeployment(m, (pools.get(s.gpu) or plan.cluster.pools[0]).gpu, s.replicas, plan.engine, None,
                              (pools.get(s.gpu) or plan.cluster.pools[0]).gpus_per_node)
              for s, m in zip(plan.stages, plan.models)]
    return simulate(trace, stages, visits=visits, judge_latency_s=plan.judge.latency_s,
                    judge=plan.judge.load_on([m.name for m in plan.models]))


def dry_run(run: DryRun, out: Path, plan_file: Path | None) -> dict:
    from cascadia.plan import Plan

    out.mkdir(parents=True, exist_ok=True)
    ran: list[str] = []

    def note(argv: list[str]) -> None:
        line = "cascadia " + shlex.join(argv)
        ran.append(line)
        print(f"$ {line}", flush=True)

    plan_path = out / "plan.json"
    if plan_file is None:
        cmd = commands(run, out, "ADDRESS")["plan"]
        note(cmd)
        print(_cascadia(cmd, out / "plan.log"), flush=True)
    elif plan_file.resolve() != plan_path.resolve():
        plan_path.write_text(plan_file.read_text())
    plan = Plan.load(plan_path)
    problem = node_problem(plan, run.head_gpus, run.worker_gpus)
    if problem:
        raise ValueError(problem)
    cluster, names = start_cluster(run)
    print(f"Ray cluster at {cluster.address}: head {run.head_gpus} GPUs, workers {list(run.worker_gpus)} GPUs",
          flush=True)
    try:
        cmds = commands(run, out, cluster.address)
        note(cmds["serve"])
        server, url = start_server([CASCADIA, *cmds["serve"]], out / "serve.log")
        try:
            groups = replica_groups(cluster.address, names)
            print(f"replicas' GPU groups per node: {groups}", flush=True)
            note(cmds["replay"])
            load = replay_measured(cmds["replay"], server.pid, out / "replay.log")
        finally:
            stop_child(server, 120.0)
    finally:
        cluster.shutdown()
    note(cmds["simulate"])
    _cascadia(cmds["simulate"], out / "simulate.log")
    note(cmds["report"])
    report = _cascadia(cmds["report"], out / "report.txt")
    print(report, flush=True)
    (out / "commands.txt").write_text("\n".join(ran) + "\n")
    results = {r["label"]: r for r in json.loads((out / "report.json").read_text())}
    predicted = plan.prediction.e2e_p95_s
    live = results["live"]["e2e_s"]["p95"]
    summary = {"config": asdict(run), "url": url, "replica_gpu_groups_per_node": groups,
               "plan_e2e_p95_s": predicted, "live_e2e_p95_s": live,
               "live_vs_plan": live / predicted - 1.0, "within_target": abs(live / predicted - 1.0) <= TARGET,
               "sim_replayed_window_e2e_p95_s": results["simulated"]["e2e_s"]["p95"],
               "live_failed": results["live"]["failed"], "live_requests": results["live"]["requests"],
               **load, **attribution(plan, run, out / "records.jsonl")}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def print_summary(s: dict) -> None:
    pct = lambda x: f"{x:+.1%}"  # noqa: E731
    print(f"replicas' GPU groups per node {s['replica_gpu_groups_per_node']}")
    print(f"plan prediction E2E p95     {s['plan_e2e_p95_s']:.2f} s (its planning window)")
    print(f"live dry run E2E p95        {s['live_e2e_p95_s']:.2f} s  {pct(s['live_vs_plan'])} vs the plan "
          f"({'within' if s['within_target'] else 'OUTSIDE'} {TARGET:.0%}); {s['live_failed']} of "
          f"{s['live_requests']} failed")
    print(f"simulator, replayed window  {s['sim_replayed_window_e2e_p95_s']:.2f} s  "
          f"{pct(s['sim_replayed_window_e2e_p95_s'] / s['plan_e2e_p95_s'] - 1)} vs the plan (workload)")
    print(f"  ... with the live visits  {s['sim_live_visits_e2e_p95_s']:.2f} s; live vs it: "
          f"{pct(s['live_e2e_p95_s'] / s['sim_live_visits_e2e_p95_s'] - 1)} (serving path)")
    print(f"stage shares live {[round(x, 3) for x in s['live_stage_shares']]}, planned "
          f"{[round(x, 3) for x in s['planned_stage_shares']]}")
    print(f"CPU during the replay ({s['replay_wall_s']:.0f} s): router {s['router_cpu_frac']:.0%} of a core, "
          f"replay client {s['replay_client_cpu_frac']:.0%}, machine {s['machine_cpu_frac']:.0%} of all cores")


def main(argv: list[str] | None = None) -> int:
    d = DryRun()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Writes plan.json, records.jsonl, simulated.json, report.txt/json, "
                                        "serve.log, commands.txt and summary.json to --out-dir.")
    ap.add_argument("--out-dir", required=True, help="where to write the results")
    ap.add_argument("--plan", help="use this plan file instead of running `cascadia plan`")
    ap.add_argument("--cascade", default=d.cascade, help=f"models, weakest first (default {d.cascade})")
    ap.add_argument("--cluster", default=d.cluster, help=f"the plan's GPU cluster (default {d.cluster})")
    ap.add_argument("--q-min", type=float, default=d.q_min, help=f"quality target (default {d.q_min:g})")
    ap.add_argument("--plan-window", default=d.plan_window, help=f"trace window planned for (default {d.plan_window})")
    ap.add_argument("--replay-window", default=d.replay_window,
                    help=f"trace window replayed; should differ from --plan-window (default {d.replay_window})")
    ap.add_argument("--time-scale", type=float, default=d.time_scale,
                    help=f"trace arrival times x this, in plan time (default {d.time_scale:g})")
    ap.add_argument("--seed", type=int, default=d.replay_seed, help=f"replay seed (default {d.replay_seed})")
    ap.add_argument("--dilation", type=float, default=d.dilation,
                    help=f"simulated s per wall s of the served engines (default {d.dilation:g}); lower it "
                         "until the router keeps up")
    ap.add_argument("--calibration-requests", type=int, default=d.calibration_requests,
                    help=f"warm-up answers per judged stage for the thresholds (default {d.calibration_requests})")
    ap.add_argument("--head-gpus", type=int, default=d.head_gpus, help=f"GPUs of the head (default {d.head_gpus})")
    ap.add_argument("--worker-gpus", default=",".join(map(str, d.worker_gpus)),
                    help="GPUs per worker node, comma-separated (default 16,16: 3 nodes in all)")
    ap.add_argument("--port", type=int, default=d.port, help=f"router port on 127.0.0.1 (default {d.port})")
    args = ap.parse_args(argv)
    try:
        workers = tuple(int(x) for x in args.worker_gpus.split(","))
    except ValueError:
        ap.error(f"--worker-gpus: expected comma-separated integers, got {args.worker_gpus!r}")
    if args.dilation <= 0 or args.time_scale <= 0:
        ap.error("--dilation and --time-scale must be > 0")
    if args.replay_window == args.plan_window and not args.plan:
        ap.error("--replay-window must differ from --plan-window (the dry run replays unseen traffic)")
    if args.plan and not Path(args.plan).is_file():
        ap.error(f"--plan: no such file: {args.plan}")
    run = DryRun(cascade=args.cascade, cluster=args.cluster, q_min=args.q_min, plan_window=args.plan_window,
                 replay_window=args.replay_window, time_scale=args.time_scale, replay_seed=args.seed,
                 dilation=args.dilation, calibration_requests=args.calibration_requests, head_gpus=args.head_gpus,
                 worker_gpus=workers, port=args.port)
    try:
        summary = dry_run(run, Path(args.out_dir), Path(args.plan) if args.plan else None)
    except (ValueError, RuntimeError) as e:
        print(f"cluster_dry_run: error: {e}", file=sys.stderr)
        return 2
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
