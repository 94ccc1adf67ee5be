"""Helpers of the sim-vs-live benchmark: the request selection written as an Azure trace
reads back identically, and the simulator follows the replayed records' stage visits."""

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
