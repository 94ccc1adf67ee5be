"""The `openai` engine against a fake OpenAI-compatible server on 127.0.0.1, and as stage 2
of a cascade whose external endpoint is a second Cascadia server running simulated engines."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from cascadia.catalog import get_model
from cascadia.perf.layout import Layout
from cascadia.sim.cluster import StageDeployment
from cascadia.sim.config import EngineConfig
from cascadia.specs.gpu import get_gpu
from router.cascade import Cascade, Stage
from router.engines import engine_factory
from router.engines.openai_http import CHAT_KEY, OpenAIEngine, decode_chat
from router.engines.sim import SimulatedEngine
from router.judges import LogprobJudge
from router.metrics import RouterMetrics
from router.protocol import Engine, EngineError, GenerateRequest
from router.server import make_app

MODEL = "remote-model"
TOKENS = ("Hello", ",", " world", "!")
LOGPROBS = (-0.1, -0.5, -1.25, -2.0)
MESSAGES = [{"role": "user", "content": "hi"}]


class FakeOpenAI:
    """Streams TOKENS one per SSE event with logprobs, then a finish event, a usage event and
    [DONE]. ``mode``: "ok", "slow" (waits between tokens), "error" (HTTP 500), "hang" (no
    answer for 5 s), "malformed" (a non-JSON event), "error-event" (an error object
    as the event), "unfinished" (ends with no finish)."""

    def __init__(self):
        self.mode = "ok"
        self.bodies: list[tuple[str, dict]] = []
        self.disconnected = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_post("/v1/completions", self._completions)
        self.app.router.add_post("/v1/chat/completions", self._chat)
        self.app.router.add_get("/v1/models", self._models)
        self.tokenized: list[dict] = []

    def add_tokenize(self):
        self.app.router.add_post("/tokenize", self._tokenize)

    async def _tokenize(self, request):
        body = await request.json()
        self.tokenized.append(body)
        return web.json_response({"count": 42, "max_model_len": 4096, "tokens": [1] * 42})

    async def _models(self, request):
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def _completions(self, request):
        return await self._stream(request, chat=False)

    async def _chat(self, request):
        return await self._stream(request, chat=True)

    def _event(self, chat: bool, i: int | None, finish: str | None = None) -> dict:
        text = TOKENS[i] if i is not None else ""
        if chat:
            lp = {"content": [{"token": text, "logprob": LOGPROBS[i], "top_logprobs": []}]} if i is not None else None
            delta = {"content": text, **({"role": "assistant"} if i == 0 else {})}
            choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}
        else:
            lp = {"tokens": [text], "token_logprobs": [LOGPROBS[i]], "top_logprobs": [{text: LOGPROBS[i]}],
                  "text_offset": [0]} if i is not None else None
            choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}
        return {"id": "x", "object": "chat.completion.chunk" if chat else "text_completion", "model": MODEL,
                "choices": [choice], "usage": None}

    async def _stream(self, request, *, chat: bool):
        body = await request.json()
        self.bodies.append((request.path, body))
        if self.mode == "error":
            return web.json_response({"error": {"message": "the GPU caught fire", "type": "server_error"}},
                                     status=500)
        if self.mode == "hang":
            await asyncio.sleep(5)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        completed = False
        try:
            if self.mode == "malformed":
                await resp.write(b"data: {not json\n\n")
                return resp
            if self.mode == "error-event":
                await resp.write(b'data: {"error": {"message": "overloaded", "code": 503}}\n\n')
                return resp
            for i in range(len(TOKENS)):
                await resp.write(f"data: {json.dumps(self._event(chat, i))}\n\n".encode())
                if self.mode == "slow":
                    await asyncio.sleep(0.1)
            if self.mode == "unfinished":
                return resp
            await resp.write(b": a comment line the client must skip\n\n")
            await resp.write(f"data: {json.dumps(self._event(chat, None, 'length'))}\n\n".encode())
            usage = {"id": "x", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": len(TOKENS)}}
            await resp.write(f"data: {json.dumps(usage)}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
            completed = True
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            if not completed and self.mode == "slow":
                self.disconnected.set()
        return resp


@contextlib.asynccontextmanager
async def fake_endpoint(*, tokenize: bool = False, **engine_kw):
    fake = FakeOpenAI()
    if tokenize:
        fake.add_tokenize()
    server = TestServer(fake.app, host="127.0.0.1")
    await server.start_server()
    engine = OpenAIEngine("remote", str(server.make_url("/v1")), MODEL, **engine_kw)
    try:
        yield fake, engine
    finally:
        await engine.shutdown()
        await server.close()


def req(prompt: str, rid: str = "r1", **kw) -> GenerateRequest:
    return GenerateRequest(rid, prompt, max_tokens=16, **kw)


async def collect(engine, request):
    return [c async for c in engine.generate(request)]


def test_registry_and_protocol():
    assert engine_factory("openai") is OpenAIEngine
    engine = OpenAIEngine("e", "http://127.0.0.1:1/", MODEL, api_key="k")
    assert isinstance(engine, Engine)
    assert engine.base_url == "http://127.0.0.1:1"


def test_completions_stream_maps_text_logprobs_finish_and_usage():
    async def main():
        async with fake_endpoint() as (fake, engine):
            chunks = await collect(engine, req("plain prompt", seed=3, stop=("\n",)))
            path, body = fake.bodies[0]
            return chunks, path, body

    chunks, path, body = asyncio.run(main())
    assert path == "/v1/completions"
    assert body["prompt"] == "plain prompt" and body["stream"] is True and body["logprobs"] == 1
    assert body["stream_options"] == {"include_usage": True} and body["seed"] == 3 and body["stop"] == ["\n"]
    assert "ignore_eos" not in body
    assert "".join(c.text for c in chunks) == "".join(TOKENS)
    assert tuple(lp for c in chunks for lp in c.logprobs) == LOGPROBS
    assert all(t == -1 for c in chunks for t in c.token_ids) and sum(len(c.token_ids) for c in chunks) == 4
    last = chunks[-1]
    assert last.finished and last.finish_reason == "length" and last.prompt_tokens == 7
    assert not any(c.finished for c in chunks[:-1])


def test_chat_prompt_goes_to_chat_completions_with_logprobs_and_ignore_eos():
    async def main():
        async with fake_endpoint() as (fake, engine):
            prompt = await engine.chat_prompt(MESSAGES)
            chunks = await collect(engine, req(prompt, ignore_eos=True))
            return prompt, chunks, fake.bodies[0], await engine.stats()

    prompt, chunks, (path, body), stats = asyncio.run(main())
    assert decode_chat(prompt) == MESSAGES and CHAT_KEY in prompt and "<|" not in prompt
    assert path == "/v1/chat/completions" and body["messages"] == MESSAGES and "prompt" not in body
    assert body["logprobs"] is True and body["top_logprobs"] == 0 and body["ignore_eos"] is True
    assert "".join(c.text for c in chunks) == "".join(TOKENS)
    assert tuple(lp for c in chunks for lp in c.logprobs) == LOGPROBS
    assert chunks[-1].finish_reason == "length" and chunks[-1].prompt_tokens == 7
    assert stats["requests_done"] == 1 and stats["tokens_out"] == 4 and stats["running"] == 0


def test_plain_transcript_when_chat_is_off_and_token_counts_fall_back():
    async def main():
        async with fake_endpoint(chat=False) as (fake, engine):
            prompt = await engine.chat_prompt(MESSAGES)
            await collect(engine, req(prompt))
            counted = await engine.count_tokens("x" * 40)  # the fake has no /tokenize
            return prompt, fake.bodies[0][0], counted, engine._tokenize_works

    prompt, path, counted, tokenize_works = asyncio.run(main())
    assert prompt == "user: hi\nassistant:" and path == "/v1/completions"
    assert counted == 10 and tokenize_works is False


def test_count_tokens_uses_the_endpoints_tokenize_when_it_has_one():
    async def main():
        async with fake_endpoint(tokenize=True) as (fake, engine):
            chat = await engine.count_tokens(await engine.chat_prompt(MESSAGES))
            plain = await engine.count_tokens("abc")
            return chat, plain, fake.tokenized

    chat, plain, tokenized = asyncio.run(main())
    assert (chat, plain) == (42, 42)
    assert tokenized[0]["messages"] == MESSAGES and tokenized[1]["prompt"] == "abc"


def test_abort_closes_the_stream_and_the_server_sees_the_disconnect():
    async def main():
        async with fake_endpoint() as (fake, engine):
            fake.mode = "slow"
            got = []
            async for chunk in engine.generate(req("p", rid="a1")):
                got.append(chunk)
                if len(got) == 1:
                    await engine.abort("a1")
            await asyncio.wait_for(fake.disconnected.wait(), 3)
            return got, await engine.stats()

    got, stats = asyncio.run(main())
    assert got[-1].finished and got[-1].finish_reason == "abort"
    assert len(got) < len(TOKENS) + 1
    assert stats["requests_aborted"] == 1 and stats["running"] == 0


def test_closing_the_generator_early_closes_the_stream():
    async def main():
        async with fake_endpoint() as (fake, engine):
            fake.mode = "slow"
            gen = engine.generate(req("p"))
            async with contextlib.aclosing(gen):
                await gen.__anext__()
            await asyncio.wait_for(fake.disconnected.wait(), 3)
            return fake.disconnected.is_set()

    assert asyncio.run(main())


@pytest.mark.parametrize("mode, message", [("error", "HTTP 500: the GPU caught fire"),
                                           ("hang", "within 0.3 s"),
                                           ("malformed", "malformed stream event"),
                                           ("error-event", "error mid-stream: overloaded"),
                                           ("unfinished", "ended before the answer finished")])
def test_endpoint_failures_become_engine_errors(mode, message):
    async def main():
        async with fake_endpoint(timeout_s=0.3) as (fake, engine):
            fake.mode = mode
            with pytest.raises(EngineError) as info:
                await collect(engine, req("p"))
            return str(info.value), engine.base_url, await engine.stats()

    text, base_url, stats = asyncio.run(main())
    assert message in text and base_url in text and text.startswith("remote:")
    assert stats["requests_failed"] == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_refused_connection_is_an_engine_error_and_unhealthy():
    async def main():
        engine = OpenAIEngine("gone", f"http://127.0.0.1:{free_port()}", MODEL, timeout_s=2)
        try:
            with pytest.raises(EngineError, match="gone: .*cannot connect"):
                await collect(engine, req("p"))
            return await engine.health()
        finally:
            await engine.shutdown()

    assert asyncio.run(main()) is False


def test_health_needs_the_model_listed():
    async def main():
        async with fake_endpoint() as (fake, engine):
            ok = await engine.health()
            engine.model = "not-served-here"
            return ok, await engine.health()

    assert asyncio.run(main()) == (True, False)


# ---------------- Cascadia as the external endpoint ----------------

STAGE = StageDeployment(get_model("llama-3-8b"), get_gpu("H100"), (Layout(1),), EngineConfig())


def test_openai_engine_as_stage_2_answers_through_a_remote_cascadia_server():
    async def main():
        remote_sim = SimulatedEngine.from_stage("big", STAGE, time_dilation=20.0)
        remote_app = make_app(Cascade([Stage("big", remote_sim, None)], None), model_name="remote-cascade",
                              member_engines={"big": remote_sim}, metrics=RouterMetrics())
        remote = TestServer(remote_app, host="127.0.0.1")
        await remote.start_server()
        small = SimulatedEngine.from_stage("small", STAGE, time_dilation=20.0)
        big = OpenAIEngine("big-remote", str(remote.make_url("")), "big", timeout_s=5)
        # threshold above the judge's 0-100 scale: stage 1 is always escalated
        front = Cascade([Stage("small", small, 101.0), Stage("big-remote", big, None)], LogprobJudge())
        app = make_app(front, model_name="cascade", member_engines={"small": small, "big-remote": big},
                       metrics=RouterMetrics())
        try:
            async with TestClient(TestServer(app, host="127.0.0.1")) as client:
                ask = {"model": "cascade", "messages": [{"role": "user", "content": "What is a cascade?"}],
                       "max_tokens": 12}
                resp = await client.post("/v1/chat/completions", json=ask)
                body = await resp.json()
                streamed = await client.post("/v1/chat/completions", json={**ask, "stream": True})
                raw = (await streamed.read()).decode()
                healthy = await big.health()
                return resp.status, body, raw, healthy, await remote_sim.stats()
        finally:
            await big.shutdown()
            await small.shutdown()
            await remote_sim.shutdown()
            await remote.close()

    status, body, raw, healthy, remote_stats = asyncio.run(main())
    assert status == 200, body
    assert (body["cascade"]["stage"], body["cascade"]["stage_name"]) == (1, "big-remote"), body
    assert len(body["cascade"]["scores"]) == 1  # stage 1 was judged and escalated
    text = body["choices"][0]["message"]["content"]
    assert len(text.split()) == 12  # the remote simulated engine makes exactly max_tokens words
    assert body["choices"][0]["finish_reason"] == "length"
    assert raw.rstrip().endswith("data: [DONE]") and "big-remote" in raw
    assert healthy
    assert remote_stats["requests_done"] == 2 and remote_stats["simulated"]
