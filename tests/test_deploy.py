"""deploy/ checked with real validators: the Ray cluster launcher config against the schema
shipped inside the `ray` package, the Kubernetes core objects with kubernetes-validate, the
commands they run against Cascadia's own argument parser, and the Grafana dashboard's
queries against the metrics the server exports. (The KubeRay RayCluster is checked for
its commands only: its CRD schema is not available offline here -- see docs/deploy.md.)"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def _cascadia_commands(text: str) -> list[list[str]]:
    """Every `cascadia ...` invocation in a shell string, as argv after `cascadia`."""
    out = []
    for m in re.finditer(r"cascadia (serve|plan|simulate)([^&;>\n]*)", text):
        out.append([m.group(1), *shlex.split(m.group(2))])
    return out


def _parse(argv: list[str]):
    from cascadia.cli import build_parser

    return build_parser().parse_args(argv)


def test_ray_cluster_config_follows_the_schema_shipped_with_ray():
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    nodes = config["available_node_types"]
    gpus = sum(n["resources"]["GPU"] * max(n["min_workers"], 1 if name == config["head_node_type"] else 0)
               for name, n in nodes.items())
    assert gpus == 32  # 4 nodes x 8 H100
    commands = [c for line in config["head_start_ray_commands"] for c in _cascadia_commands(line)]
    assert commands, "the head does not start cascadia"
    for argv in commands:
        args = _parse(argv)
        assert args.plan and args.engine == "vllm" and args.address == "auto" and args.host == "0.0.0.0"


def test_ray_cluster_config_with_a_mistake_is_rejected():
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    config["max_workers"] = "three"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, schema)


@pytest.mark.parametrize("name", ["service.yaml", "configmap-example.yaml"])
def test_kubernetes_objects_validate(name):
    import kubernetes_validate

    for doc in yaml.safe_load_all((DEPLOY / "kuberay" / name).read_text()):
        kubernetes_validate.validate(doc, "1.30", strict=True)


def test_kubernetes_validate_catches_a_broken_service():
    import kubernetes_validate

    doc = yaml.safe_load((DEPLOY / "kuberay" / "service.yaml").read_text())
    doc["spec"]["ports"][0]["port"] = "eight thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, "1.30", strict=True)


def test_service_selects_the_head_and_is_scraped():
    svc = yaml.safe_load((DEPLOY / "kuberay" / "service.yaml").read_text())
    cluster = yaml.safe_load((DEPLOY / "kuberay" / "raycluster.yaml").read_text())
    head_labels = cluster["spec"]["headGroupSpec"]["template"]["metadata"]["labels"]
    assert all(head_labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    ann = svc["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/path"] == "/metrics"
    assert ann["prometheus.io/port"] == str(svc["spec"]["ports"][0]["targetPort"]) == "8000"
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["resources"]["limits"]["nvidia.com/gpu"] == 8
    workers = cluster["spec"]["workerGroupSpecs"][0]
    assert workers["replicas"] == 3 and workers["template"]["spec"]["containers"][0]["resources"]["limits"][
        "nvidia.com/gpu"] == 8
    commands = [c for arg in head["args"] for c in _cascadia_commands(arg)]
    assert commands
    for argv in commands:
        args = _parse(argv)
        assert args.plan == "/etc/cascadia/plan.json" and args.port == 8000 and args.host == "0.0.0.0"
    probe = head["readinessProbe"]["httpGet"]
    assert probe["path"] == "/health/ready" and probe["port"] == 8000


def _replan_once(registry) -> None:
    """The online re-planning controller on `registry`, through one evaluation (a rate
    shift held past its hold time; the planner keeps the plan)."""
    from router.cascade import Cascade, Stage
    from router.judges import LogprobJudge
    from router.monitor import WorkloadMonitor
    from router.replanner import ReplanController, ReplanPolicy
    from test_replan import Clock, FakePlanner, decision, plan_like, run_for

    clock = Clock()
    monitor = WorkloadMonitor(2, window_s=10.0, clock=clock)
    cascade = Cascade([Stage("small", object(), 60.0), Stage("large", object(), None)], LogprobJudge())
    c = ReplanController(cascade, plan_like(4.0), monitor, FakePlanner([decision(False)]), None,
                         policy=ReplanPolicy(hold_s=10.0, cooldown_s=30.0, check_every_s=1.0, min_requests=10),
                         registry=registry, log=lambda _: None)
    k = run_for(c, monitor, clock, rate_rps=4.0, seconds=12, start_id=0, stage_of=lambda k: int(k % 10 < 3))
    run_for(c, monitor, clock, rate_rps=12.0, seconds=25, start_id=k, stage_of=lambda k: int(k % 10 < 3))
    assert len(c.events) == 1


def _exported_metric_names() -> set[str]:
    """Sample names a running server exports, after one answered request and a scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    from router.cascade import CascadeResult, StageVisit, Timings, Usage
    from router.metrics import RouterMetrics
    from router.pool import ReplicaPool
    from test_router_front import FakeEngine

    m = RouterMetrics()
    usage = Usage(4, 8)
    visits = (StageVisit(0, "small", 20.0, False, 0.1, 0.01, usage), StageVisit(1, "large", None, True, 0.2, 0.0, usage))
    m.record_result("cascade", CascadeResult(text="x", stage_index=1, stage_name="large", scores=(20.0, float("nan")),
                                             usage=usage, timings=Timings(0.1, 0.3, 0.01), finish_reason="length",
                                             visits=visits))
    failed = (StageVisit(0, "small", float("-inf"), False, 0.1, 0.5, usage),) + visits[1:]  # the judge failed
    m.record_result("cascade", CascadeResult(text="x", stage_index=1, stage_name="large", scores=(float("-inf"),),
                                             usage=usage, timings=Timings(0.1, 0.3, 0.5), finish_reason="length",
                                             visits=failed))
    m.record_failure("cascade", "overloaded")
    pool = ReplicaPool([FakeEngine("small")], max_queue=4)
    pool.heal_times_s.append(3.0)
    m.set_stage_state("small", in_flight=1, healthy=True, pool=pool)
    _replan_once(m.registry)
    names = set()
    for fam in text_string_to_metric_families(m.exposition().decode()):
        names |= {s.name for s in fam.samples}
    return names


def test_grafana_dashboard_queries_name_exported_metrics():
    dash = json.loads((DEPLOY / "grafana" / "cascadia.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    exported = _exported_metric_names()
    used = {name for e in exprs for name in re.findall(r"\b((?:cascadia|process)_[a-z_]+)\b", e)}
    assert used and not (used - exported), f"not exported: {sorted(used - exported)}"
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for topic in ("stage shares", "escalations", "ttft", "end-to-end", "queue depth", "replica health",
                  "re-planning"):
        assert topic in titles


def test_dockerfile_copies_what_exists_and_installs_the_serving_extra():
    text = (DEPLOY / "Dockerfile").read_text()
    for src in re.findall(r"^COPY (\S+)", text, flags=re.M):
        assert (ROOT / src).exists(), src
    extras = __import__("tomllib").loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "serve" in extras and '".[serve]"' in text


def test_docs_dry_run_commands_are_the_ones_the_benchmark_runs():
    """docs/deploy.md's loopback dry run shows exactly the commands benchmarks/cluster_dry_run.py
    runs with its defaults (ADDRESS standing for the cluster it starts), and each parses."""
    from benchmarks.cluster_dry_run import DryRun, commands

    text = (ROOT / "docs" / "deploy.md").read_text()
    section = text.split("## 1b.", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    shown = [shlex.split(line) for line in blocks[1].replace("\\\n", " ").splitlines() if line.strip()]
    expected = commands(DryRun(), Path("benchmarks/results/cluster_dry_run"), "ADDRESS")
    assert [argv[1:] for argv in shown] == list(expected.values())
    for argv in shown:
        assert argv[0] == "cascadia"
        _parse(argv[1:])
    assert blocks[0].split() == ["python", "benchmarks/cluster_dry_run.py", "--out-dir",
                                 "benchmarks/results/cluster_dry_run"]
