"""Out-of-sample check of the analytic GPU performance model against published vLLM figures.

    .venv/bin/python benchmarks/gpu_published.py [--yaml FILE] [--out-md FILE]

Every entry of benchmarks/data/published_vllm_gpu.yaml (H100 / A100 measurements with
citations) is predicted with the default `Efficiency` coefficients, untouched by these
data, and compared with the published value.

- batch_latency (vLLM benchmark_latency.py) is priced with the iteration model directly:
  one prefill of the whole batch (split into iterations by the token budget), then
  output_tokens - 1 decode iterations at contexts input + j.
- serving / throughput entries used ShareGPT, which we do not have. Their lengths are a
  synthetic stand-in (`sharegpt_like_lengths`) whose means come from the entry's own
  totals or, failing those, from other entries of the same file; they go through the
  simulator and are labelled "approximate workload".
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import yaml

from cascadia.catalog import get_model
from cascadia.perf.iteration import Efficiency, IterationModel
from cascadia.perf.layout import Layout
from cascadia.sim.cluster import StageDeployment, simulate
from cascadia.sim.config import EngineConfig
from cascadia.specs.gpu import GPUSpec, get_gpu
from cascadia.specs.model import ModelSpec, model_from_hf_config
from cascadia.traces import Trace, poisson_arrivals

DEFAULT_YAML = Path(__file__).parent / "data" / "published_vllm_gpu.yaml"
BATCH_TOKEN_BUDGET = 8192
# ShareGPT means when an entry gives no totals. Input: the GPUStack entries' totals
# (23260 prompt tokens / 100 requests, chat template included). Output: the SGLang
# offline rows' output token/s over request/s (4132.37 / 21.27 and 3700.64 / 19.04).
SHAREGPT_MEAN_INPUT_TOKENS = 23260 / 100
SHAREGPT_MEAN_OUTPUT_TOKENS = (4132.37 / 21.27 + 3700.64 / 19.04) / 2
# the benchmark clients drop ShareGPT conversations outside these bounds
SHAREGPT_MAX_INPUT_TOKENS, SHAREGPT_MAX_TOTAL_TOKENS, SHAREGPT_MIN_TOKENS = 1024, 2048, 4
SHAREGPT_LOG_SIGMA = 1.0
# short YAML names -> Hugging Face config.json keys
HF_KEYS = {"layers": "num_hidden_layers", "hidden": "hidden_size", "heads": "num_attention_heads",
           "kv_heads": "num_key_value_heads", "head_dim": "head_dim", "intermediate": "intermediate_size",
           "vocab": "vocab_size", "experts": "num_local_experts", "active_experts": "num_experts_per_tok",
           "moe_intermediate": "moe_intermediate_size", "tie_word_embeddings": "tie_word_embeddings"}


@dataclass(frozen=True)
class Workload:
    kind: str  # batch_latency | serving | throughput
    batch_size: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    num_prompts: int = 0
    request_rate: float = math.inf
    max_concurrency: int | None = None
    total_input_tokens: int | None = None
    total_output_tokens: int | None = None

    def describe(self) -> str:
        if self.kind == "batch_latency":
            return f"batch bs{self.batch_size} in{self.input_tokens} out{self.output_tokens}"
        load = f"c{self.max_concurrency}" if self.max_concurrency else f"{self.request_rate:g} rps"
        return f"{self.kind} sharegpt* n{self.num_prompts} {load}"


@dataclass(frozen=True)
class Entry:
    id: str
    model: ModelSpec
    gpu: GPUSpec
    tp: int
    workload: Workload
    metric: str  # e2e_s | tpot_ms | ttft_ms | output_tokens_per_s
    statistic: str  # mean | median
    value: float
    url: str
    quote: str
    vllm_version: str | None


@dataclass(frozen=True)
class Prediction:
    entry: Entry
    predicted: float
    approximate_workload: bool

    @property
    def error(self) -> float:
        return (self.predicted - self.entry.value) / self.entry.value


def gpu_spec(name: str) -> GPUSpec:
    """The catalog has no 40 GB A100: the 80 GB part with the 40 GB SXM's 1.555 TB/s HBM2."""
    if name.upper() == "A100-40G":
        return get_gpu("A100-80G").with_(name="A100-40G", memory_bytes=40e9, memory_bandwidth_Bps=1.555e12)
    return get_gpu(name)


def model_spec(raw: Mapping[str, Any]) -> ModelSpec:
    if raw["model"] != "custom":
        return get_model(raw["model"])
    cfg = raw["model_config"]
    hf = {HF_KEYS[k]: v for k, v in cfg.items() if k in HF_KEYS}
    return model_from_hf_config(hf, name=cfg.get("hf_id", raw["id"]))


def parse_entry(raw: Mapping[str, Any]) -> Entry:
    w = dict(raw["workload"])
    rate = w.get("request_rate", math.inf)
    workload = Workload(
        kind=w["kind"], batch_size=int(w.get("batch_size", 0)), input_tokens=int(w.get("input_tokens", 0)),
        output_tokens=int(w.get("output_tokens", 0)), num_prompts=int(w.get("num_prompts", 0)),
        request_rate=math.inf if rate in ("inf", None) else float(rate), max_concurrency=w.get("max_concurrency"),
        total_input_tokens=w.get("total_input_tokens"), total_output_tokens=w.get("total_output_tokens"))
    return Entry(id=raw["id"], model=model_spec(raw), gpu=gpu_spec(raw["gpu"]), tp=int(raw["tp"]),
                 workload=workload, metric=raw["metric"], statistic=raw["statistic"], value=float(raw["value"]),
                 url=raw["url"], quote=raw["quote"], vllm_version=raw.get("vllm_version"))


def load_entries(path: Path = DEFAULT_YAML) -> list[Entry]:
    return [parse_entry(raw) for raw in yaml.safe_load(Path(path).read_text())]


def prefill_iterations(batch_size: int, input_tokens: int, budget: int) -> list[list[tuple[int, int]]]:
    """The batch's prompts packed into iterations of at most `budget` tokens, a prompt
    split across iterations when it does not fit (chunked prefill)."""
    iterations, current, room = [], [], budget
    for _ in range(batch_size):
        done = 0
        while done < input_tokens:
            chunk = min(input_tokens - done, room)
            current.append((chunk, done))
            done, room = done + chunk, room - chunk
            if room == 0:
                iterations.append(current)
                current, room = [], budget
    if current:
        iterations.append(current)
    return iterations


def batch_latency_e2e_s(model: ModelSpec, gpu: GPUSpec, tp: int, batch_size: int, input_tokens: int,
                        output_tokens: int, *, budget: int = BATCH_TOKEN_BUDGET,
                        eff: Efficiency | None = None) -> float:
    """benchmark_latency.py: prefill the batch, then output_tokens - 1 decode steps."""
    im = IterationModel(model, gpu, Layout(tp), eff)
    prefill = sum(im.iteration_time_s(chunks, []) for chunks in prefill_iterations(batch_size, input_tokens, budget))
    decode = sum(im.iteration_time_s([], [input_tokens + j] * batch_size) for j in range(output_tokens - 1))
    return prefill + decode


def sharegpt_like_lengths(n: int, mean_input: float, mean_output: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Log-normal lengths (log-sd SHAREGPT_LOG_SIGMA, heavy-tailed like ShareGPT) clipped to the
    benchmark clients' filter (input <= 1024, input + output <= 2048, both >= 4), with the
    log-mean solved by bisection so the clipped means equal the targets."""
    rng = np.random.default_rng(seed)
    z_in, z_out = rng.standard_normal(n), rng.standard_normal(n)

    def solve(z: np.ndarray, target: float, upper: np.ndarray | float) -> np.ndarray:
        lo, hi = 0.0, 10.0
        for _ in range(60):
            mu = (lo + hi) / 2
            lengths = np.clip(np.rint(np.exp(mu + SHAREGPT_LOG_SIGMA * z)), SHAREGPT_MIN_TOKENS, upper)
            lo, hi = (mu, hi) if lengths.mean() < target else (lo, mu)
        return lengths.astype(np.int64)

    inputs = solve(z_in, mean_input, SHAREGPT_MAX_INPUT_TOKENS)
    outputs = solve(z_out, mean_output, SHAREGPT_MAX_TOTAL_TOKENS - inputs)
    return inputs, outputs


def engine_config(entry: Entry, max_num_seqs: int | None = None) -> EngineConfig:
    """The engine defaults of the entry's vLLM version. 0.6.0 (run with max_model_len 4096 and
    multi-step scheduling) had chunked prefill off and a budget of max(max_model_len, 2048);
    V1 (0.11) has chunked prefill, 8192 tokens and 1024 sequences for `vllm serve` on an H100."""
    if entry.vllm_version == "0.6.0":
        cfg = EngineConfig(max_num_batched_tokens=4096, max_num_seqs=256, enable_chunked_prefill=False)
    else:
        cfg = EngineConfig(max_num_batched_tokens=8192, max_num_seqs=1024)
    if max_num_seqs is not None:
        cfg = EngineConfig(**{**cfg.to_dict(), "max_num_seqs": max_num_seqs})
    return cfg


def serving_trace(entry: Entry, seed: int = 0) -> tuple[Trace, EngineConfig]:
    """Synthetic trace and engine config. A closed loop of concurrency c is emulated by
    queueing every request at t=0 with max_num_seqs=c (zero client think time); for c=1
    requests are instead spaced further apart than any can take, so TTFT has no queueing."""
    w = entry.workload
    n = w.num_prompts
    mean_in = w.total_input_tokens / n if w.total_input_tokens else SHAREGPT_MEAN_INPUT_TOKENS
    mean_out = w.total_output_tokens / n if w.total_output_tokens else SHAREGPT_MEAN_OUTPUT_TOKENS
    inputs, outputs = sharegpt_like_lengths(n, mean_in, mean_out, seed)
    cfg = engine_config(entry)
    if w.max_concurrency == 1:
        gap = 2.0 * batch_latency_e2e_s(entry.model, entry.gpu, entry.tp, 1, int(inputs.max()), int(outputs.max()))
        arrivals = gap * np.arange(n, dtype=np.float64)
    elif w.max_concurrency:
        arrivals, cfg = np.zeros(n), engine_config(entry, max_num_seqs=int(w.max_concurrency))
    elif math.isinf(w.request_rate):
        arrivals = np.zeros(n)
    else:
        arrivals = poisson_arrivals(n, w.request_rate, seed)
    return Trace(f"{entry.id}-synthetic", arrivals, inputs, outputs), cfg


def _statistic(values: np.ndarray, statistic: str) -> float:
    return float(np.median(values) if statistic == "median" else np.mean(values))


def predict(entry: Entry, eff: Efficiency | None = None, seed: int = 0) -> Prediction:
    w = entry.workload
    if w.kind == "batch_latency":
        if entry.metric != "e2e_s":
            raise ValueError(f"{entry.id}: batch_latency entries are predicted as e2e_s, not {entry.metric}")
        value = batch_latency_e2e_s(entry.model, entry.gpu, entry.tp, w.batch_size, w.input_tokens, w.output_tokens,
                                    eff=eff)
        return Prediction(entry, value, approximate_workload=False)
    trace, cfg = serving_trace(entry, seed)
    res = simulate(trace, StageDeployment(entry.model, entry.gpu, (Layout(entry.tp),), cfg, eff), fast_forward=True)
    if res.n_unfinished:
        raise RuntimeError(f"{entry.id}: {res.n_unfinished} simulated requests did not finish")
    if entry.metric == "tpot_ms":
        value = 1e3 * _statistic(res.tpot_s[res.output_tokens > 1], entry.statistic)
    elif entry.metric == "ttft_ms":
        value = 1e3 * _statistic(res.ttft_s, entry.statistic)
    elif entry.metric == "output_tokens_per_s":
        value = res.output_tokens_per_s()
    else:
        raise ValueError(f"{entry.id}: no prediction for metric {entry.metric!r}")
    return Prediction(entry, value, approximate_workload=True)


def mean_abs_error(preds: list[Prediction]) -> float:
    return float(np.mean([abs(p.error) for p in preds])) if preds else float("nan")


def format_report(preds: list[Prediction]) -> str:
    head = "| id | model | gpu | tp | workload | metric | published | predicted | error % |"
    lines = [head, "|" + "---|" * 9]
    for p in preds:
        e = p.entry
        work = e.workload.describe() + (" (approximate workload)" if p.approximate_workload else "")
        lines.append(f"| {e.id} | {e.model.name} | {e.gpu.name} | {e.tp} | {work} | {e.statistic} {e.metric} "
                     f"| {e.value:.4g} | {p.predicted:.4g} | {100 * p.error:+.1f} |")
    batch = [p for p in preds if p.entry.workload.kind == "batch_latency"]
    approx = [p for p in preds if p.approximate_workload]
    lines += ["", f"Mean absolute error, all {len(preds)} entries: {100 * mean_abs_error(preds):.1f}%",
              f"Mean absolute error, {len(batch)} batch_latency entries: {100 * mean_abs_error(batch):.1f}%",
              f"Mean absolute error, {len(approx)} approximate-workload entries: {100 * mean_abs_error(approx):.1f}%",
              "(* sharegpt: synthetic log-normal lengths with the means given in the script, not the dataset)"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--yaml", type=Path, default=DEFAULT_YAML, help="published measurements (YAML)")
    ap.add_argument("--out-md", type=Path, default=None,
                    help="also write the table into this Markdown file, between the TABLE markers if present")
    args = ap.parse_args()
    report = format_report([predict(e) for e in load_entries(args.yaml)])
    print(report)
    if args.out_md is not None:
        begin, end = "<!-- TABLE BEGIN -->", "<!-- TABLE END -->"
        old = args.out_md.read_text() if args.out_md.exists() else ""
        if begin in old and end in old:
            text = old[: old.index(begin) + len(begin)] + "\n" + report + "\n" + old[old.index(end):]
        else:
            text = f"# vLLM on H100/A100: published vs predicted\n\n{begin}\n{report}\n{end}\n"
        args.out_md.parent.mkdir(parents=True, exist_ok=True)
        args.out_md.write_text(text)


if __name__ == "__main__":
    main()
