"""Helpers of the sim-vs-live benchmark: the request selection written as an Azure trace
reads back identically, and the simulator follows the replayed records' stage visits. Of
the cluster dry run: which loopback nodes can stand in for a plan's cluster, and its
commands (they parse, and keep one simulated timeline)."""

import numpy as np
import pytest

from benchmarks.replay.records import ReplayRecord
from benchmarks.sim_vs_live import select_requests, simulate_records, write_azure_csv
from cascadia.traces import load_trace


def test_selection_round_trips_through_an_azure_csv(tmp_path):
    trace = select_requests(50, 1000, 0.08, 256, 64)
    write_azure_csv(trace, tmp_path / "t.csv")
    back = load_trace(tmp_path / "t.csv")
    np.testing.assert_allclose(back.arrival_s, trace.arrival_s, atol=2e-6)
    assert np.array_equal(back.input_tokens, trace.input_tokens)
    assert np.array_equal(back.output_tokens, trace.output_tokens) and trace.input_tokens.max() <= 256


def test_simulation_of_records_uses_their_schedule_and_stages():
    trace = select_requests(40, 1000, 0.08, 256, 64)
    recs = [ReplayRecord(index=i, request_id=str(i), scheduled_s=2.0 * float(a), input_tokens=int(x),
                         max_tokens=int(y), stage=int(i % 4 == 0))
            for i, (a, x, y) in enumerate(zip(trace.arrival_s, trace.input_tokens, trace.output_tokens))]
    one_stage = simulate_records([ReplayRecord(**{**r.__dict__, "stage": 0}) for r in recs])
    mixed = simulate_records(recs)
    assert mixed["visited"] == pytest.approx([1.0, 0.25]) and one_stage["visited"] == pytest.approx([1.0])
    assert mixed["failed"] == 0 and mixed["e2e_p95"] > one_stage["e2e_p95"] > 0  # escalated requests run twice


def test_cluster_dry_run_nodes_must_hold_whole_plan_nodes_and_all_its_gpus():
    from types import SimpleNamespace

    from benchmarks.cluster_dry_run import node_problem

    plan = SimpleNamespace(cluster=SimpleNamespace(pools=[SimpleNamespace(gpus_per_node=8)]), n_gpus=32)
    assert node_problem(plan, 0, (16, 16)) is None and node_problem(plan, 8, (8, 8, 8)) is None
    assert node_problem(plan, 0, (12, 20)) == ("worker 1 declares 12 GPUs, not a multiple of the plan's 8 per "
                                              "node: a tensor-parallel group could straddle two nodes")
    assert "the head declares 4 GPUs" in node_problem(plan, 4, (16, 16))
    assert node_problem(plan, 0, (8, 16)) == "the nodes declare 24 GPUs in all; the plan needs 32"


def test_cluster_dry_run_commands_parse_and_keep_plan_time_consistent(tmp_path):
    from benchmarks.cluster_dry_run import DryRun, commands
    from cascadia.cli import build_parser

    run = DryRun(dilation=0.25, time_scale=0.1)
    cmds = commands(run, tmp_path, "127.0.0.1:6379")
    args = {name: build_parser().parse_args(argv) for name, argv in cmds.items()}
    assert args["serve"].address == "127.0.0.1:6379" and args["serve"].engine == "sim"
    assert args["serve"].time_dilation == args["report"].time_dilation == 0.25
    # arrivals compressed by the dilation: the replayed rate in simulated time is the planned one
    assert args["replay"].time_scale * args["serve"].time_dilation == pytest.approx(args["simulate"].time_scale)
    assert args["replay"].window != args["plan"].window and args["replay"].window == args["simulate"].window
    assert args["replay"].seed == args["simulate"].seed == 7 and args["replay"].tokenizer == "sim"
    assert args["report"].reference == args["serve"].plan == args["plan"].out
