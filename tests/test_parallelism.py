import numpy as np
import pytest

from cascadia.catalog import get_model
from cascadia.perf.layout import Layout
from cascadia.sim.config import EngineConfig
from cascadia.specs.gpu import get_gpu
from cascadia.traces import Trace, builtin_trace_path, load_trace, scale_time
from planner.parallelism import (OVERLOADED_LATENCY_S, TableStats, candidate_layouts, latency_table, replica_shapes,
                                 stage_trace, table_key)

H100 = get_gpu("H100")
L40S = get_gpu("L40S")
LLAMA8 = get_model("llama-3-8b")
LLAMA70 = get_model("llama-3-70b")


@pytest.fixture(scope="module")
def conv():
    return load_trace(builtin_trace_path("azure-conv")).select(slice(0, 400))


def test_stage_trace_keeps_the_share_of_requests_seeded(conv):
    a = stage_trace(conv, 0.3, seed=1)
    assert len(a) == round(0.3 * len(conv))
    assert np.array_equal(a.input_tokens, stage_trace(conv, 0.3, seed=1).input_tokens)
    assert not np.array_equal(a.input_tokens, stage_trace(conv, 0.3, seed=2).input_tokens)
    assert len(stage_trace(conv, 0.0, seed=1)) == 0 and stage_trace(conv, 1.0, seed=1) is conv
    with pytest.raises(ValueError):
        stage_trace(conv, 1.5, seed=0)


def test_candidates_use_exactly_f_gpus_with_at_most_two_shapes_and_tp_inside_a_node():
    for f in range(1, 33):
        for layouts in candidate_layouts(LLAMA8, H100, f, 8):
            assert sum(lay.n_gpus for lay in layouts) == f
            assert len(set(layouts)) <= 2
            assert all(lay.tp <= 8 and LLAMA8.n_heads % lay.tp == 0 and lay.pp == 1 for lay in layouts)
    # 6 GPUs: 6x tp1, 3x tp2, tp4 + 2x tp1, tp4 + tp2, 2x tp2 + ... (the remainder rule)
    six = set(candidate_layouts(LLAMA8, H100, 6, 8))
    assert (Layout(4), Layout(2)) in six and (Layout(2),) * 3 in six and (Layout(1),) * 6 in six
    assert (Layout(2), Layout(1), Layout(1), Layout(1), Layout(1)) not in six  # remainder as big as an A replica


def test_llama_70b_on_h100_never_offers_tp_below_4_without_pp(conv):
    for f in range(1, 33):
        for layouts in candidate_layouts(LLAMA70, H100, f, 8):
            assert all(lay.tp >= 4 or lay.pp > 1 for lay in layouts), layouts
    assert candidate_layouts(LLAMA70, H100, 3, 8) == []


def test_a_model_larger_than_a_node_pipelines_across_nodes():
    # 140 GB of Llama-3-70B weights do not fit two 48 GB L40S: the replica spans two nodes
    shapes = replica_shapes(LLAMA70, L40S, 2, EngineConfig(), 32)
    assert shapes == [Layout(2, 2)]
    assert replica_shapes(LLAMA70, L40S, 2, EngineConfig(), 3) == []


def test_table_is_monotone_and_cached(conv, tmp_path):
    trace = scale_time(conv, 0.5)
    stats = TableStats()
    table = latency_table(LLAMA70, H100, trace, max_gpus=24, gpus_per_node=8, cache_dir=tmp_path, processes=2,
                          max_requests=160, stats=stats)
    assert stats.simulations > 0 and stats.cache_misses == 1
    assert sorted(table) == list(range(4, 25))  # 1-3 GPUs cannot hold the weights
    lat = [table[f].p95_latency_s for f in sorted(table)]
    assert all(b <= a for a, b in zip(lat, lat[1:]))
    assert lat[-1] < lat[0]
    for f, o in table.items():
        assert o.n_gpus == f and o.used_gpus <= f and o.model == LLAMA70.name and o.gpu == "H100"
        assert all(lay.tp >= 4 for lay in o.layouts)
    again = TableStats()
    cached = latency_table(LLAMA70, H100, trace, max_gpus=24, gpus_per_node=8, cache_dir=tmp_path,
                           max_requests=160, stats=again)
    assert again.simulations == 0 and again.cache_hits == 1
    assert cached == table
    # a shorter table is the cached one's first entries; a longer one is built
    shorter = latency_table(LLAMA70, H100, trace, max_gpus=12, gpus_per_node=8, cache_dir=tmp_path,
                            max_requests=160, stats=again)
    assert again.cache_hits == 2 and shorter == {f: o for f, o in table.items() if f <= 12}
    longer = latency_table(LLAMA70, H100, trace, max_gpus=28, gpus_per_node=8, cache_dir=tmp_path,
                           max_requests=160, stats=again)
    assert again.cache_misses == 1 and again.simulations > 0 and sorted(longer) == list(range(4, 29))
    assert {f: o for f, o in longer.items() if f <= 24} == table  # extended, not rebuilt
    fresh = latency_table(LLAMA70, H100, trace, max_gpus=28, gpus_per_node=8, use_cache=False, max_requests=160)
    assert fresh == longer
    # another workload is another key
    other = table_key(LLAMA70, H100, scale_time(conv, 0.6).select(slice(0, 160)), gpus_per_node=8,
                      engine=EngineConfig(), efficiency=None, min_gain=0.02)
    assert len(list(tmp_path.iterdir())) == 1 and other not in next(tmp_path.iterdir()).name


def test_inline_and_pool_searches_agree(conv, tmp_path):
    trace = scale_time(conv, 0.5)
    kw = dict(max_gpus=8, gpus_per_node=8, max_requests=96, use_cache=False)
    assert latency_table(LLAMA8, H100, trace, processes=1, **kw) == latency_table(LLAMA8, H100, trace, processes=2,
                                                                                   **kw)


def test_overloaded_layouts_get_a_large_finite_latency_and_lose(conv):
    flood = scale_time(conv, 0.1)  # 10x the rate: ~32 req/s, one tp4 replica serves ~11
    table = latency_table(LLAMA70, H100, flood, max_gpus=32, gpus_per_node=8, max_requests=200, processes=1,
                          use_cache=False)
    assert table[4].overloaded and OVERLOADED_LATENCY_S <= table[4].p95_latency_s < 1e7
    assert not table[32].overloaded and table[32].p95_latency_s < 100
    worst_ok = min(f for f, o in table.items() if not o.overloaded)
    assert all(table[f].overloaded for f in table if f < worst_ok)


def test_a_stage_nobody_visits_is_free_at_its_smallest_layout():
    empty = Trace("empty", np.zeros(0), np.zeros(0, dtype=int), np.zeros(0, dtype=int))
    table = latency_table(LLAMA8, H100, empty, max_gpus=4, gpus_per_node=8, use_cache=False)
    assert [table[f].p95_latency_s for f in (1, 2, 3, 4)] == [0.0] * 4 and table[4].layouts == (Layout(1),)


def test_backlog_rule_reads_slowdowns_not_raw_latency():
    from planner.parallelism import backlogged

    n = 400
    unloaded = np.linspace(1.0, 20.0, n)  # later requests are simply longer (the conv mix drifts)
    assert not backlogged(unloaded * 1.1, unloaded, duration_s=40.0)  # light load: slowdown ~1.1 throughout
    queue = np.linspace(0.0, 30.0, n)  # a queue that grows by 30 s over a 40 s window
    assert backlogged(unloaded + queue, unloaded, duration_s=40.0)
    flat = np.full(n, 2.0)
    assert backlogged(flat + queue, flat, duration_s=40.0)
    # a busy but steady layout (slowdown 3 from start to end) has no backlog
    assert not backlogged(flat * 3.0, flat, duration_s=40.0)


def test_table_window_covers_the_minimum_duration_within_bounds():
    from planner.parallelism import table_window

    t = Trace("t", np.arange(5000) * 0.01, np.full(5000, 10), np.full(5000, 10))  # 100 req/s, 50 s
    assert table_window(t, min_requests=256, min_window_s=20.0, max_requests=4096) == 2001  # 0..20 s inclusive
    assert table_window(t, min_requests=256, min_window_s=20.0, max_requests=1024) == 1024
    assert table_window(t, min_requests=256, min_window_s=0.5, max_requests=1024) == 256
    assert table_window(t.select(slice(0, 100)), min_requests=256, min_window_s=20.0, max_requests=1024) == 100
    assert table_window(t, min_requests=256, min_window_s=20.0, max_requests=100) == 100


def test_a_stage_well_below_capacity_is_not_flagged_overloaded():
    """Regression: with the raw-latency backlog rule, the 7B's table on a 256-request window
    of conv x10 came out overloaded at every GPU count (later requests are longer)."""
    trace = scale_time(load_trace(builtin_trace_path("azure-conv")).select(slice(0, 1400)), 0.1)
    table = latency_table(get_model("deepseek-r1-distill-qwen-7b"), H100, trace, max_gpus=12, gpus_per_node=8,
                          use_cache=False, max_requests=256, min_requests=256, processes=1)
    assert not table[12].overloaded and table[12].p95_latency_s < 60.0
