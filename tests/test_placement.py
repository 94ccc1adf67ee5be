from cascadia.catalog import get_model
from cascadia.perf.layout import Layout
from cascadia.specs.cluster import parse_cluster
from planner.milp import Infeasible
from planner.parallelism import LayoutOption
from planner.placement import place
from planner.verify import verify_deployment

LLAMA70 = get_model("llama-3-70b")
LLAMA8 = get_model("llama-3-8b")


def option(model, gpu, layouts, n_gpus=None):
    layouts = tuple(layouts)
    return LayoutOption(model.name, gpu, n_gpus or sum(lay.n_gpus for lay in layouts), layouts, 1.0, 1.0, 10.0)


def test_four_nodes_of_eight_hold_four_tp8_replicas_but_not_five():
    cluster = parse_cluster("4x8xH100")
    placed = place(cluster, [(Layout(8),) * 4], ["H100"])
    assert not isinstance(placed, Infeasible)
    assert sorted(lay.stage_nodes for lay in placed[0]) == [(0,), (1,), (2,), (3,)]
    five = place(cluster, [(Layout(8),) * 5], ["H100"])
    assert isinstance(five, Infeasible)
    assert "stage 1 replica" in five.reason and "needs 8 free H100 in one node" in five.reason


def test_pipeline_replica_larger_than_a_node_spans_two_nodes():
    cluster = parse_cluster("2x4xH100")
    placed = place(cluster, [(Layout(4, 2),)], ["H100"])
    assert not isinstance(placed, Infeasible)
    assert placed[0][0].stage_nodes == (0, 1) and placed[0][0].n_cross_node_hops() == 1


def test_first_fit_decreasing_packs_big_replicas_first_and_never_splits_a_tp_group():
    cluster = parse_cluster("2x8xH100")
    # 4+4 (stage 1) and 8 (stage 2) only fit when the 8 goes first
    placed = place(cluster, [(Layout(4), Layout(2), Layout(2)), (Layout(8),)], ["H100", "H100"])
    assert not isinstance(placed, Infeasible)
    assert placed[1][0].stage_nodes == (0,)
    assert {lay.stage_nodes for lay in placed[0]} == {(1,)}
    split = place(cluster, [(Layout(4), Layout(4), Layout(8))], ["H100"])
    assert not isinstance(split, Infeasible)
    # a tp8 replica cannot use two half-empty nodes
    half = place(cluster, [(Layout(4), Layout(8), Layout(4)), (Layout(2),)], ["H100", "H100"])
    assert isinstance(half, Infeasible)


def test_heterogeneous_pools_keep_each_stage_on_its_gpu_type():
    cluster = parse_cluster("1x8xH100+2x4xA100-80G")
    placed = place(cluster, [(Layout(4), Layout(4)), (Layout(8),)], ["A100-80G", "H100"])
    assert not isinstance(placed, Infeasible)
    assert {lay.stage_nodes for lay in placed[0]} == {(1,), (2,)} and placed[1][0].stage_nodes == (0,)
    missing = place(cluster, [(Layout(1),)], ["L40S"])
    assert isinstance(missing, Infeasible) and "no L40S nodes" in missing.reason


def test_verify_deployment_accepts_a_sound_one_and_names_each_problem():
    cluster = parse_cluster("2x8xH100")
    good = [option(LLAMA8, "H100", [Layout(1)] * 4), option(LLAMA70, "H100", [Layout(8)])]
    assert verify_deployment(cluster, [LLAMA8, LLAMA70], good) == []
    too_many = [option(LLAMA8, "H100", [Layout(8)]), option(LLAMA70, "H100", [Layout(8)] * 2)]
    assert any("take 24 H100 GPUs but the cluster has 16" in p for p in verify_deployment(cluster, [LLAMA8, LLAMA70],
                                                                                           too_many))
    no_memory = [None, option(LLAMA70, "H100", [Layout(1)])]
    problems = verify_deployment(cluster, [LLAMA8, LLAMA70], no_memory)
    assert len(problems) == 1 and "weights need" in problems[0]
    wide_tp = [option(LLAMA70, "H100", [Layout(16)])]
    assert any("does not fit in a H100 node" in p for p in verify_deployment(cluster, [LLAMA70], wide_tp))
    bad_nodes = [option(LLAMA70, "H100", [Layout(8, 1, (0,)), Layout(4, 1, (0,))])]
    assert verify_deployment(cluster, [LLAMA70], bad_nodes) == ["node 0 (H100) is given 12 GPUs but has 8"]
    placeable = [option(LLAMA8, "H100", [Layout(4)] * 2), option(LLAMA70, "H100", [Layout(8)])]
    assert verify_deployment(parse_cluster("1x8xH100+2x4xH100"), [LLAMA8, LLAMA70], placeable) == []
    assert verify_deployment(parse_cluster("1x8xH100+2x2xH100"), [LLAMA8, LLAMA70],
                             [option(LLAMA8, "H100", [Layout(4)]), option(LLAMA70, "H100", [Layout(8)])])[0] \
        .startswith("stage 1 replica 1 (tp4pp1) does not fit")


def test_verify_checks_given_pipeline_nodes():
    cluster = parse_cluster("2x4xH100")
    spanning = [option(LLAMA70, "H100", [Layout(4, 2, (0, 1))])]
    assert verify_deployment(cluster, [LLAMA70], spanning) == []
    missing_node = [option(LLAMA70, "H100", [Layout(4, 2, (1, 2))])]
    assert verify_deployment(cluster, [LLAMA70], missing_node) == [
        "stage 1 replica 1: pipeline stage 2 is on node 2, which does not exist (the cluster has 2)"]
