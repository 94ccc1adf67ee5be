"""Peer comparison: the same requests against vLLM's own OpenAI-compatible server serving
SmolLM2-135M-Instruct alone, and against Cascadia's CPU default cascade (2 x SmolLM2,
logprob judge), one run each, measured with `cascadia replay` and tabled by
`cascadia report`.

Requests: the Azure conversation selection of benchmarks/sim_vs_live.py (arrivals rescaled
to `--rate`, output caps = traced output lengths), with real prompts (MT-Bench first
turns, cycled) so that the judge's score means something: chat endpoint, temperature 0,
answers stop at EOS (no ignore_eos: both servers run the same model greedily, so their
answers and lengths match unless the cascade escalates). Quality: the logprob judge,
100 x exp(mean token logprob) of the returned answer: for vLLM computed from the streamed
logprobs, for Cascadia by the server's own judge (`cascade.judge_answer`), which is the
same formula on the same engine's logprobs.

    .venv/bin/python benchmarks/peer_comparison.py --rate 0.7 --out-dir benchmarks/results/peer
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
import urllib.request
from pathlib import Path

from benchmarks.sim_vs_live import select_requests, start_server, stop_server, write_azure_csv

READY_TIMEOUT_S = 600.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_models(url: str, proc, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Poll GET /v1/models until it answers 200 (bounded), failing fast if the server died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2.0)  # readiness poll, bounded by the deadline
    raise RuntimeError(f"{url} not ready within {timeout_s:.0f} s")


def replay(url: str, trace_file: Path, time_scale: float, out: Path, extra: list[str]) -> None:
    from cascadia.cli import main

    argv = ["replay", "--url", url, "--trace", str(trace_file), "--time-scale", f"{time_scale:.9g}",
            "--prompts", "mtbench", "--no-ignore-eos", "--no-progress", "--out", str(out), *extra]
    print("$ cascadia " + " ".join(argv), flush=True)
    if main(argv) != 0:
        raise RuntimeError("replay failed")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default="benchmarks/results/peer")
    ap.add_argument("--rate", type=float, default=0.7, help="mean arrival rate (req/s; default 0.7)")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--start", type=int, default=1000)
    ap.add_argument("--length-scale", type=float, default=0.08)
    ap.add_argument("--max-input", type=int, default=256)
    ap.add_argument("--max-output", type=int, default=64)
    args = ap.parse_args()
    from cascadia.model_store import ensure_smollm2

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trace = select_requests(args.n, args.start, args.length_scale, args.max_input, args.max_output)
    trace_file = out_dir / "requests.csv"
    write_azure_csv(trace, trace_file)
    scale = trace.mean_rate_rps / args.rate
    body = '{"temperature": 0, "cascade": {"judge_answer": true}}'

    proc, url = start_server([str(Path(sys.executable).with_name("cascadia")), "serve", "--port", "0"],
                             out_dir / "cascadia-server.log")
    try:
        replay(url, trace_file, 1e-6, out_dir / "cascadia-warmup.jsonl", ["--limit", "4", "--extra-body", body])
        replay(url, trace_file, scale, out_dir / "cascadia.jsonl", ["--extra-body", body])
    finally:
        stop_server(proc)

    model_dir = str(ensure_smollm2())
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--dtype", "float32",
           "--host", "127.0.0.1", "--port", str(port), "--enforce-eager", "--no-enable-prefix-caching", "--seed", "0",
           "--disable-log-stats", "--disable-uvicorn-access-log"]
    print("$ VLLM_CPU_KVCACHE_SPACE=1 " + " ".join(cmd), flush=True)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    log = open(out_dir / "vllm-server.log", "w")
    import subprocess

    vproc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    vurl = f"http://127.0.0.1:{port}"
    try:
        wait_models(vurl, vproc)
        replay(vurl, trace_file, 1e-6, out_dir / "vllm-warmup.jsonl", ["--limit", "4", "--logprobs",
                                                                       "--extra-body", '{"temperature": 0}'])
        replay(vurl, trace_file, scale, out_dir / "vllm.jsonl", ["--logprobs", "--extra-body", '{"temperature": 0}'])
    finally:
        stop_server(vproc)
        log.close()
    from cascadia.cli import main as cli

    argv = ["report", str(out_dir / "vllm.jsonl"), str(out_dir / "cascadia.jsonl"), "--labels",
            "vllm-openai-server,cascadia-default", "--plot", str(out_dir / "peer.png"), "--json",
            str(out_dir / "report.json")]
    print("$ cascadia " + " ".join(argv), flush=True)
    return cli(argv)


if __name__ == "__main__":
    sys.exit(main())
