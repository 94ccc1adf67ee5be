"""Deployment MILP: which option (GPU type, GPU count, layouts) each cascade stage takes.

The paper's formulation, on a heterogeneous pool: x[i,o] = 1 when stage i takes option o of
its latency table;
- one option per stage (at most one when the stage's share is 0: it may get no GPUs),
- per GPU type, the GPUs of the chosen options fit the pool,
- objective "max-stage" (the paper's): minimise L with L >= sum_o l[i,o] x[i,o] for every i;
- objective "end-to-end": minimise sum_i share_i * sum_o l[i,o] x[i,o]. This is a linear
  *surrogate* of the p95 of a request's latency summed over the stages it visits (a p95 of
  a sum is not linear in x); callers re-score the best few candidates (`solve_top_k`) by
  simulating the whole cascade.

Max-stage is solved lexicographically: after L, a second solve with L capped at its optimum
minimises the surrogate, so stages off the critical path use the spare GPUs. Options another
option of the stage beats (same type, no more GPUs, no higher p95) get no variable, and a
stage without traffic is reported with no GPUs; neither changes an optimum.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import pulp

from planner.parallelism import LayoutOption

OBJECTIVES = ("max-stage", "end-to-end")
SOLVERS = ("cbc", "highs")


@dataclass(frozen=True)
class DeploymentProblem:
    options: tuple[tuple[LayoutOption, ...], ...]  # per stage; may mix GPU types
    gpu_counts: Mapping[str, int]
    stage_shares: tuple[float, ...]
    objective: str = "max-stage"
    stage_models: tuple[str, ...] | None = None  # names for messages; default: the options' model

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if len(self.options) != len(self.stage_shares):
            raise ValueError(f"{len(self.options)} stages of options but {len(self.stage_shares)} shares")
        if any(s < 0 for s in self.stage_shares):
            raise ValueError(f"stage shares must be >= 0, got {self.stage_shares}")

    @property
    def n_stages(self) -> int:
        return len(self.options)

    def stage_name(self, i: int) -> str:
        if self.stage_models is not None:
            name = self.stage_models[i]
        else:
            name = self.options[i][0].model if self.options[i] else "?"
        return f"stage {i + 1} ({name})"

    def may_skip(self, i: int) -> bool:
        return self.stage_shares[i] == 0


@dataclass(frozen=True)
class DeploymentSolution:
    choices: tuple[LayoutOption | None, ...]  # None: the stage gets no GPUs (share 0 only)
    objective_s: float  # max-stage: worst stage p95; end-to-end: the surrogate sum_i share_i * p95_i
    bound_s: float  # best lower bound (nan when the solver gives none and did not prove optimality)
    gap: float
    status: str  # "optimal" or "feasible" (time limit hit)
    solver: str
    solve_s: float
    objective: str = "max-stage"
    surrogate: bool = field(default=False)  # True for end-to-end: a linear surrogate, re-score by simulation


@dataclass(frozen=True)
class Infeasible:
    reason: str
    status: str = "infeasible"  # the solver's status, or "precheck" when no solver ran
    solver: str = ""


def objective_value(problem: DeploymentProblem, choices: Sequence[LayoutOption | None]) -> float:
    lat = [c.p95_latency_s if c is not None else 0.0 for c in choices]
    if problem.objective == "max-stage":
        return max(lat, default=0.0)
    return sum(s * l for s, l in zip(problem.stage_shares, lat))


# ---- formulation: one function per constraint family ----
def _undominated(opts: Sequence[LayoutOption]) -> list[int]:
    """Indices of the options no other option of the stage beats: same GPU type, no more
    GPUs and no higher p95 (of equal ones the first). Dropping the rest keeps the optimum
    of both objectives and keeps wasteful copies (a table's f beyond the GPUs its layout
    uses) out of the top-k."""
    keep = []
    for k, o in enumerate(opts):
        beaten = any(j != k and p.gpu == o.gpu and p.n_gpus <= o.n_gpus and p.p95_latency_s <= o.p95_latency_s
                     and (p.n_gpus < o.n_gpus or p.p95_latency_s < o.p95_latency_s or j < k)
                     for j, p in enumerate(opts))
        if not beaten:
            keep.append(k)
    return keep


def _variables(prob: pulp.LpProblem, problem: DeploymentProblem) -> list[dict[int, pulp.LpVariable]]:
    return [{k: prob.add_variable(f"x_{i}_{k}", cat="Binary") for k in _undominated(opts)}
            for i, opts in enumerate(problem.options)]


def _expr(terms) -> pulp.LpAffineExpression:
    """Sum of (variable, coefficient) pairs; a variable may appear more than once (pulp's
    constructor would keep only its last coefficient)."""
    coef: dict[pulp.LpVariable, float] = {}
    for v, c in terms:
        coef[v] = coef.get(v, 0.0) + c
    return pulp.LpAffineExpression(list(coef.items()))


def _one_option_per_stage(prob: pulp.LpProblem, problem: DeploymentProblem, x) -> None:
    for i, xs in enumerate(x):
        total = _expr((v, 1.0) for v in xs.values())
        if problem.may_skip(i):
            prob += (total <= 1, f"at_most_one_option_stage_{i}")
        else:
            prob += (total == 1, f"one_option_stage_{i}")


def _gpu_budget(prob: pulp.LpProblem, problem: DeploymentProblem, x) -> None:
    types = sorted({o.gpu for opts in problem.options for o in opts})
    for t in types:
        use = _expr((v, problem.options[i][k].n_gpus) for i, xs in enumerate(x) for k, v in xs.items()
                    if problem.options[i][k].gpu == t)
        prob += (use <= int(problem.gpu_counts.get(t, 0)), f"gpu_budget_{_safe(t)}")


def _stage_latency_terms(problem: DeploymentProblem, x, i: int, weight: float = 1.0):
    return [(v, weight * problem.options[i][k].p95_latency_s) for k, v in x[i].items()]


def _max_stage_latency(prob: pulp.LpProblem, problem: DeploymentProblem, x, L: pulp.LpVariable) -> None:
    for i in range(problem.n_stages):
        prob += (L >= _expr(_stage_latency_terms(problem, x, i)), f"max_stage_latency_{i}")


def _surrogate(problem: DeploymentProblem, x) -> pulp.LpAffineExpression:
    return _expr(t for i, share in enumerate(problem.stage_shares) for t in _stage_latency_terms(problem, x, i, share))


def _cap_max_stage(prob: pulp.LpProblem, L: pulp.LpVariable, cap_s: float) -> None:
    prob += (_expr([(L, 1.0)]) <= cap_s, "max_stage_cap")


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name)


def formulate(problem: DeploymentProblem) -> pulp.LpProblem:
    """The MILP; its binary x_{i}_{o} says stage i takes problem.options[i][o] (dominated
    options get no variable)."""
    return _formulate(problem)[0]


def _formulate(problem: DeploymentProblem, cuts: Sequence[Sequence[int | None]] = (),
               cap_s: float | None = None) -> tuple[pulp.LpProblem, list[dict[int, pulp.LpVariable]]]:
    """cap_s (max-stage only) builds the second, lexicographic phase: L capped at the
    first phase's optimum, minimise the end-to-end surrogate, so stages off the critical
    path take the spare GPUs (a tie-break term small enough not to disturb L would sit
    below the solvers' tolerances)."""
    prob = pulp.LpProblem("cascadia_deployment", pulp.LpMinimize)
    x = _variables(prob, problem)
    if problem.objective == "max-stage":
        L = prob.add_variable("L", lowBound=0)
        _max_stage_latency(prob, problem, x, L)
        if cap_s is None:
            prob += _expr([(L, 1.0)])
        else:
            _cap_max_stage(prob, L, cap_s)
            prob += _surrogate(problem, x)
    else:
        prob += _surrogate(problem, x)
    _one_option_per_stage(prob, problem, x)
    _gpu_budget(prob, problem, x)
    for n, chosen in enumerate(cuts):
        _no_good_cut(prob, x, chosen, n)
    return prob, x


def _no_good_cut(prob: pulp.LpProblem, x, chosen: Sequence[int | None], n: int) -> None:
    """Exclude exactly this assignment: at least one x flips (sum of flips >= 1)."""
    terms, ones = [], 0
    for i, xs in enumerate(x):
        for k, v in xs.items():
            if chosen[i] == k:
                terms.append((v, -1.0))
                ones += 1
            else:
                terms.append((v, 1.0))
    prob += (_expr(terms) >= 1 - ones, f"no_good_{n}")


def _solver(name: str, time_limit_s: float):
    if name == "cbc":
        # pulp's bundled CBC: COIN_CMD, which pulp 3.3 recommends instead, needs a system
        # cbc binary that a pip install does not bring, so keep the bundled one quietly
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s, gapRel=0.0, threads=1)
    if name == "highs":
        _silence_highs_banner()
        return pulp.HiGHS(msg=False, timeLimit=time_limit_s, gapRel=0.0, gapAbs=0.0, threads=1)
    raise ValueError(f"solver must be one of {SOLVERS}, got {name!r}")


@functools.cache
def _silence_highs_banner() -> None:
    """HiGHS writes its copyright banner to the process's stdout on the first Highs() of a
    process, before any option (output_flag) can be set; the planner must not print, so
    that first instance is made with fd 1 pointed at /dev/null."""
    import highspy

    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _run(prob: pulp.LpProblem, x, solver: str, time_limit_s: float):
    """(chosen option index per stage or None, proven optimal, solve s), or (None, the
    solver's status, solve s) when it found no solution."""
    t0 = time.perf_counter()
    prob.solve(_solver(solver, time_limit_s))
    solve_s = time.perf_counter() - t0
    if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        return None, pulp.LpStatus[prob.status].lower(), solve_s
    chosen = []
    for xs in x:
        on = [k for k, v in xs.items() if (v.value() or 0.0) > 0.5]
        chosen.append(on[0] if on else None)
    return tuple(chosen), prob.sol_status == pulp.LpSolutionOptimal, solve_s


def _solve_once(problem: DeploymentProblem, solver: str, time_limit_s: float, cuts=()):
    """(solution, the raw assignment to cut in top-k) or (None, the solver's status)."""
    prob, x = _formulate(problem, cuts)
    chosen, optimal, solve_s = _run(prob, x, solver, time_limit_s)
    if chosen is None:
        return None, optimal
    first = objective_value(problem, _choices(problem, chosen))
    bound = first if optimal else _solver_bound(prob, solver)
    if problem.objective == "max-stage" and optimal and time_limit_s - solve_s > 0:
        prob2, x2 = _formulate(problem, cuts, cap_s=first * (1 + 1e-9) + 1e-9)
        chosen2, _, solve2_s = _run(prob2, x2, solver, time_limit_s - solve_s)
        solve_s += solve2_s
        if chosen2 is not None and objective_value(problem, _choices(problem, chosen2)) <= first * (1 + 1e-9) + 1e-9:
            chosen = chosen2
    # a stage without traffic gets no GPUs: never worse (max-stage: it can only lower L)
    choices = tuple(None if problem.may_skip(i) else c for i, c in enumerate(_choices(problem, chosen)))
    obj = objective_value(problem, choices)
    gap = 0.0 if optimal else ((obj - bound) / abs(obj) if obj and math.isfinite(bound) else float("nan"))
    return DeploymentSolution(choices, obj, bound, gap, "optimal" if optimal else "feasible", solver, solve_s,
                              problem.objective, problem.objective == "end-to-end"), chosen


def _choices(problem: DeploymentProblem, chosen: Sequence[int | None]) -> tuple[LayoutOption | None, ...]:
    return tuple(problem.options[i][k] if k is not None else None for i, k in enumerate(chosen))


def _solver_bound(prob: pulp.LpProblem, solver: str) -> float:
    """HiGHS reports its best bound; CBC through pulp does not (nan)."""
    if solver == "highs" and getattr(prob, "solverModel", None) is not None:
        try:
            return float(prob.solverModel.getInfo().mip_dual_bound)
        except (AttributeError, TypeError, ValueError):
            return float("nan")
    return float("nan")


def solve(problem: DeploymentProblem, solver: str = "cbc", time_limit_s: float = 60) -> DeploymentSolution | Infeasible:
    """The optimum, or Infeasible with the reason; the solver runs even when a precheck
    could tell, so every answer carries the solver's own status."""
    sol, status = _solve_once(problem, solver, time_limit_s)
    if sol is None:
        return Infeasible(diagnose(problem), status, solver)
    return sol


def solve_top_k(problem: DeploymentProblem, k: int, solver: str = "cbc",
                time_limit_s: float = 60) -> list[DeploymentSolution]:
    """Up to k distinct deployments, best first (each assignment is excluded from the next
    solve by a no-good cut). Empty when the problem is infeasible."""
    out: list[DeploymentSolution] = []
    cuts: list[tuple[int | None, ...]] = []
    while len(out) < k and len(cuts) < 3 * k:
        sol, chosen = _solve_once(problem, solver, time_limit_s, cuts)
        if sol is None:
            break
        cuts.append(chosen)
        if all(sol.choices != s.choices for s in out):  # differs in more than a stage without traffic
            out.append(sol)
    return out


def brute_force(problem: DeploymentProblem) -> DeploymentSolution | Infeasible:
    """Every combination of options, for tests and tiny problems."""
    t0 = time.perf_counter()
    per_stage = [list(opts) + ([None] if problem.may_skip(i) else []) for i, opts in enumerate(problem.options)]
    best, best_value = None, math.inf
    for combo in itertools.product(*per_stage):
        used: dict[str, int] = {}
        for c in combo:
            if c is not None:
                used[c.gpu] = used.get(c.gpu, 0) + c.n_gpus
        if any(n > problem.gpu_counts.get(t, 0) for t, n in used.items()):
            continue
        value = objective_value(problem, combo)
        if value < best_value:
            best, best_value = combo, value
    if best is None:
        return Infeasible(diagnose(problem), "infeasible")
    return DeploymentSolution(tuple(best), best_value, best_value, 0.0, "optimal", "brute-force",
                              time.perf_counter() - t0, problem.objective, problem.objective == "end-to-end")


# ---- why a problem is infeasible ----
def _precheck(problem: DeploymentProblem) -> Infeasible | None:
    for i, opts in enumerate(problem.options):
        if not opts and not problem.may_skip(i):
            return Infeasible(f"{problem.stage_name(i)} has no feasible layout on any GPU type of the pool "
                              "(the model does not fit)", "precheck")
    return None


def _cheapest(opts: Sequence[LayoutOption]) -> LayoutOption | None:
    return min(opts, key=lambda o: o.n_gpus, default=None)


def diagnose(problem: DeploymentProblem) -> str:
    """A one-line reason naming the stage and GPU type that are short."""
    pre = _precheck(problem)
    if pre is not None:
        return pre.reason
    counts = problem.gpu_counts
    for i, opts in enumerate(problem.options):  # a stage that cannot fit even alone
        if problem.may_skip(i) or any(o.n_gpus <= counts.get(o.gpu, 0) for o in opts):
            continue
        need = {}
        for o in opts:
            need[o.gpu] = min(need.get(o.gpu, o.n_gpus), o.n_gpus)
        what = " or ".join(f"{n} {t} (the pool has {counts.get(t, 0)})" for t, n in sorted(need.items()))
        return f"{problem.stage_name(i)} needs at least {what}"
    for i in reversed(range(problem.n_stages)):  # largest stage first: usually the one short
        if problem.may_skip(i):
            continue
        left = dict(counts)
        for j, opts in enumerate(problem.options):
            if j != i and not problem.may_skip(j) and opts:
                c = _cheapest(opts)
                left[c.gpu] = left.get(c.gpu, 0) - c.n_gpus
        need: dict[str, int] = {}
        for o in problem.options[i]:
            need[o.gpu] = min(need.get(o.gpu, o.n_gpus), o.n_gpus)
        if all(n > left.get(t, 0) for t, n in need.items()):
            t, n = min(need.items(), key=lambda kv: kv[1] - left.get(kv[0], 0))
            return (f"{problem.stage_name(i)} needs at least {n} {t} but only {max(left.get(t, 0), 0)} remain "
                    "after the cheapest options of the other stages")
    total = ", ".join(f"{n} {t}" for t, n in sorted(counts.items())) or "no GPUs"
    return f"no combination of the stages' options fits the pool ({total})"
