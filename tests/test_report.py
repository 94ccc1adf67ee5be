"""`cascadia report`: the table from live records and simulator output side by side, SLOs,
relative deadlines from a plan, the plot, and one-line exit-2 errors."""

import json
import math
import re

import numpy as np
import pytest

from benchmarks.replay.records import write_records
from benchmarks.replay.reference import unloaded_latencies_s
from benchmarks.replay.report import load_run, parse_slo
from cascadia.cli import main
from cascadia.metrics import SLO, min_slo_scale
from cascadia.plan import Plan
from test_metrics import scripted_records


def table_rows(text: str) -> dict[str, str]:
    """Row name -> the rest, for the lines of the table (columns are 2+ spaces apart)."""
    parts = (re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in text.splitlines())
    return {p[0]: p[1] for p in parts if len(p) == 2}


@pytest.fixture
def records_file(tmp_path):
    path = tmp_path / "live.jsonl"
    write_records(scripted_records(), path)
    return path


@pytest.fixture(scope="module")
def plan_path(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plan")
    rc = main(["plan", "--cascade", "llama-3-8b,llama-3-70b", "--cluster", "1x8xH100", "--trace", "azure-conv",
               "--window", "0:120", "--quality", "mtbench", "--q-min", "86", "--no-progress", "--out",
               str(tmp / "plan.json"), "--cache-dir", str(tmp / "cache"), "--processes", "1"])
    assert rc == 0
    return tmp / "plan.json"


def test_report_table_counts_failures_and_applies_slos(records_file, tmp_path, capsys):
    out_json, png = tmp_path / "m.json", tmp_path / "p.png"
    rc = main(["report", str(records_file), "--slo", "ttft:600,tpot:250,e2e:1200", "--json", str(out_json),
               "--plot", str(png)])
    text = capsys.readouterr().out
    assert rc == 0
    rows = table_rows(text)
    assert rows["requests (failed)"] == "5 (1)"
    assert rows["TTFT median ms"] == "500.0" and rows["E2E p95 ms"] == "1340.0"
    assert rows["TPOT mean ms"] == "200.0" and rows["ITL mean ms"] == "250.0"
    assert rows["SLO attainment"] == "40.0%" and rows["goodput req/s"] == "0.400"
    assert rows["stage visited shares"] == "100% / 50%"
    doc = json.loads(out_json.read_text())
    assert doc[0]["failed"] == 1 and doc[0]["slo_attainment"] == pytest.approx(0.4)
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_simulator_output_and_live_records_in_one_table(records_file, tmp_path, capsys):
    sim = tmp_path / "sim.json"
    assert main(["simulate", "--model", "llama-3-8b", "--trace", "azure-conv", "--limit", "40", "--json",
                 str(sim)]) == 0
    capsys.readouterr()
    rc = main(["report", str(sim), str(records_file), "--labels", "predicted,measured"])
    text = capsys.readouterr().out
    assert rc == 0
    header = text.splitlines()[0].split()
    assert header == ["predicted", "measured"]
    rows = {k: v.split() for k, v in table_rows(text).items()}
    assert rows["source"] == ["simulated", "live"]
    summary = json.loads(sim.read_text())["summary"]
    assert float(rows["E2E median ms"][0]) == pytest.approx(summary["e2e_s"]["p50"] * 1e3, abs=0.051)
    assert float(rows["throughput req/s"][0]) == pytest.approx(summary["throughput_rps"], rel=1e-3)
    assert rows["ITL mean ms"][0] == "n/a"  # the simulator keeps no token times
    assert load_run(sim).timings.output_tokens.sum() > 0


def test_reference_plan_gives_relative_deadlines_per_answering_stage(records_file, plan_path, capsys):
    plan = Plan.load(plan_path)
    same_shape = unloaded_latencies_s(plan, np.array([100, 100, 100]), np.array([20, 20, 20]),
                                      np.array([0, 1, -1]))
    assert 0 < same_shape[0] < same_shape[1] == pytest.approx(same_shape[2])  # two stages cost more than one
    rc = main(["report", str(records_file), "--reference", str(plan_path), "--slo-scale", "1,1000000",
               "--json", str(records_file.with_suffix(".m.json"))])
    text = capsys.readouterr().out
    assert rc == 0 and "min SLO scale (95%)" in text and "attainment at scale 1e+06" in text
    doc = json.loads(records_file.with_suffix(".m.json").read_text())[0]
    assert doc["min_slo_scale"] == math.inf  # one of five requests failed: 95% cannot be met
    assert doc["attainment_at_scale"]["1e+06"] == pytest.approx(0.8)  # every completed request, at a huge scale
    run = load_run(records_file)
    base = unloaded_latencies_s(plan, run.input_tokens, run.output_tokens, run.timings.final_stage)
    assert doc["attainment_at_scale"]["1"] == pytest.approx(np.mean(run.timings.e2e_s <= base))
    assert min_slo_scale(run.timings.e2e_s, base, 0.8) > 0


def test_time_dilation_reports_a_dry_run_in_plan_time_against_the_plans_prediction(records_file, plan_path,
                                                                                    capsys):
    plan = Plan.load(plan_path)
    assert main(["report", str(records_file), "--json", str(records_file.with_suffix(".wall.json"))]) == 0
    assert main(["report", str(records_file), "--reference", str(plan_path), "--time-dilation", "4",
                 "--json", str(records_file.with_suffix(".plan.json"))]) == 0
    text = capsys.readouterr().out
    wall = json.loads(records_file.with_suffix(".wall.json").read_text())[0]
    dilated = json.loads(records_file.with_suffix(".plan.json").read_text())[0]
    for key in ("e2e_s", "ttft_s", "tpot_s", "itl_s"):
        assert dilated[key]["p95"] == pytest.approx(4 * wall[key]["p95"])
    assert dilated["requests_per_s"] == pytest.approx(wall["requests_per_s"] / 4)
    predicted = plan.prediction.e2e_p95_s
    assert dilated["plan_e2e_p95_s"] == predicted
    want = f"{(dilated['e2e_s']['p95'] - predicted) / predicted:+.1%} vs the plan"
    assert f"plan prediction: E2E p95 {predicted * 1e3:.1f} ms" in text and want in text
    assert "live times x4" in text


def test_slo_parsing():
    assert parse_slo("ttft:200,e2e:5000") == SLO(ttft_s=0.2, e2e_s=5.0)
    for bad in ("ttft=200", "ttft:-1", "foo:3", "ttft:1,ttft:2", "e2e:x"):
        with pytest.raises(ValueError, match="--slo"):
            parse_slo(bad)


@pytest.mark.parametrize("make, extra, message", [
    (None, [], "no such file"),
    ("not json at all\n", [], "bad JSON"),
    ('{"index": 0}\n', [], "missing field"),
    ("", [], "empty"),
    ("OK", ["--slo", "ttft=5"], "--slo"),
    ("OK", ["--slo-scale", "2"], "--reference"),
    ("OK", ["--reference", "/nonexistent/plan.json"], "no such plan file"),
    ("OK", ["--labels", "a,b"], "--labels"),
    ("OK", ["--time-dilation", "0"], "--time-dilation"),
    ('{"summary": {}, "requests": {"arrival_s": []}}', [], "simulator output lacks"),
])
def test_bad_report_input_is_one_line_exit_2(records_file, tmp_path, capsys, make, extra, message):
    path = tmp_path / "in.jsonl"
    if make == "OK":
        path = records_file
    elif make is not None:
        path.write_text(make)
    rc = main(["report", str(path), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and message in err, err
