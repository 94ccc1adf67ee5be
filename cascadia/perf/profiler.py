"""Profiling: time a real vLLM engine over a grid of batch shapes.

Every timed iteration is one `SyncEngine.step()` whose batch is read back from vLLM's
scheduler, so a sample's shape is what the engine ran, not what was hoped for. Prompts are
random distinct token ids and prefix caching is off, so no prompt is served from cache.

The grid has three parts:
- prefill: one prompt of P tokens alone (max_tokens=1, so it leaves after its step);
- decode runs: n_max prompts of c tokens are prefilled together (those steps are kept
  too, as multi-prompt prefill samples), then the batch decodes a few steps at each batch
  size in `batch_sizes`, largest first, aborting requests to shrink it; paying the
  prefill once per context length instead of once per (n, c) keeps a full profile short;
- mixed: at chosen batch sizes of a decode run, one extra prompt joins the decoding batch
  for one iteration (decodes + one prefill chunk), `mixed_repeats` times.

Labels start with "fit:" or "eval:"; evaluation shapes (batch sizes, context and prompt
lengths) never occur in the fit part, so a calibration can be checked on unseen shapes.
"""

from __future__ import annotations

import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cascadia.perf.samples import IterationSample, ProfileRun

FIT = "fit"
EVAL = "eval"


@dataclass(frozen=True)
class PrefillShape:
    prompt_tokens: int
    phase: str = FIT


@dataclass(frozen=True)
class DecodeRun:
    """Prefill max(batch_sizes) prompts of `context_tokens`, then decode at each batch size."""

    context_tokens: int
    batch_sizes: tuple[int, ...]
    phase: str = FIT
    # (batch_size, prompt_tokens): after decoding at that batch size, one prompt of that
    # many tokens joins the batch for one mixed iteration.
    mixed: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class ProfileGrid:
    prefills: tuple[PrefillShape, ...]
    decode_runs: tuple[DecodeRun, ...]
    prefill_repeats: int = 3
    decode_steps: int = 4  # timed decode iterations per batch size
    mixed_repeats: int = 2  # mixed iterations per (batch size, prompt) pair


def full_grid() -> ProfileGrid:
    """About four and a half minutes of measurements (plus engine start) on a 2-core AVX2
    host with SmolLM2-135M."""
    prefills = tuple(PrefillShape(p, FIT) for p in (16, 32, 64, 128, 256, 512, 1024)) + tuple(
        PrefillShape(p, EVAL) for p in (48, 96, 192, 384, 768)
    )
    fit_n = (32, 16, 8, 4, 2, 1)
    eval_n = (24, 12, 6, 3)
    runs = (
        DecodeRun(32, fit_n, FIT),
        DecodeRun(128, fit_n, FIT, mixed=((16, 64), (16, 256), (4, 1024), (4, 64), (1, 256), (1, 1024))),
        DecodeRun(512, tuple(n for n in fit_n if n <= 16), FIT, mixed=((16, 128), (4, 512))),
        DecodeRun(1024, tuple(n for n in fit_n if n <= 8), FIT),
        DecodeRun(64, eval_n, EVAL),
        DecodeRun(256, eval_n, EVAL, mixed=((12, 96), (3, 384))),
        DecodeRun(768, (6, 3), EVAL, mixed=((6, 192),)),
    )
    return ProfileGrid(prefills=prefills, decode_runs=runs, prefill_repeats=3, decode_steps=4, mixed_repeats=2)


def quick_grid() -> ProfileGrid:
    """A handful of shapes (well under a minute after engine start), for tests."""
    prefills = (PrefillShape(16, FIT), PrefillShape(128, FIT), PrefillShape(64, EVAL))
    runs = (
        DecodeRun(64, (4, 2, 1), FIT, mixed=((2, 64),)),
        DecodeRun(96, (3,), EVAL, mixed=((3, 32),)),
    )
    return ProfileGrid(prefills=prefills, decode_runs=runs, prefill_repeats=2, decode_steps=3, mixed_repeats=1)


class Profiler:
    """Runs a ProfileGrid on a started `cascadia.vllm_adapter.SyncEngine` (or anything with
    its methods: effective_settings, add_request, step, has_unfinished, abort)."""

    def __init__(self, engine, *, seed: int = 0, log: Callable[[str], None] | None = None):
        self.engine = engine
        self.effective = engine.effective_settings()
        self._rng = random.Random(seed)
        self._log = log or (lambda msg: None)
        self._next_id = 0
        self._prompt_len: dict[str, int] = {}  # live requests only
        self._computed: dict[str, int] = {}  # tokens in each live request's KV cache
        self.samples: list[IterationSample] = []
        # Ordinary tokens only: low ids hold the special and byte tokens in most vocabularies.
        self._token_lo = min(1000, self.effective.vocab_size // 4)
        self._token_hi = self.effective.vocab_size

    # ---- requests ----
    def _add(self, tag: str, prompt_tokens: int, max_tokens: int) -> str:
        self._next_id += 1
        rid = f"{tag}-{self._next_id}"
        prompt = [self._rng.randrange(self._token_lo, self._token_hi) for _ in range(prompt_tokens)]
        self.engine.add_request(rid, prompt, max_tokens, ignore_eos=True)
        self._prompt_len[rid] = prompt_tokens
        self._computed[rid] = 0
        return rid

    def _forget(self, rids) -> None:
        for rid in rids:
            self._prompt_len.pop(rid, None)
            self._computed.pop(rid, None)

    def _abort(self, rids: list[str]) -> None:
        self.engine.abort(rids)
        self._forget(rids)

    # ---- one timed iteration ----
    def _step(self, phase: str | None, detail: str) -> IterationSample | None:
        """Step once and classify the batch the scheduler formed; keep it unless phase is None."""
        result = self.engine.step()
        chunks, decodes = [], []
        for r in result.scheduled:
            prompt = self._prompt_len.get(r.request_id, 0)
            if r.scheduled_tokens == 1 and r.computed_tokens_before >= prompt:
                decodes.append(r.computed_tokens_before)
            else:
                chunks.append((r.scheduled_tokens, r.computed_tokens_before))
            if r.request_id in self._computed:
                self._computed[r.request_id] = r.computed_tokens_before + r.scheduled_tokens
        self._forget(result.finished_request_ids)
        if not result.scheduled:
            return None
        kind = "mixed" if chunks and decodes else ("prefill" if chunks else "decode")
        sample = IterationSample(
            prefill_chunks=tuple(chunks),
            decode_context_tokens=tuple(decodes),
            measured_s=result.elapsed_s,
            label=f"{phase}:{kind}:{detail}" if phase else "",
        )
        if phase is not None:
            self.samples.append(sample)
        return sample

    def _drain(self, phase: str | None, detail: str) -> None:
        while self.engine.has_unfinished():
            self._step(phase, detail)

    # ---- grid parts ----
    def warm_up(self) -> None:
        """Untimed traffic: the first iterations after start-up are slow."""
        self._add("warm", 256, 4)
        for _ in range(4):
            self._add("warm", 32, 8)
        self._drain(None, "")

    def run_prefill(self, shape: PrefillShape, repeats: int) -> None:
        for _ in range(repeats):
            self._add("prefill", shape.prompt_tokens, 1)
            self._drain(shape.phase, f"P={shape.prompt_tokens}")

    def run_decode(self, run: DecodeRun, steps: int, mixed_repeats: int = 1) -> None:
        c = run.context_tokens
        n_mixed = len(run.mixed) * mixed_repeats
        n_max = self._fit_batch(max(run.batch_sizes), c, steps, n_mixed)
        sizes = sorted((n for n in set(run.batch_sizes) if n <= n_max), reverse=True)
        if not sizes:
            self._log(f"skip decode run c={c}: no batch fits the KV cache")
            return
        mixed_at: dict[int, list[int]] = {}
        for n, p in run.mixed:
            mixed_at.setdefault(n, []).append(p)
        max_tokens = len(sizes) * steps + n_mixed + 8  # never finishes inside the run
        live = [self._add("decode", c, max_tokens) for _ in range(sizes[0])]
        # The batch's own prefill steps are exact multi-prompt (and, at the end, mixed) samples.
        while any(self._computed.get(r, c) < c for r in live):
            self._step(run.phase, f"setup:n={sizes[0]},c={c}")
        for n in sizes:
            if len(live) > n:
                self._abort(live[n:])
                live = live[:n]
            for _ in range(steps):
                self._step(run.phase, f"n={n},c={c}")
            for p in mixed_at.get(n, []):
                for _ in range(mixed_repeats):
                    extra = self._add("mixed", p, 1)
                    while extra in self._prompt_len:  # more than one step only if the prompt is chunked
                        self._step(run.phase, f"n={n},c={c},P={p}")
        self._abort(live)
        self._drain(None, "")

    def _fit_batch(self, n: int, context: int, steps: int, n_mixed: int) -> int:
        """Largest batch <= n whose KV cache (prompts, generated tokens, a mixed prompt) fits."""
        per_seq = context + 8 * steps + n_mixed + 16
        room = int(self.effective.kv_capacity_tokens * 0.9) - self.effective.max_num_batched_tokens
        return max(0, min(n, self.effective.max_num_seqs, room // per_seq))

    def run(self, grid: ProfileGrid) -> list[IterationSample]:
        for shape in grid.prefills:
            self._log(f"prefill P={shape.prompt_tokens} ({shape.phase})")
            self.run_prefill(shape, grid.prefill_repeats)
        for run in grid.decode_runs:
            self._log(f"decode c={run.context_tokens} n={run.batch_sizes} ({run.phase})")
            self.run_decode(run, grid.decode_steps, grid.mixed_repeats)
        return self.samples


# ---- whole jobs ----

def profile_engine(settings, *, quick: bool = False, grid: ProfileGrid | None = None, model_name: str = "",
                   device: str = "cpu", seed: int = 0,
                   log: Callable[[str], None] | None = None) -> ProfileRun:
    """Start a SyncEngine with `settings` (an EngineSettings), warm it up, run the grid
    (quick or full unless given), shut it down, and return the samples."""
    from cascadia.vllm_adapter import start_sync_engine

    log = log or (lambda msg: None)
    grid = grid or (quick_grid() if quick else full_grid())
    engine = start_sync_engine(settings)
    try:
        log(f"engine ready in {engine.startup_s:.1f} s")
        profiler = Profiler(engine, seed=seed, log=log)
        load_before = _load_average()
        t0 = time.perf_counter()
        profiler.warm_up()
        warm_s = time.perf_counter() - t0
        samples = profiler.run(grid)
        profile_s = time.perf_counter() - t0 - warm_s
        config = {
            "requested": settings.as_dict(),
            "effective": profiler.effective.as_dict(),
            "startup_s": round(engine.startup_s, 3),
            "warmup_s": round(warm_s, 3),
            "profile_s": round(profile_s, 3),
            "grid": "custom" if grid not in (quick_grid(), full_grid()) else ("quick" if quick else "full"),
            "seed": seed,
            # Other work on the host inflates step times; recorded so a noisy run can be spotted.
            "load_average_before": load_before,
            "load_average_after": _load_average(),
        }
    finally:
        engine.shutdown()
    return ProfileRun(model=model_name or settings.model, device=device, engine_config=config,
                      samples=tuple(samples))


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def summary_rows(run: ProfileRun) -> list[tuple[str, int, float, float]]:
    """(label, samples, median ms, min ms) per label, in first-seen order."""
    groups: dict[str, list[float]] = {}
    for s in run.samples:
        groups.setdefault(s.label, []).append(s.measured_s * 1e3)
    rows = []
    for label, ms in groups.items():
        ms_sorted = sorted(ms)
        rows.append((label, len(ms), ms_sorted[len(ms) // 2], ms_sorted[0]))
    return rows


def format_summary(run: ProfileRun) -> str:
    lines = [f"{'label':<40} {'n':>3} {'median ms':>10} {'min ms':>8}"]
    lines += [f"{label:<40} {n:>3} {med:>10.1f} {lo:>8.1f}" for label, n, med, lo in summary_rows(run)]
    return "\n".join(lines)


def samples_path_for(out: Path) -> Path:
    """Where the raw samples of a calibration file go: `<out>.samples.json`."""
    out = Path(out)
    return out.with_name(out.name + ".samples.json")


def _resolve_model(model: str):
    """(local model dir, ModelSpec) for a catalog name with packaged weights or a local HF dir."""
    from cascadia.specs.model import model_from_hf_config

    path = Path(model).expanduser()
    if path.is_dir():
        return path, model_from_hf_config(path, name=path.name)
    from cascadia.catalog import get_model

    spec = get_model(model)  # KeyError names the known models
    if spec.name == "smollm2-135m-instruct":
        from cascadia.model_store import ensure_smollm2

        return ensure_smollm2(), spec
    if spec.weights.local_path and Path(spec.weights.local_path).is_dir():
        return Path(spec.weights.local_path), spec
    raise KeyError(f"model {model!r} has no local weights here; pass the path of a Hugging Face model directory")


def profile_main(model: str, out: Path, quick: bool = False, *, device: str = "cpu",
                 kv_cache_gib: float | None = 1.0, max_num_batched_tokens: int | None = None,
                 max_num_seqs: int | None = None, enforce_eager: bool | None = None,
                 seed: int = 0) -> int:
    """`cascadia profile`: measure the engine, save the raw samples to `<out>.samples.json`,
    and fit a calibration into `out` (when cascadia.perf.calibration is available).
    Returns a process exit code."""
    from cascadia.specs.gpu import get_gpu
    from cascadia.vllm_adapter import EngineError, EngineSettings

    out = Path(out)

    def log(msg: str) -> None:
        print(f"[profile] {msg}", file=sys.stderr, flush=True)

    try:
        model_dir, model_spec = _resolve_model(model)
        device_spec = get_gpu(device)
    except Exception as e:  # ModelStoreError, KeyError, SpecError: all user-facing
        log(f"error: {e}")
        return 2
    settings = EngineSettings(
        model=str(model_dir), dtype="float32" if device_spec.name == "cpu" else "auto",
        kv_cache_gib=kv_cache_gib, max_num_batched_tokens=max_num_batched_tokens,
        max_num_seqs=max_num_seqs, enforce_eager=enforce_eager, seed=seed,
    )
    try:
        run = profile_engine(settings, quick=quick, model_name=model_spec.name, device=device_spec.name,
                             seed=seed, log=log)
    except EngineError as e:
        log(f"error: {e}")
        return 1
    out.parent.mkdir(parents=True, exist_ok=True)
    samples_file = samples_path_for(out)
    run.save(samples_file)
    log(f"{len(run.samples)} samples saved to {samples_file}")
    print(format_summary(run))
    try:
        from cascadia.perf.calibration import fit_calibration
    except ImportError as e:
        log(f"calibration fit unavailable ({e}); only the raw samples were saved")
        return 0
    calibration = fit_calibration(run, model_spec, device_spec)
    calibration.save(out)
    log(f"calibration saved to {out}")
    return 0
