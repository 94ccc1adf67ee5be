"""The OpenAI-compatible server end to end over real HTTP on 127.0.0.1, with fake engines."""

import asyncio
import json

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from router.cascade import Cascade, Stage
from router.judges import LogprobJudge
from router.metrics import RouterMetrics
from router.server import make_app
from test_router_front import THRESHOLD, FakeEngine

MODEL = "cascade"
MAX_BODY = 4096
ABORTED = dict(model=MODEL, stage="none", status="aborted")


def build(delay_s: float = 0.0, **kw):
    small, large = FakeEngine("small", delay_s=delay_s, **kw), FakeEngine("large", delay_s=delay_s, **kw)
    cascade = Cascade([Stage("small", small, THRESHOLD), Stage("large", large, None)], LogprobJudge())
    app = make_app(cascade, model_name=MODEL, member_engines={"small": small, "large": large},
                   metrics=RouterMetrics(), max_body_bytes=MAX_BODY)
    return app, small, large


def serve(test, **kw):
    """Run ``test(client, small, large)`` against the app on a real 127.0.0.1 socket."""
    app, small, large = build(**kw)

    async def main():
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            return await test(client, small, large)

    return asyncio.run(main())


def ask(text, model=MODEL, **extra):
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 8, **extra}


async def sse_events(resp) -> list:
    raw = (await resp.read()).decode()
    assert raw.endswith("\n\n")
    events = raw.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), raw
    return [e[len("data: "):] for e in events]


async def metric_samples(client) -> dict:
    resp = await client.get("/metrics")
    assert resp.status == 200
    out = {}
    for family in text_string_to_metric_families(await resp.text()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def delta(before, after, name, **labels):
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_non_streaming_chat_names_the_answering_stage_and_counts_metrics():
    async def test(client, small, large):
        before = await metric_samples(client)
        easy = await client.post("/v1/chat/completions", json=ask("easy one"), headers={"x-request-id": "req-1"})
        hard = await client.post("/v1/chat/completions", json=ask("hard one"))
        after = await metric_samples(client)
        return easy, await easy.json(), hard, await hard.json(), before, after, small, large

    easy, easy_body, hard, hard_body, before, after, small, large = serve(test)
    assert easy.status == 200 and easy.headers["x-request-id"] == "req-1"
    assert easy.headers["x-cascadia-stage"] == "small" and easy_body["cascade"]["stage"] == 0
    assert easy_body["object"] == "chat.completion" and easy_body["model"] == MODEL
    assert easy_body["choices"][0]["message"] == {"role": "assistant", "content": "".join(small.words(""))}
    assert easy_body["choices"][0]["finish_reason"] == "length"
    assert easy_body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert small.started[0] == "req-1-s0"  # the client's request id reaches the engine
    assert hard.headers["x-cascadia-stage"] == "large" and len(hard.headers["x-request-id"]) >= 16
    assert hard_body["cascade"]["stage_name"] == "large" and hard_body["cascade"]["escalations"] == 1
    assert hard_body["cascade"]["scores"][0] < THRESHOLD < easy_body["cascade"]["scores"][0]

    assert delta(before, after, "cascadia_requests_total", model=MODEL, stage="small", status="ok") == 1
    assert delta(before, after, "cascadia_requests_total", model=MODEL, stage="large", status="ok") == 1
    assert delta(before, after, "cascadia_escalations_total", stage="small") == 1
    assert delta(before, after, "cascadia_judge_score_count", stage="small") == 2
    assert delta(before, after, "cascadia_judge_score_count", stage="large") == 0
    assert delta(before, after, "cascadia_judge_latency_seconds_count", stage="small") == 2
    assert delta(before, after, "cascadia_e2e_seconds_count", model=MODEL) == 2
    assert delta(before, after, "cascadia_ttft_seconds_count", model=MODEL) == 2
    assert after[("cascadia_replica_healthy", (("stage", "small"),))] == 1.0
    assert after[("cascadia_stage_queue_depth", (("stage", "large"),))] == 0.0


def test_completions_endpoint_and_member_models_bypass_the_cascade():
    async def test(client, small, large):
        models = await (await client.get("/v1/models")).json()
        comp = await client.post("/v1/completions", json={"model": MODEL, "prompt": "easy", "max_tokens": 3})
        direct = await client.post("/v1/chat/completions", json=ask("hard one", model="small"))
        return models, await comp.json(), direct, await direct.json(), small, large

    models, comp, direct, direct_body, small, large = serve(test)
    ids = [m["id"] for m in models["data"]]
    assert ids == [MODEL, "small", "large"]
    info = models["data"][0]["cascade"]
    assert info["stages"] == [{"name": "small", "threshold": THRESHOLD}, {"name": "large", "threshold": None}]
    assert info["judge"]["name"] == "logprob"
    assert comp["object"] == "text_completion" and comp["choices"][0]["text"] == "".join(small.words("")[:3])
    assert small.prompts[0] == "easy"  # completions: the prompt goes to the engine as is
    # a hard prompt sent to a member is answered by it, unjudged
    assert direct.headers["x-cascadia-stage"] == "small" and direct_body["cascade"]["scores"] == []
    assert large.started == []


def test_streaming_sse_framing_usage_and_done():
    async def test(client, small, large):
        resp = await client.post("/v1/chat/completions",
                                 json=ask("hard q", stream=True, stream_options={"include_usage": True}))
        return resp, await sse_events(resp), large

    resp, events, large = serve(test)
    assert resp.status == 200 and resp.headers["content-type"].startswith("text/event-stream")
    assert resp.headers["x-cascadia-stage"] == "large"
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "".join(large.words(""))
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 4
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert all(c["cascade"]["stage_name"] == "large" for c in chunks[:-1])


def test_streaming_without_usage_and_with_escalation_opt_out():
    async def test(client, small, large):
        resp = await client.post("/v1/chat/completions", json=ask("hard q", stream=True),
                                 headers={"x-cascadia-escalate": "false"})
        body = ask("hard q", stream=True, cascade={"escalate": False})
        resp2 = await client.post("/v1/completions", json={**body, "prompt": "hard q", "messages": None})
        return resp, await sse_events(resp), await sse_events(resp2), large

    resp, events, events2, large = serve(test)
    assert resp.headers["x-cascadia-stage"] == "small" and large.started == []
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("usage" not in c for c in chunks) and events[-1] == "[DONE]"
    assert all(json.loads(e)["object"] == "text_completion" for e in events2[:-1])


def test_bad_input_gets_openai_errors_and_the_server_keeps_serving():
    cases = [
        (b"{not json", 400, None, "invalid_json"),
        (json.dumps([1, 2]).encode(), 400, None, "invalid_json"),
        (json.dumps({"model": MODEL}).encode(), 400, "messages", "missing_required_parameter"),
        (json.dumps({"model": MODEL, "messages": "hi"}).encode(), 400, "messages", "invalid_type"),
        (json.dumps(ask("x", temperature="hot")).encode(), 400, "temperature", "invalid_type"),
        (json.dumps(ask("x", max_tokens="8")).encode(), 400, "max_tokens", "invalid_type"),
        (json.dumps({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}).encode(), 400,
         "messages[0].role", "invalid_value"),
        (json.dumps(ask("x", model="gpt-9")).encode(), 404, "model", "model_not_found"),
        (json.dumps(ask("x", max_tokens=0)).encode(), 400, "max_tokens", "invalid_value"),
        (json.dumps(ask("x", max_tokens=-3)).encode(), 400, "max_tokens", "invalid_value"),
        (json.dumps(ask("x", max_tokens=10_000)).encode(), 400, "max_tokens", "context_length_exceeded"),
        (json.dumps(ask("x " * 100)).encode(), 400, "messages", "context_length_exceeded"),
        (json.dumps(ask("x", n=3)).encode(), 400, "n", "unsupported_value"),
        (json.dumps(ask("x" * (MAX_BODY + 10))).encode(), 413, None, "request_too_large"),
    ]

    async def test(client, small, large):
        answers = []
        for raw, *_ in cases:
            resp = await client.post("/v1/chat/completions", data=raw, headers={"content-type": "application/json"})
            answers.append((resp.status, await resp.json(), resp.headers.get("x-request-id")))
        ok = await client.post("/v1/chat/completions", json=ask("easy"))
        missing = await client.get("/v1/nothing")
        return answers, ok.status, missing.status, await missing.json()

    answers, ok_status, missing_status, missing_body = serve(test)
    for (raw, status, param, code), (got_status, body, rid) in zip(cases, answers):
        error = body["error"]
        assert (got_status, error["param"], error["code"]) == (status, param, code), (raw[:60], body)
        assert set(error) == {"message", "type", "param", "code"} and error["message"] and rid
        assert error["type"] == "invalid_request_error"
    assert ok_status == 200
    assert missing_status == 404 and set(missing_body["error"]) == {"message", "type", "param", "code"}


def test_health_endpoints_follow_the_engines():
    async def test(client, small, large):
        live = (await client.get("/health/live")).status
        ready = (await client.get("/health/ready")).status
        large.healthy = False
        not_ready = await client.get("/health/ready")
        health = (await client.get("/health")).status
        return live, ready, not_ready.status, await not_ready.json(), health

    live, ready, not_ready, body, health = serve(test)
    assert (live, ready, not_ready, health) == (200, 200, 503, 503)
    assert body["stages"] == {"small": True, "large": False}


def test_engine_failure_is_a_503_openai_error():
    async def test(client, small, large):
        resp = await client.post("/v1/chat/completions", json=ask("easy"))
        return resp.status, await resp.json()

    status, body = serve(test, fail=True)
    assert status == 503 and body["error"]["code"] == "engine_error" and "replica died" in body["error"]["message"]


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_held_engine_work(stream):
    async def test(client, small, large):
        before = await metric_samples(client)
        with pytest.raises(asyncio.TimeoutError):  # the held stage sends nothing for 1 s: give up
            await asyncio.wait_for(client.post("/v1/chat/completions", json=ask("easy", stream=stream,
                                                                                 max_tokens=20)), 0.3)
        for _ in range(100):  # bounded: 2 s; the handler records the abort just after the engine sees it
            after = await metric_samples(client)
            if small.aborted and delta(before, after, "cascadia_requests_total", **ABORTED):
                break
            await asyncio.sleep(0.02)
        return small, after, before

    small, after, before = serve(test, delay_s=0.05, n_tokens=20)
    assert len(small.aborted) == 1 and small.aborted[0].endswith("-s0")
    assert small.finished_at == {}  # the engine did not run the request to its end
    assert delta(before, after, "cascadia_requests_total", **ABORTED) == 1


def test_ignore_eos_is_parsed_and_typed():
    import pytest as _pytest

    from router.openai_schema import RequestError, parse_request

    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert parse_request(body, chat=True).ignore_eos is False
    assert parse_request({**body, "ignore_eos": True}, chat=True).ignore_eos is True
    with _pytest.raises(RequestError, match="ignore_eos"):
        parse_request({**body, "ignore_eos": "yes"}, chat=True)


def test_logprobs_flag_parsing():
    import pytest as _pytest

    from router.openai_schema import RequestError, logprobs_body, parse_request

    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert parse_request({**chat, "logprobs": True}, chat=True).logprobs is True
    comp = {"model": "m", "prompt": "hi", "max_tokens": 4}
    assert parse_request({**comp, "logprobs": 1}, chat=False).logprobs is True
    assert parse_request(comp, chat=False).logprobs is False
    with _pytest.raises(RequestError, match="logprobs"):
        parse_request({**comp, "logprobs": 5}, chat=False)
    body = logprobs_body(True, (7, 9), (-0.5, -1.0))
    assert [c["logprob"] for c in body["content"]] == [-0.5, -1.0]
    assert body["content"][0]["token"] == "token_id:7"
