"""Plan files: what the planner decided and what it predicted, for `cascadia serve`,
`cascadia simulate --plan` and re-planning.

A plan is JSON with a ``schema_version``. It is self-contained: model specs (with where
the weights come from), the cluster's GPU figures and the engine settings are stored, so
a plan simulates and deploys without the catalog it was made with. ``Plan.load`` checks
every field and raises ``PlanError`` naming it (``stages[1].replicas[0].tp: ...``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from cascadia.perf.layout import Layout
from cascadia.sim.config import EngineConfig
from cascadia.specs.cluster import ClusterSpec, NodePool
from cascadia.specs.gpu import GPUSpec
from cascadia.specs.model import ModelSpec, SpecError
from cascadia.traces import Trace, TraceSummary

SCHEMA_VERSION = 1
QUALITY_KINDS = ("real", "perfect-judge", "synthetic")


class PlanError(ValueError):
    """A plan file is malformed; ``field`` is the dotted path of the offending value."""

    def __init__(self, field: str, what: str):
        self.field = field
        super().__init__(f"{field}: {what}")


@dataclass(frozen=True)
class StageEndpoint:
    """A stage served by an external OpenAI-compatible endpoint instead of our engines."""

    url: str  # base URL, e.g. https://api.example.com/v1 (http or https)
    model: str | None = None  # the endpoint's model id; None: the stage's model name
    api_key_env: str | None = None  # environment variable holding the API key, if one is needed


def endpoint_url_problem(url: str) -> str | None:
    """What is wrong with an endpoint URL, or None when it is usable."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # raises on a non-numeric port
    except ValueError as e:
        return f"malformed URL {url!r} ({e})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"malformed URL {url!r}: expected http(s)://HOST[:PORT][/PATH]"
    return None


@dataclass(frozen=True)
class PlanStage:
    """One cascade stage as deployed. ``share``: fraction of requests that visit it (from
    the quality replay); ``planned_share``: the share the GPUs were sized for (>= share).
    ``threshold`` is None for the last stage, which always answers."""

    model: str
    gpu: str
    replicas: tuple[Layout, ...]
    threshold: float | None
    share: float
    planned_share: float
    predicted_p95_s: float | None  # None when the stage has no GPUs (share 0)
    endpoint: StageEndpoint | None = None  # served by an external endpoint; None: by our engines

    @property
    def n_gpus(self) -> int:
        return sum(r.n_gpus for r in self.replicas)

    def describe_layouts(self) -> str:
        counts: dict[str, int] = {}
        for r in self.replicas:
            counts[r.describe()] = counts.get(r.describe(), 0) + 1
        return " + ".join(f"{n}x{k}" for k, n in counts.items()) or "-"


@dataclass(frozen=True)
class JudgeInfo:
    """The live judge the thresholds are for, on its declared score scale."""

    name: str
    score_low: float
    score_high: float
    latency_s: float = 0.0
    served_by: str | None = None  # a cascade model when the judge is an LLM in the cascade
    # Size of one judge request on that model (used only with served_by): the grading
    # template around question and answer, and the rating it writes.
    prompt_overhead_tokens: int = 200
    output_tokens: int = 8

    def load_on(self, models: Sequence[str]):
        """The `JudgeLoad` the simulator applies when a cascade member serves the judge."""
        if not self.served_by:
            return None
        from cascadia.sim.cluster import JudgeLoad

        if self.served_by not in models:
            raise ValueError(f"judge served_by {self.served_by!r} is not a model of the cascade {list(models)}")
        return JudgeLoad(list(models).index(self.served_by), self.prompt_overhead_tokens, self.output_tokens)


@dataclass(frozen=True)
class QualityInfo:
    """Predicted mean quality (0-100) and where the numbers come from."""

    predicted: float
    target: float | None
    all_to_last: float  # z1*: everything goes to the last stage
    all_stop_first: float  # z2*: everything stops at the first stage
    kind: str  # real | perfect-judge | synthetic
    source: str
    stage_to_profile: tuple[tuple[str, str], ...]
    scale: str
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Prediction:
    e2e_p95_s: float  # full-cascade simulation of this plan on the planning trace
    max_stage_p95_s: float
    max_sustainable_rate_rps: float | None
    objective: str  # max-stage | end-to-end
    solver: str
    solver_status: str
    solver_objective_s: float
    solver_bound_s: float
    solver_gap: float
    simulation_seed: int
    simulation_seeds: int = 1  # e2e_p95_s pools this many seeded simulations (seed, seed+1, ...)


@dataclass(frozen=True)
class FrontPoint:
    thresholds: tuple[float, ...]
    quality: float
    latency_s: float


@dataclass(frozen=True)
class Plan:
    models: tuple[ModelSpec, ...]  # the cascade, weakest first; weights in ModelSpec.weights
    cluster: ClusterSpec
    engine: EngineConfig
    stages: tuple[PlanStage, ...]
    judge: JudgeInfo
    quality: QualityInfo
    prediction: Prediction
    workload: TraceSummary
    input_hashes: tuple[tuple[str, str], ...]
    front: tuple[FrontPoint, ...] = ()
    search: tuple[tuple[str, float], ...] = ()  # grid size, evaluations, memo hits, wall time...
    # (cascade label "a -> b", predicted e2e p95 s or nan, why not planned) for every
    # sub-cascade the planner considered; empty when it planned the requested cascade only
    alternatives: tuple[tuple[str, float, str], ...] = ()
    schema_version: int = SCHEMA_VERSION

    @property
    def thresholds(self) -> tuple[float, ...]:
        return tuple(float(s.threshold) for s in self.stages[:-1])

    @property
    def stage_shares(self) -> tuple[float, ...]:
        return tuple(s.share for s in self.stages)

    @property
    def n_gpus(self) -> int:
        return sum(s.n_gpus for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "cascade": [{"name": m.name, "weights": dataclasses.asdict(m.weights), "spec": m.to_dict()}
                        for m in self.models],
            "cluster": {"describe": self.cluster.describe(),
                        "pools": [{"gpu": p.gpu.to_dict(), "nodes": p.n_nodes, "gpus_per_node": p.gpus_per_node}
                                  for p in self.cluster.pools]},
            "engine": self.engine.to_dict(),
            "stages": [{"model": s.model, "gpu": s.gpu, "n_gpus": s.n_gpus,
                        "replicas": [{"tp": r.tp, "pp": r.pp,
                                      "stage_nodes": list(r.stage_nodes) if r.stage_nodes is not None else None}
                                     for r in s.replicas],
                        "threshold": s.threshold, "share": s.share, "planned_share": s.planned_share,
                        "predicted_p95_s": s.predicted_p95_s,
                        **({"endpoint": dataclasses.asdict(s.endpoint)} if s.endpoint else {})}
                       for s in self.stages],
            "judge": dataclasses.asdict(self.judge),
            "quality": dataclasses.asdict(self.quality),
            "prediction": dataclasses.asdict(self.prediction),
            "workload": self.workload.as_dict(),
            "input_hashes": dict(self.input_hashes),
            "front": [dataclasses.asdict(p) for p in self.front],
            "search": dict(self.search),
            "alternatives": [{"cascade": c, "predicted_e2e_p95_s": p95, "not_planned": why}
                             for c, p95, why in self.alternatives],
        }

    def save(self, path: str | Path) -> None:
        # NaN/inf are not JSON: write them as null (the loader reads null back as nan where allowed).
        Path(path).write_text(json.dumps(_json_safe(self.to_dict()), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        try:
            doc = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise PlanError(str(path), "no such plan file") from None
        except json.JSONDecodeError as e:
            raise PlanError(f"{path}:{e.lineno}", f"not valid JSON ({e.msg})") from None
        return cls.from_dict(doc)

    @classmethod
    def from_dict(cls, doc: Any) -> "Plan":
        return _parse_plan(_Node(doc, "plan"))


def _json_safe(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


class _Node:
    """A value inside the plan document and its dotted path, for errors that name the field."""

    def __init__(self, value: Any, path: str):
        self.value, self.path = value, path

    def field(self, key: str) -> "_Node":
        if not isinstance(self.value, dict):
            raise PlanError(self.path, f"expected an object, got {type(self.value).__name__}")
        if key not in self.value:
            raise PlanError(f"{self.path}.{key}", "missing")
        return _Node(self.value[key], f"{self.path}.{key}")

    def opt(self, key: str) -> "_Node":
        return self.field(key) if isinstance(self.value, dict) and key in self.value else _Node(None, f"{self.path}.{key}")

    def items(self) -> list["_Node"]:
        if not isinstance(self.value, list):
            raise PlanError(self.path, f"expected a list, got {type(self.value).__name__}")
        return [_Node(v, f"{self.path}[{i}]") for i, v in enumerate(self.value)]

    def text(self) -> str:
        if not isinstance(self.value, str) or not self.value:
            raise PlanError(self.path, f"expected a non-empty string, got {self.value!r}")
        return self.value

    def integer(self, minimum: int | None = None) -> int:
        if isinstance(self.value, bool) or not isinstance(self.value, int):
            raise PlanError(self.path, f"expected an integer, got {self.value!r}")
        if minimum is not None and self.value < minimum:
            raise PlanError(self.path, f"must be >= {minimum}, got {self.value}")
        return self.value

    def number(self, lo: float = -math.inf, hi: float = math.inf, nullable: bool = False) -> float:
        if self.value is None and nullable:
            return math.nan
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)):
            raise PlanError(self.path, f"expected a number, got {self.value!r}")
        if not lo <= self.value <= hi:
            raise PlanError(self.path, f"must be in [{lo:g}, {hi:g}], got {self.value}")
        return float(self.value)

    def mapping(self) -> dict[str, Any]:
        if not isinstance(self.value, dict):
            raise PlanError(self.path, f"expected an object, got {type(self.value).__name__}")
        return self.value

    def build(self, factory: Callable[..., Any]) -> Any:
        try:
            return factory(self.mapping())
        except (SpecError, TypeError, ValueError, KeyError) as e:
            raise PlanError(self.path, str(e)) from None


def _parse_layout(node: _Node) -> Layout:
    tp, pp = node.field("tp").integer(1), node.field("pp").integer(1)
    nodes = node.opt("stage_nodes")
    stage_nodes = None if nodes.value is None else tuple(n.integer(0) for n in nodes.items())
    if stage_nodes is not None and len(stage_nodes) != pp:
        raise PlanError(nodes.path, f"has {len(stage_nodes)} entries for pp={pp}")
    return Layout(tp, pp, stage_nodes)


def _parse_stage(node: _Node, last: bool) -> PlanStage:
    thr = node.field("threshold")
    if last and thr.value is not None:
        raise PlanError(thr.path, "the last stage always answers: must be null")
    replicas = tuple(_parse_layout(r) for r in node.field("replicas").items())
    stage = PlanStage(
        model=node.field("model").text(), gpu=node.field("gpu").text(), replicas=replicas,
        threshold=None if last else thr.number(), share=node.field("share").number(0.0, 1.0),
        planned_share=node.field("planned_share").number(0.0, 1.0),
        predicted_p95_s=None if node.field("predicted_p95_s").value is None
        else node.field("predicted_p95_s").number(0.0), endpoint=_parse_endpoint(node.opt("endpoint")))
    declared = node.opt("n_gpus")
    if declared.value is not None and declared.integer(0) != stage.n_gpus:
        raise PlanError(declared.path, f"says {declared.value} but the replicas use {stage.n_gpus} GPUs")
    if stage.share > 0 and not replicas and stage.endpoint is None:
        raise PlanError(f"{node.path}.replicas", f"stage sees {stage.share:.1%} of requests but has no replicas")
    return stage


def _parse_endpoint(node: _Node) -> StageEndpoint | None:
    if node.value is None:
        return None
    url = node.field("url").text()
    problem = endpoint_url_problem(url)
    if problem:
        raise PlanError(f"{node.path}.url", problem)
    model, key_env = node.opt("model"), node.opt("api_key_env")
    return StageEndpoint(url, None if model.value is None else model.text(),
                         None if key_env.value is None else key_env.text())


def _parse_cluster(node: _Node) -> ClusterSpec:
    pools = []
    for p in node.field("pools").items():
        gpu = p.field("gpu").build(GPUSpec.from_dict)
        pools.append(NodePool(gpu, p.field("nodes").integer(1), p.field("gpus_per_node").integer(1)))
    if not pools:
        raise PlanError(f"{node.path}.pools", "no node pools")
    return ClusterSpec(tuple(pools))


def _parse_plan(root: _Node) -> Plan:
    version = root.field("schema_version").integer()
    if version != SCHEMA_VERSION:
        raise PlanError(root.field("schema_version").path, f"this Cascadia reads version {SCHEMA_VERSION}, got {version}")
    models = tuple(m.field("spec").build(ModelSpec.from_dict) for m in root.field("cascade").items())
    if not models:
        raise PlanError("plan.cascade", "no models")
    cluster = _parse_cluster(root.field("cluster"))
    stage_nodes = root.field("stages").items()
    stages = tuple(_parse_stage(s, i == len(stage_nodes) - 1) for i, s in enumerate(stage_nodes))
    if len(stages) != len(models):
        raise PlanError("plan.stages", f"{len(stages)} stages for a cascade of {len(models)} models")
    for i, (s, m) in enumerate(zip(stages, models)):
        if s.model != m.name:
            raise PlanError(f"plan.stages[{i}].model", f"{s.model!r} but cascade[{i}] is {m.name!r}")
        if s.replicas and s.gpu not in cluster.gpu_counts():
            raise PlanError(f"plan.stages[{i}].gpu", f"{s.gpu!r} is not in the cluster {cluster.describe()}")
    shares = [s.share for s in stages]
    if stages and (abs(shares[0] - 1.0) > 1e-9 or any(b > a + 1e-9 for a, b in zip(shares, shares[1:]))):
        raise PlanError("plan.stages", f"shares must start at 1 and not increase, got {shares}")
    q, pr = root.field("quality"), root.field("prediction")
    kind = q.field("kind").text()
    if kind not in QUALITY_KINDS:
        raise PlanError(q.field("kind").path, f"must be one of {QUALITY_KINDS}, got {kind!r}")
    quality = QualityInfo(
        predicted=q.field("predicted").number(), target=None if q.field("target").value is None
        else q.field("target").number(), all_to_last=q.field("all_to_last").number(),
        all_stop_first=q.field("all_stop_first").number(), kind=kind, source=q.field("source").text(),
        stage_to_profile=tuple((a.text(), b.text()) for a, b in
                               (tuple(pair.items()) for pair in q.field("stage_to_profile").items())),
        scale=q.field("scale").text(), notes=tuple(n.text() for n in q.opt("notes").items())
        if q.opt("notes").value is not None else ())
    prediction = Prediction(
        e2e_p95_s=pr.field("e2e_p95_s").number(0.0, nullable=True),
        max_stage_p95_s=pr.field("max_stage_p95_s").number(0.0, nullable=True),
        max_sustainable_rate_rps=None if pr.field("max_sustainable_rate_rps").value is None
        else pr.field("max_sustainable_rate_rps").number(0.0),
        objective=pr.field("objective").text(), solver=pr.field("solver").text(),
        solver_status=pr.field("solver_status").text(),
        solver_objective_s=pr.field("solver_objective_s").number(nullable=True),
        solver_bound_s=pr.field("solver_bound_s").number(nullable=True),
        solver_gap=pr.field("solver_gap").number(nullable=True),
        simulation_seed=pr.field("simulation_seed").integer(),
        simulation_seeds=pr.field("simulation_seeds").integer(1) if pr.opt("simulation_seeds").value is not None
        else 1)
    return Plan(
        models=models, cluster=cluster, engine=root.field("engine").build(EngineConfig.from_dict), stages=stages,
        judge=root.field("judge").build(lambda d: JudgeInfo(**d)), quality=quality, prediction=prediction,
        workload=root.field("workload").build(lambda d: TraceSummary(**d)),
        input_hashes=tuple(sorted((str(k), str(v)) for k, v in root.field("input_hashes").mapping().items())),
        front=tuple(FrontPoint(tuple(t.number() for t in f.field("thresholds").items()), f.field("quality").number(),
                               f.field("latency_s").number()) for f in root.opt("front").items())
        if root.opt("front").value is not None else (),
        search=tuple((str(k), float(v)) for k, v in root.opt("search").mapping().items())
        if root.opt("search").value is not None else (),
        alternatives=tuple((a.field("cascade").text(), a.field("predicted_e2e_p95_s").number(nullable=True),
                            str(a.field("not_planned").value or "")) for a in root.opt("alternatives").items())
        if root.opt("alternatives").value is not None else (),
    )


def trace_hash(trace: Trace) -> str:
    h = hashlib.sha256()
    for arr in (trace.arrival_s, trace.input_tokens, trace.output_tokens):
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def simulate_plan(plan: Plan, trace: Trace, seed: int = 0, shares: tuple[float, ...] | None = None):
    """Simulate ``plan`` serving ``trace``: each stage's replicas as the plan places them;
    which requests escalate is drawn (seeded) so that each stage sees the plan's share."""
    from cascadia.sim.cluster import StageDeployment, simulate
    from cascadia.sim.routing import visits_from_shares

    pools = {p.gpu.name: p for p in plan.cluster.pools}
    deployments = []
    for s, model in zip(plan.stages, plan.models):
        pool = pools.get(s.gpu) or plan.cluster.pools[0]
        deployments.append(StageDeployment(model, pool.gpu, s.replicas, plan.engine, None, pool.gpus_per_node))
    visits = visits_from_shares(shares or plan.stage_shares, len(trace), seed)
    judge = plan.judge.load_on([m.name for m in plan.models])
    return simulate(trace, deployments, visits=visits, judge_latency_s=plan.judge.latency_s, judge=judge)
