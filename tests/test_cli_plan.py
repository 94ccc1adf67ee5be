"""`cascadia plan` end to end through the real CLI entry point: a plan is written and
summarised; bad input gives one line on stderr and exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cascadia.cli import main
from cascadia.plan import Plan

BASE = ["plan", "--cascade", "llama-3-8b,llama-3-70b", "--cluster", "1x8xH100", "--trace", "azure-conv",
        "--window", "0:120", "--quality", "mtbench", "--q-min", "86", "--no-progress"]


def run(tmp_path, *extra, base=BASE):
    args = list(base) + ["--out", str(tmp_path / "plan.json"), "--cache-dir", str(tmp_path / "cache"),
                         "--processes", "1"]
    # Later flags win in argparse, so `extra` overrides the base arguments.
    return main(args + list(extra))


def test_plan_writes_a_plan_and_prints_the_table(tmp_path, capsys):
    assert run(tmp_path) == 0
    out = capsys.readouterr().out
    plan = Plan.load(tmp_path / "plan.json")
    assert plan.quality.predicted >= 86 and plan.quality.kind == "real"
    for word in ("stage", "model", "GPUs", "layouts", "threshold", "share", "p95", "llama-3-70b",
                 "quality", "real judge scores", "predicted end-to-end p95", "MILP solves", "latency tables"):
        assert word in out
    assert f"{plan.stages[0].threshold:g}" in out


def test_perfect_judge_profile_is_said_so(tmp_path, capsys):
    assert run(tmp_path, "--quality", "gsm8k", "--q-min", "80") == 0
    out = capsys.readouterr().out
    assert "PERFECT JUDGE" in out
    assert Plan.load(tmp_path / "plan.json").quality.kind == "perfect-judge"


def test_synthetic_profile_is_said_so(tmp_path, capsys):
    base = [a for a in BASE]
    i = base.index("--quality")
    base[i:i + 2] = ["--synthetic-quality", "70,90", "--seed", "4"]
    assert run(tmp_path, base=base) == 0
    assert "SYNTHETIC" in capsys.readouterr().out
    plan = Plan.load(tmp_path / "plan.json")
    assert plan.quality.kind == "synthetic" and "seed=4" in plan.quality.source


@pytest.mark.parametrize("extra, says", [
    (["--q-min", "99"], "above the best quality"),
    (["--cluster", "0x8xH100"], "--cluster"),
    (["--window", "0:0"], "empty"),
    (["--cascade", "llama-3-8b,deepseek-v3-671b-awq", "--cluster", "1x2xH100"], "cannot fit the pool"),
    (["--cascade", "llama-3-8b,llama-3-70b,mixtral-8x7b"], "--quality-map"),
    (["--quality-map", "llama-3-8b=nope,llama-3-70b=gpt-4-1106-preview"], "not in the quality profile"),
    (["--quality", "/no/such/profile.csv"], "no such file"),
    (["--q-min", "150"], "0-100"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, extra, says):
    assert run(tmp_path, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "plan.json").exists()


def test_subprocess_exit_code_and_no_traceback(tmp_path):
    # The installed console script (`python -m cascadia.cli` would run a second copy of the
    # module whose UsageError is not the one the subcommands raise).
    script = Path(sys.executable).with_name("cascadia")
    proc = subprocess.run([str(script), *BASE, "--q-min", "99", "--out",
                           str(tmp_path / "p.json")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("cascadia plan: error:") and "Traceback" not in proc.stderr
