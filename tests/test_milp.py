import math

import numpy as np
import pytest

from cascadia.perf.layout import Layout
from planner.milp import (DeploymentProblem, DeploymentSolution, Infeasible, brute_force, formulate, objective_value,
                          solve, solve_top_k)
from planner.parallelism import LayoutOption

GPU_TYPES = ("H100", "A100-80G", "L40S")


def opt(model, gpu, f, p95):
    return LayoutOption(model, gpu, f, (Layout(1),) * f, p95, p95, float("nan"))


def random_problem(rng: np.random.Generator) -> DeploymentProblem:
    """1-3 stages, 1-3 GPU types with small counts; per (stage, type) a table over f that
    mostly falls with f, sometimes not; some stages have share 0; some pools are too small."""
    n_stages = int(rng.integers(1, 4))
    types = GPU_TYPES[: int(rng.integers(1, 4))]
    counts = {t: int(rng.integers(0, 9)) for t in types}
    options, shares = [], []
    share = 1.0
    for i in range(n_stages):
        stage = []
        for t in types:
            if rng.random() < 0.25:
                continue  # this model does not fit this GPU type
            f_min = int(rng.integers(1, 4))
            lat = float(rng.uniform(1.0, 50.0))
            for f in range(f_min, f_min + int(rng.integers(1, 5))):
                stage.append(opt(f"m{i}", t, f, round(lat, 6)))
                lat *= float(rng.uniform(0.5, 1.0)) if rng.random() < 0.8 else float(rng.uniform(1.0, 1.3))
        options.append(tuple(stage))
        shares.append(share)
        share = 0.0 if rng.random() < 0.2 else share * float(rng.uniform(0.1, 0.9))
    objective = "max-stage" if rng.random() < 0.5 else "end-to-end"
    return DeploymentProblem(tuple(options), counts, tuple(shares), objective)


def check_against_brute_force(problem: DeploymentProblem, solver: str) -> str:
    got = solve(problem, solver=solver)
    want = brute_force(problem)
    if isinstance(want, Infeasible):
        assert isinstance(got, Infeasible), f"{solver} found {got} but brute force: {want.reason}"
        assert got.reason == want.reason and got.status == "infeasible" and got.solver == solver
        return "infeasible"
    assert isinstance(got, DeploymentSolution), f"{solver}: {got} but brute force found {want.objective_s}"
    assert got.status == "optimal" and got.solver == solver
    assert got.objective_s == pytest.approx(want.objective_s, rel=1e-6, abs=1e-6)
    assert got.bound_s == pytest.approx(got.objective_s) and got.gap == 0.0
    assert objective_value(problem, got.choices) == pytest.approx(got.objective_s)
    used: dict[str, int] = {}
    for i, c in enumerate(got.choices):
        if c is None:
            assert problem.stage_shares[i] == 0
        else:
            assert c in problem.options[i]
            used[c.gpu] = used.get(c.gpu, 0) + c.n_gpus
    assert all(n <= problem.gpu_counts.get(t, 0) for t, n in used.items())
    return problem.objective


def test_milp_optimum_equals_brute_force_on_random_instances():
    rng = np.random.default_rng(20261123)
    kinds: dict[str, int] = {}
    n_highs = 0
    for n in range(240):
        problem = random_problem(rng)
        solver = "highs" if n % 3 == 0 else "cbc"
        n_highs += solver == "highs"
        kind = check_against_brute_force(problem, solver)
        kinds[kind] = kinds.get(kind, 0) + 1
        if any(s == 0 for s in problem.stage_shares):
            kinds["zero-share"] = kinds.get("zero-share", 0) + 1
        if len(problem.gpu_counts) > 1:
            kinds["heterogeneous"] = kinds.get("heterogeneous", 0) + 1
    # the random instances cover every case the planner meets
    assert min(kinds.get(k, 0) for k in ("max-stage", "end-to-end", "infeasible", "zero-share",
                                         "heterogeneous")) >= 15, kinds
    assert n_highs >= 60


def test_max_stage_is_the_worst_stage_and_end_to_end_weights_by_share():
    small = (opt("a", "H100", 1, 4.0), opt("a", "H100", 2, 2.0))
    big = (opt("b", "H100", 2, 10.0), opt("b", "H100", 4, 6.0))
    pm = DeploymentProblem((small, big), {"H100": 4}, (1.0, 0.1), "max-stage")
    sol = solve(pm)
    # max-stage: the big model's latency dominates, so it takes 4 GPUs... but then the small
    # one cannot fit; best is big on 2 (10 s) and small on 2 (2 s) -> L = 10
    assert sol.objective_s == pytest.approx(10.0)
    assert [c.n_gpus for c in sol.choices] == [2, 2]
    pe = DeploymentProblem((small, big), {"H100": 5}, (1.0, 0.1), "end-to-end")
    sol = solve(pe)
    assert sol.surrogate and sol.objective_s == pytest.approx(1.0 * 2.0 + 0.1 * 10.0)  # 2 + 2 GPUs beat 1 + 4


def test_zero_share_stage_may_get_no_gpus():
    a = (opt("a", "H100", 2, 3.0),)
    b = (opt("b", "H100", 2, 9.0),)
    sol = solve(DeploymentProblem((a, b), {"H100": 2}, (1.0, 0.0)))
    assert isinstance(sol, DeploymentSolution) and sol.choices[1] is None and sol.objective_s == 3.0


def test_infeasible_names_the_stage_and_gpu_that_are_short():
    a = (opt("llama-3-8b", "H100", 1, 3.0), opt("llama-3-8b", "H100", 2, 2.0))
    b = (opt("llama-3-70b", "H100", 2, 9.0), opt("llama-3-70b", "H100", 4, 5.0))
    res = solve(DeploymentProblem((a, b), {"H100": 2}, (1.0, 0.5)))
    assert isinstance(res, Infeasible)
    assert res.reason == ("stage 2 (llama-3-70b) needs at least 2 H100 but only 1 remain after the cheapest "
                          "options of the other stages")
    alone = solve(DeploymentProblem((b,), {"H100": 1}, (1.0,)))
    assert isinstance(alone, Infeasible) and "stage 1 (llama-3-70b) needs at least 2 H100" in alone.reason
    none = solve(DeploymentProblem(((), a), {"H100": 8}, (1.0, 0.5), stage_models=("huge", "small")))
    assert isinstance(none, Infeasible) and none.reason.startswith("stage 1 (huge) has no feasible layout")


@pytest.mark.parametrize("solver", ["cbc", "highs"])
def test_top_k_returns_distinct_assignments_in_objective_order(solver):
    a = tuple(opt("a", "H100", f, 8.0 / f) for f in (1, 2, 3, 4))
    b = tuple(opt("b", "H100", f, 20.0 / f) for f in (1, 2, 3, 4))
    problem = DeploymentProblem((a, b), {"H100": 5}, (1.0, 0.4), "end-to-end")
    top = solve_top_k(problem, 4, solver=solver)
    assert len(top) == 4
    values = [s.objective_s for s in top]
    assert all(u <= v + 1e-9 for u, v in zip(values, values[1:]))
    assert len({tuple(c.n_gpus for c in s.choices) for s in top}) == 4
    assert values[0] == pytest.approx(brute_force(problem).objective_s)
    assert all(s.solver == solver and s.status == "optimal" for s in top)


def test_formulate_names_each_constraint_family():
    a = (opt("a", "H100", 1, 3.0), opt("a", "A100-80G", 2, 4.0))
    prob = formulate(DeploymentProblem((a, a), {"H100": 2, "A100-80G": 2}, (1.0, 0.0)))
    for name in ("one_option_stage_0", "at_most_one_option_stage_1", "gpu_budget_H100", "gpu_budget_A100_80G",
                 "max_stage_latency_0", "max_stage_latency_1"):
        assert prob.get_constraint_by_name(name) is not None, name
    assert not math.isnan(solve(DeploymentProblem((a, a), {"H100": 2, "A100-80G": 2}, (1.0, 0.0)),
                                solver="highs").solve_s)


def test_dominated_table_entries_get_no_variable_and_never_win():
    # a latency table repeats its best layout at larger f (spare GPUs idle): f=3 and f=4 copy f=2
    table = (opt("a", "H100", 1, 5.0), opt("a", "H100", 2, 3.0), opt("a", "H100", 3, 3.0), opt("a", "H100", 4, 3.0))
    problem = DeploymentProblem((table,), {"H100": 4}, (1.0,))
    names = {v.name for v in formulate(problem).variables()}
    assert {"x_0_0", "x_0_1"} <= names and not {"x_0_2", "x_0_3"} & names
    assert solve(problem).choices[0].n_gpus == 2
    assert [s.choices[0].n_gpus for s in solve_top_k(problem, 5)] == [2, 1]


@pytest.mark.parametrize("solver", ["cbc", "highs"])
def test_max_stage_gives_spare_gpus_to_stages_off_the_critical_path(solver):
    small = tuple(opt("a", "H100", f, 5.0 / (1 + 0.1 * (f - 1))) for f in range(1, 9))
    big = tuple(opt("b", "H100", f, 9.6) for f in range(4, 9))  # more GPUs do not help the bottleneck
    sol = solve(DeploymentProblem((small, big), {"H100": 8}, (1.0, 0.2)), solver=solver)
    assert sol.objective_s == pytest.approx(9.6)
    assert [c.n_gpus for c in sol.choices] == [4, 4]  # not 1 GPU for the small model and 3 idle
