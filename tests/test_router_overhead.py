"""The router-overhead benchmark's check that ignore_eos reached every engine."""

from benchmarks.router_overhead import Row, ignore_eos_note


def test_ignore_eos_check_flags_rows_that_stopped_early_and_skips_the_http_floor():
    exact = Row("b vllm", "cascade endpoint", 4, 50, 50, 10.0, 12.0, 16.0)
    floor = Row("a sim", "HTTP floor: GET /health/live", 1, 50, 50, 0.4, 0.5, 0.0)
    assert ignore_eos_note([exact, floor], 16).startswith("ignore_eos check: every")
    early = Row("b vllm", "RayEngine.generate direct (no HTTP)", 1, 50, 50, 10.0, 12.0, 15.88)
    note = ignore_eos_note([exact, early], 16)
    assert note.startswith("ignore_eos check FAILED") and "RayEngine.generate direct (no HTTP) c=1: 15.88" in note
    assert "cascade endpoint" not in note
