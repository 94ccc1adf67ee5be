import csv
import time
from pathlib import Path

import numpy as np
import pytest

from cascadia.traces import (
    Trace,
    TraceFormatError,
    builtin_trace_path,
    load_trace,
    poisson_arrivals,
    scale_lengths,
    scale_rate,
    scale_time,
    sniff_trace_format,
    summarize,
    window,
)

DATA = Path(__file__).parent / "data"
AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def make_trace(arrival, inputs=None, outputs=None, prompts=None) -> Trace:
    n = len(arrival)
    return Trace(
        name="t",
        arrival_s=np.asarray(arrival, dtype=float),
        input_tokens=np.asarray(inputs if inputs is not None else [10] * n),
        output_tokens=np.asarray(outputs if outputs is not None else [5] * n),
        prompts=prompts,
    )


# ---- Azure -----------------------------------------------------------------------


def test_azure_small_file_seven_fraction_digits_and_midnight(tmp_path):
    path = write(
        tmp_path,
        "a.csv",
        AZURE_HEADER
        + "2023-11-16 23:59:59.9000001,100,10\n"
        + "2023-11-17 00:00:00.1000001,200,20\n"
        + "2023-11-17 00:00:02.0000000,300,30",
    )
    trace = load_trace(path)
    assert trace.name == "a"
    np.testing.assert_allclose(trace.arrival_s, [0.0, 0.2, 2.1], atol=1e-9)
    assert trace.input_tokens.tolist() == [100, 200, 300]
    assert trace.output_tokens.tolist() == [10, 20, 30]
    assert trace.input_tokens.dtype == np.int64 and trace.arrival_s.dtype == np.float64
    assert trace.prompts is None and trace.hash_ids is None and trace.n_dropped == 0


@pytest.mark.parametrize(
    "row, what",
    [
        ("2023-11-16 18:15:47.0,abc,5", "ContextTokens is not a number"),
        ("2023-11-16 18:15:47.0,12,-3", "GeneratedTokens is negative"),
        ("2023-11-16 18:15:47.0,12.5,3", "ContextTokens is not a whole number"),
        ("yesterday at noon,12,3", "TIMESTAMP is not"),
        ("2023-11-16 18:15:47.0,12", "expected 3 fields"),
    ],
)
def test_azure_malformed_row_names_file_and_line(tmp_path, row, what):
    path = write(tmp_path, "bad.csv", AZURE_HEADER + "2023-11-16 18:15:46.0,10,5\n" + row + "\n")
    with pytest.raises(TraceFormatError) as err:
        load_trace(path, "azure")
    assert str(err.value).startswith(f"{path}:3: ")
    assert what in str(err.value)
    assert err.value.line == 3


def test_azure_missing_column_is_reported_on_header_line(tmp_path):
    path = write(tmp_path, "bad.csv", "TIMESTAMP,ContextTokens\n2023-11-16 18:15:46.0,10\n")
    with pytest.raises(TraceFormatError, match=r":1: missing column\(s\) \['GeneratedTokens'\]"):
        load_trace(path, "azure")


def test_empty_file_and_header_only_file_are_clear_errors(tmp_path):
    empty = write(tmp_path, "empty.csv", "")
    with pytest.raises(TraceFormatError, match="empty"):
        load_trace(empty, "azure")
    for name in ("empty.jsonl", "empty.json"):
        with pytest.raises(TraceFormatError, match="empty"):
            load_trace(write(tmp_path, name, "\n"))
    header_only = write(tmp_path, "header.csv", AZURE_HEADER)
    with pytest.raises(TraceFormatError, match="no requests"):
        load_trace(header_only)


def test_real_azure_conv_trace_counts_values_and_speed():
    path = builtin_trace_path("azure-conv")
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))[1:]
    start = time.perf_counter()
    trace = load_trace(path)
    elapsed = time.perf_counter() - start
    # 19,366 data rows: the file ends without a newline, so `wc -l` shows 19,366 lines
    # including the header.
    assert len(trace) == len(rows) == 19366
    assert elapsed < 1.0
    assert (trace.input_tokens[0], trace.output_tokens[0]) == (374, 44)
    assert (trace.input_tokens[-1], trace.output_tokens[-1]) == (197, 183)
    assert trace.arrival_s[1] == pytest.approx(50.9951690 - 46.6805900, abs=1e-7)
    # 18:15:46.6805900 -> 19:14:08.4025270
    assert trace.duration_s == pytest.approx(
        (19 * 3600 + 14 * 60 + 8.4025270) - (18 * 3600 + 15 * 60 + 46.6805900), abs=1e-6
    )
    assert trace.input_tokens.sum() == sum(int(r[1]) for r in rows)
    assert np.all(np.diff(trace.arrival_s) >= 0)


def test_real_azure_code_trace():
    trace = load_trace(builtin_trace_path("azure-code"), "azure")
    assert len(trace) == 8819
    assert (trace.input_tokens[0], trace.output_tokens[0]) == (4808, 10)
    assert (trace.input_tokens[-1], trace.output_tokens[-1]) == (549, 173)


def test_builtin_trace_path_unknown_name_lists_choices():
    with pytest.raises(KeyError, match="azure-conv"):
        builtin_trace_path("azure-chat")


def test_rate_rps_rescales_a_timestamped_trace():
    trace = load_trace(builtin_trace_path("azure-code"), rate_rps=2.0)
    assert trace.mean_rate_rps == pytest.approx(2.0)
    assert len(trace) == 8819


# ---- BurstGPT --------------------------------------------------------------------


def test_burstgpt_zero_response_rows_are_dropped_and_counted():
    path = DATA / "traces_burstgpt_small.csv"
    with pytest.warns(UserWarning, match="dropped 1"):
        trace = load_trace(path)
    assert len(trace) == 3
    assert trace.n_dropped == 1
    assert "lines 3" in trace.notes[0]
    np.testing.assert_allclose(trace.arrival_s, [0.0, 113.0, 117.0])
    assert trace.input_tokens.tolist() == [472, 417, 1360]
    assert trace.output_tokens.tolist() == [18, 217, 156]
    assert summarize(trace).n_dropped == 1


def test_burstgpt_unsorted_rows_are_sorted_and_noted(tmp_path):
    path = write(
        tmp_path,
        "b.csv",
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "10,ChatGPT,1,2,3,x\n4,ChatGPT,5,6,11,x\n",
    )
    trace = load_trace(path, "burstgpt")
    assert trace.input_tokens.tolist() == [5, 1]
    np.testing.assert_allclose(trace.arrival_s, [0.0, 6.0])
    assert any("sorted" in note for note in trace.notes)


def test_burstgpt_non_numeric_timestamp(tmp_path):
    path = write(
        tmp_path,
        "b.csv",
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\nsoon,ChatGPT,1,2,3,x\n",
    )
    with pytest.raises(TraceFormatError, match=r"b\.csv:2: Timestamp is not a number"):
        load_trace(path)


# ---- Mooncake --------------------------------------------------------------------


def test_mooncake_milliseconds_and_hash_ids():
    trace = load_trace(DATA / "traces_mooncake_small.jsonl")
    np.testing.assert_allclose(trace.arrival_s, [0.0, 1.5, 2.25])
    assert trace.input_tokens.tolist() == [6955, 6472, 1024]
    assert trace.output_tokens.tolist() == [52, 26, 8]
    assert trace.hash_ids[2] == (71, 72)
    assert trace.hash_ids[1][:2] == (46, 47)
    assert trace.hash_block_tokens == 512


@pytest.mark.parametrize(
    "line, what",
    [
        ('{"timestamp": 5, "input_length": 3', "bad JSON"),
        ('{"timestamp": 5, "output_length": 3, "hash_ids": []}', "missing field 'input_length'"),
        ('{"timestamp": 5, "input_length": -1, "output_length": 3, "hash_ids": []}', "negative"),
        ('{"timestamp": 5, "input_length": 1, "output_length": 3, "hash_ids": ["x"]}', "hash_ids"),
        ('[1, 2]', "expected a JSON object"),
    ],
)
def test_mooncake_malformed_line(tmp_path, line, what):
    good = '{"timestamp": 0, "input_length": 3, "output_length": 3, "hash_ids": [1]}'
    path = write(tmp_path, "m.jsonl", f"{good}\n\n{line}\n")
    with pytest.raises(TraceFormatError) as err:
        load_trace(path)
    assert str(err.value).startswith(f"{path}:3: ")
    assert what in str(err.value)


# ---- ShareGPT --------------------------------------------------------------------


def test_sharegpt_turns_prompts_and_token_rule():
    path = DATA / "traces_sharegpt_small.json"
    with pytest.warns(UserWarning, match="no assistant answer"):
        trace = load_trace(path, seed=3, rate_rps=2.0)
    assert trace.prompts == ("What is a cascade?", "Why?", "Hello there")
    # ceil(chars / 4), at least 1
    assert trace.input_tokens.tolist() == [5, 1, 3]
    assert trace.output_tokens.tolist() == [9, 2, 1]
    assert trace.n_dropped == 1
    assert "lines 11" in trace.notes[0]  # the conversation holding the unanswered turn
    np.testing.assert_allclose(trace.arrival_s, poisson_arrivals(3, 2.0, seed=3))
    with pytest.warns(UserWarning):
        again = load_trace(path, seed=3, rate_rps=2.0)
        other = load_trace(path, seed=4, rate_rps=2.0)
    np.testing.assert_array_equal(again.arrival_s, trace.arrival_s)
    assert not np.array_equal(other.arrival_s, trace.arrival_s)


def test_sharegpt_structure_error_names_line_of_conversation(tmp_path):
    path = write(
        tmp_path,
        "s.json",
        '[\n {"id": "a", "conversations": [{"from": "human", "value": "hi"},'
        ' {"from": "gpt", "value": "yo"}]},\n {"id": "b", "turns": []}\n]\n',
    )
    with pytest.raises(TraceFormatError, match=r"s\.json:3: conversation has no 'conversations'"):
        load_trace(path)


def test_sharegpt_bad_json_names_line(tmp_path):
    path = write(tmp_path, "s.json", '[\n {"id": "a",\n  "conversations": [}\n]\n')
    with pytest.raises(TraceFormatError, match=r"s\.json:3: bad JSON"):
        load_trace(path)


def test_sniff_formats(tmp_path):
    assert sniff_trace_format(builtin_trace_path("azure-conv")) == "azure"
    assert sniff_trace_format(DATA / "traces_burstgpt_small.csv") == "burstgpt"
    assert sniff_trace_format(DATA / "traces_mooncake_small.jsonl") == "mooncake"
    assert sniff_trace_format(DATA / "traces_sharegpt_small.json") == "sharegpt"
    other = write(tmp_path, "o.csv", "time,in,out\n1,2,3\n")
    with pytest.raises(TraceFormatError, match="cannot tell"):
        load_trace(other)
    with pytest.raises(ValueError, match="unknown trace format"):
        load_trace(other, "splitwise")


# ---- Trace and its transforms ----------------------------------------------------


def test_trace_validates_its_invariants():
    with pytest.raises(ValueError, match="start at 0.0"):
        make_trace([1.0, 2.0])
    with pytest.raises(ValueError, match="non-decreasing"):
        make_trace([0.0, 2.0, 1.0])
    with pytest.raises(ValueError, match=">= 1"):
        make_trace([0.0, 1.0], outputs=[3, 0])
    with pytest.raises(ValueError, match="differ in length"):
        make_trace([0.0, 1.0], inputs=[1])


def test_trace_arrays_are_read_only_copies():
    source = np.array([0.0, 1.0])
    trace = make_trace(source)
    assert source.flags.writeable
    with pytest.raises(ValueError):
        trace.arrival_s[0] = 5.0


def test_select_rebases_and_subsets_prompts():
    trace = make_trace([0.0, 1.0, 3.0, 6.0], inputs=[1, 2, 3, 4], prompts=("a", "b", "c", "d"))
    sub = trace.select(np.array([1, 3]))
    np.testing.assert_allclose(sub.arrival_s, [0.0, 5.0])
    assert sub.input_tokens.tolist() == [2, 4]
    assert sub.prompts == ("b", "d")
    assert len(trace.select(slice(2, None))) == 2
    assert trace.select(np.array([True, False, True, False])).prompts == ("a", "c")


def test_window_is_half_open_and_rebased():
    trace = make_trace([0.0, 1.0, 2.0, 2.5, 4.0], inputs=[1, 2, 3, 4, 5])
    win = window(trace, 1.0, 4.0)
    assert win.input_tokens.tolist() == [2, 3, 4]
    np.testing.assert_allclose(win.arrival_s, [0.0, 1.0, 1.5])
    assert len(window(trace, 4.5, 9.0)) == 0
    assert len(window(trace, 0.0, 0.0)) == 0


def test_scale_time_and_rate():
    trace = make_trace([0.0, 1.0, 3.0, 4.0])
    np.testing.assert_allclose(scale_time(trace, 2.0).arrival_s, [0.0, 2.0, 6.0, 8.0])
    assert trace.mean_rate_rps == pytest.approx(0.75)  # 3 gaps over 4 s
    faster = scale_rate(trace, 3.0)
    assert faster.mean_rate_rps == pytest.approx(3.0)
    np.testing.assert_allclose(faster.arrival_s, [0.0, 0.25, 0.75, 1.0])
    with pytest.raises(ValueError):
        scale_time(trace, 0.0)
    with pytest.raises(ValueError, match="no measurable rate"):
        scale_rate(make_trace([0.0]), 1.0)


def test_scale_lengths_rounds_half_up_keeps_one_and_clips():
    trace = make_trace([0.0, 1.0, 2.0], inputs=[1, 5, 100], outputs=[3, 7, 40])
    scaled = scale_lengths(trace, 0.5, max_input=30, max_output=15)
    assert scaled.input_tokens.tolist() == [1, 3, 30]  # 0.5->1 (min 1), 2.5->3, 50->30
    assert scaled.output_tokens.tolist() == [2, 4, 15]  # 1.5->2, 3.5->4, 20->15
    assert scale_lengths(trace, 0.01).input_tokens.tolist() == [1, 1, 1]


def test_poisson_arrivals_rate_and_burstiness():
    poisson = poisson_arrivals(20000, 4.0, seed=1)
    assert poisson[0] == 0.0 and len(poisson) == 20000
    gaps = np.diff(poisson)
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)
    bursty = np.diff(poisson_arrivals(20000, 4.0, seed=1, burstiness=0.25))
    assert bursty.mean() == pytest.approx(0.25, rel=0.05)
    assert bursty.std() / bursty.mean() == pytest.approx(2.0, rel=0.05)  # 1 / sqrt(0.25)
    np.testing.assert_array_equal(poisson_arrivals(5, 1.0, 7), poisson_arrivals(5, 1.0, 7))
    assert len(poisson_arrivals(0, 1.0, 0)) == 0
    assert poisson_arrivals(1, 1.0, 0).tolist() == [0.0]


def test_summarize_hand_values():
    trace = make_trace([0.0, 2.0, 4.0, 8.0], inputs=[10, 20, 30, 40], outputs=[1, 1, 1, 9])
    summary = summarize(trace)
    assert summary.n_requests == 4
    assert summary.duration_s == 8.0
    assert summary.mean_rate_rps == pytest.approx(3 / 8)
    assert summary.input_tokens_mean == 25.0
    assert summary.input_tokens_p50 == 25.0
    assert summary.input_tokens_max == 40
    assert summary.output_tokens_p95 == pytest.approx(1 + 0.85 * 8)  # linear interpolation
    assert summary.as_dict()["output_tokens_max"] == 9
    empty = summarize(window(trace, 100.0, 200.0))
    assert empty.n_requests == 0 and empty.input_tokens_max == 0
