"""API keys and per-request limits: key sources, the constant-time check, and the server's
401/400 answers over real HTTP on 127.0.0.1 (fake engines)."""

import asyncio
import subprocess
import sys

import pytest
from aiohttp.test_utils import TestClient, TestServer

from router.auth import AccessPolicy, KeyConfigError, bearer_token, key_matches, load_keys
from router.cascade import Cascade, Stage
from router.judges import LogprobJudge
from router.metrics import RouterMetrics
from router.server import make_app
from server_thread import record_figure
from test_router_front import THRESHOLD, FakeEngine

KEY, OTHER = "sk-cascadia-test-1", "sk-cascadia-test-2"


def test_keys_come_from_flags_environment_and_file(tmp_path):
    f = tmp_path / "keys.txt"
    f.write_text("# team keys\nsk-file-1\n\n  sk-file-2  \nsk-flag\n")
    keys = load_keys(["sk-flag"], str(f), environ={"CASCADIA_API_KEYS": "sk-env-1, sk-env-2,"})
    assert keys == ("sk-flag", "sk-env-1", "sk-env-2", "sk-file-1", "sk-file-2")
    assert load_keys([], None, environ={}) == ()
    with pytest.raises(KeyConfigError, match="empty key"):
        load_keys([" "], None, environ={})
    with pytest.raises(KeyConfigError, match="whitespace"):
        load_keys(["two words"], None, environ={})
    with pytest.raises(KeyConfigError, match="missing.txt"):
        load_keys([], str(tmp_path / "missing.txt"), environ={})


def test_bearer_parsing_and_matching():
    assert bearer_token("Bearer abc") == "abc" and bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None and bearer_token("Bearer ") is None and bearer_token(None) is None
    assert key_matches("b", ["a", "b", "c"]) and not key_matches("d", ["a", "b"])
    assert not key_matches(None, ["a"]) and not key_matches("", [""])
    assert not key_matches("\udcff", ["a"])  # undecodable bytes never crash the check


def test_policy_keeps_health_open_and_metrics_open_unless_protected():
    open_metrics = AccessPolicy((KEY,))
    assert not open_metrics.needs_key("/health") and not open_metrics.needs_key("/health/ready")
    assert not open_metrics.needs_key("/metrics") and open_metrics.needs_key("/v1/models")
    assert AccessPolicy((KEY,), protect_metrics=True).needs_key("/metrics")
    assert not AccessPolicy().needs_key("/v1/chat/completions")  # no keys: open server


def run(access: AccessPolicy, test):
    small, large = FakeEngine("small"), FakeEngine("large")
    cascade = Cascade([Stage("small", small, THRESHOLD), Stage("large", large, None)], LogprobJudge())
    app = make_app(cascade, model_name="cascade", member_engines={"small": small, "large": large},
                   metrics=RouterMetrics(), access=access)

    async def main():
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            return await test(client)

    return asyncio.run(main())


def ask(max_tokens=None):
    body = {"model": "cascade", "messages": [{"role": "user", "content": "easy one"}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


def test_requests_without_a_valid_key_get_401_and_the_server_keeps_serving():
    async def test(client):
        out = {}
        out["none"] = await client.post("/v1/chat/completions", json=ask(4))
        out["wrong"] = await client.post("/v1/chat/completions", json=ask(4),
                                         headers={"Authorization": "Bearer nope"})
        out["basic"] = await client.get("/v1/models", headers={"Authorization": f"Basic {KEY}"})
        out["ok1"] = await client.post("/v1/chat/completions", json=ask(4),
                                       headers={"Authorization": f"Bearer {KEY}"})
        out["ok2"] = await client.get("/v1/models", headers={"Authorization": f"Bearer {OTHER}"})
        out["health"] = await client.get("/health")
        out["metrics"] = await client.get("/metrics")
        return {k: (r.status, await r.json() if r.content_type == "application/json" else await r.text())
                for k, r in out.items()}

    got = run(AccessPolicy((KEY, OTHER)), test)
    for k in ("none", "wrong", "basic"):
        status, body = got[k]
        assert status == 401, k
        assert body["error"]["code"] == "invalid_api_key" and "Bearer" in body["error"]["message"]
        assert set(body["error"]) == {"message", "type", "param", "code"}
    assert got["ok1"][0] == 200 and got["ok1"][1]["choices"][0]["message"]["content"]
    assert got["ok2"][0] == 200 and got["health"][0] == 200 and got["metrics"][0] == 200
    assert 'status="unauthorized"' in got["metrics"][1]
    record_figure("API keys", rejected_401=3, accepted=2, health_open=True, metrics_open=True)


def test_protected_metrics_need_the_key():
    async def test(client):
        bare = await client.get("/metrics")
        keyed = await client.get("/metrics", headers={"Authorization": f"Bearer {KEY}"})
        return bare.status, keyed.status

    assert run(AccessPolicy((KEY,), protect_metrics=True), test) == (401, 200)


def test_max_tokens_limit_rejects_larger_requests_and_caps_open_ended_ones():
    async def test(client):
        over = await client.post("/v1/chat/completions", json=ask(9))
        at = await client.post("/v1/chat/completions", json=ask(8))
        open_ended = await client.post("/v1/chat/completions", json=ask())
        return (over.status, await over.json()), (at.status, await at.json()), (open_ended.status,
                                                                                 await open_ended.json())

    (s_over, over), (s_at, at), (s_open, open_ended) = run(AccessPolicy(max_tokens_limit=8), test)
    assert s_over == 400 and over["error"]["param"] == "max_tokens" and "limit of 8" in over["error"]["message"]
    assert s_at == 200 and at["usage"]["completion_tokens"] <= 8
    assert s_open == 200 and open_ended["usage"]["completion_tokens"] <= 8


@pytest.mark.parametrize("argv, needle", [
    (["--protect-metrics"], "--protect-metrics needs an API key"),
    (["--api-key", "a b"], "whitespace"),
    (["--max-tokens-limit", "0"], "--max-tokens-limit must be at least 1"),
    (["--max-body-bytes", "10"], "--max-body-bytes must be at least 1024"),
])
def test_serve_flag_errors_are_one_line_and_exit_2(argv, needle):
    proc = subprocess.run([sys.executable, "-m", "cascadia", "serve", *argv], capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "CASCADIA_API_KEYS": ""})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr
