"""Judges, threshold re-calibration and the cascade state machine, with fake engines
that implement router.protocol.Engine and whose log-probabilities the tests choose."""

import asyncio
import math
import time

import pytest
from aiohttp import web

from router.cascade import Cascade, CascadeRequest, Stage
from router.judges import (Answer, JudgeFailure, LLMJudge, LogprobJudge, judge_class, logprob_score, make_judge,
                           parse_rating, recalibrate_threshold, rescale)
from router.protocol import Engine, EngineError, GenerateRequest, TokenChunk

EASY_LOGPROB = -0.1  # 100*exp(-0.1) = 90.5
HARD_LOGPROB = -1.5  # 100*exp(-1.5) = 22.3
THRESHOLD = 50.0


class FakeEngine:
    """Answers every prompt with ``n_tokens`` words. A prompt containing "hard" gets
    HARD_LOGPROB per token, any other EASY_LOGPROB (unless ``logprob`` fixes it).
    Records started, finished and aborted request ids."""

    def __init__(self, name: str, *, n_tokens: int = 4, delay_s: float = 0.0, logprob: float | None = None,
                 max_model_len: int = 64, healthy: bool = True, fail: bool = False):
        self.name, self.n_tokens, self.delay_s, self.logprob = name, n_tokens, delay_s, logprob
        self.max_model_len, self.healthy, self.fail = max_model_len, healthy, fail
        self.started: list[str] = []
        self.finished_at: dict[str, float] = {}
        self.aborted: list[str] = []
        self.prompts: list[str] = []

    def words(self, prompt: str) -> list[str]:
        return [f"{self.name}-w{i} " for i in range(self.n_tokens)]

    async def generate(self, req: GenerateRequest):
        self.started.append(req.request_id)
        self.prompts.append(req.prompt)
        if self.fail:
            raise EngineError(f"{self.name}: replica died")
        lp = self.logprob if self.logprob is not None else (HARD_LOGPROB if "hard" in req.prompt else EASY_LOGPROB)
        words = self.words(req.prompt)[: req.max_tokens]
        for i, word in enumerate(words):
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            last = i == len(words) - 1
            if last:
                self.finished_at[req.request_id] = time.perf_counter()
            yield TokenChunk((100 + i,), word, (lp,), finished=last, finish_reason="length" if last else None,
                             prompt_tokens=await self.count_tokens(req.prompt) if i == 0 else None)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def chat_prompt(self, messages: list[dict]) -> str:
        return f"<{self.name}> " + " ".join(m["content"] for m in messages)

    async def count_tokens(self, text: str) -> int:
        return len(text.split())

    async def health(self) -> bool:
        return self.healthy

    async def stats(self) -> dict:
        return {"running": 0, "waiting": 0}


def two_stage(delay_s: float = 0.0, judge=None, **kw) -> tuple[Cascade, FakeEngine, FakeEngine]:
    small, large = FakeEngine("small", delay_s=delay_s, **kw), FakeEngine("large", delay_s=delay_s, **kw)
    cascade = Cascade([Stage("small", small, THRESHOLD), Stage("large", large, None)], judge or LogprobJudge())
    return cascade, small, large


def chat(rid: str, text: str, **kw) -> CascadeRequest:
    return CascadeRequest(request_id=rid, max_tokens=kw.pop("max_tokens", 8),
                          messages=({"role": "user", "content": text},), **kw)


def test_fake_engine_follows_the_protocol():
    assert isinstance(FakeEngine("x"), Engine)


# --- judges -------------------------------------------------------------------------

def test_logprob_mapping_is_geometric_mean_probability_in_percent():
    assert logprob_score([]) == 0.0
    assert logprob_score([0.0, 0.0]) == 100.0
    assert logprob_score([-1.0, -1.0]) == pytest.approx(100 / math.e)
    assert logprob_score([-0.5, -1.5]) == pytest.approx(100 * math.exp(-1.0))
    assert logprob_score([-0.1]) > logprob_score([-0.2]) > logprob_score([-3.0]) > 0
    req = GenerateRequest("r", "p", 4)
    assert asyncio.run(LogprobJudge().score(req, Answer("a b", (1, 2), (-2.0, -2.0)))) == pytest.approx(
        100 * math.exp(-2.0))


def test_rating_parser_takes_the_last_rating_and_checks_the_scale():
    assert parse_rating("Good answer. Rating: [[7]]") == 7
    assert parse_rating('Use the format "[[5]]". Verdict: [[ 9 ]]') == 9
    assert parse_rating("[[8.5]]") == 8.5
    with pytest.raises(JudgeFailure, match="no \\[\\[rating\\]\\]"):
        parse_rating("I would give it an eight.")
    with pytest.raises(JudgeFailure, match="outside"):
        parse_rating("[[11]]")
    assert rescale(1) == 0.0 and rescale(10) == 100.0 and rescale(8) == pytest.approx(700 / 9)


async def _with_judge_server(reply, test):
    """A fake OpenAI-compatible judge on 127.0.0.1; ``reply(body) -> web.Response``."""
    seen = []

    async def handler(request):
        body = await request.json()
        seen.append(body)
        return await reply(body)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        return await test(f"http://127.0.0.1:{port}", seen)
    finally:
        await runner.cleanup()


def _completion(text):
    return web.json_response({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})


def test_llm_judge_grades_against_an_openai_compatible_endpoint():
    async def reply(body):
        return _completion("The answer is correct and concise. Rating: [[8]]")

    async def test(url, seen):
        judge = LLMJudge(url, "judge-model", timeout_s=5)
        try:
            answer = Answer("Paris.", question="What is the capital of France?")
            score = await judge.score(GenerateRequest("r", "<tmpl> What is...", 8), answer)
        finally:
            await judge.close()
        assert score == pytest.approx(100 * 7 / 9)
        assert judge.failures == 0 and judge.last_latency_s > 0
        prompt = seen[0]["messages"][-1]["content"]
        assert seen[0]["model"] == "judge-model" and seen[0]["temperature"] == 0.0
        assert "What is the capital of France?" in prompt and "Paris." in prompt and "[[rating]]" in prompt

    asyncio.run(_with_judge_server(reply, test))


@pytest.mark.parametrize("mode", ["http500", "no_rating", "timeout"])
@pytest.mark.parametrize("policy", ["escalate", "accept"])
def test_llm_judge_failure_policy_and_count(mode, policy):
    async def reply(body):
        if mode == "http500":
            return web.json_response({"error": "boom"}, status=500)
        if mode == "timeout":
            await asyncio.sleep(1.0)
        return _completion("no rating here")

    async def test(url, seen):
        judge = LLMJudge(url, "j", timeout_s=0.2, on_failure=policy)
        try:
            scores = [await judge.score(GenerateRequest("r", "q", 4), Answer("a", question="q")) for _ in range(2)]
        finally:
            await judge.close()
        assert scores == [math.inf if policy == "accept" else -math.inf] * 2
        assert judge.failures == 2

    asyncio.run(_with_judge_server(reply, test))


def test_llm_judge_unreachable_endpoint_is_a_counted_failure():
    async def test():
        judge = LLMJudge("http://127.0.0.1:9", "j", timeout_s=1.0)  # discard port: refused
        try:
            assert await judge.score(GenerateRequest("r", "q", 4), Answer("a")) == -math.inf
        finally:
            await judge.close()
        assert judge.failures == 1

    asyncio.run(test())


def test_judge_registry_and_plugin_import_path():
    assert judge_class("logprob") is LogprobJudge and judge_class("llm") is LLMJudge
    assert judge_class("router.judges:LogprobJudge") is LogprobJudge
    assert isinstance(make_judge("logprob"), LogprobJudge)
    for bad in ("nope", "json:loads", "no_such_module_xyz:Judge", "router.judges:Missing"):
        with pytest.raises(ValueError, match="judge"):
            judge_class(bad)
    with pytest.raises(ValueError, match="on_failure"):
        LLMJudge("http://127.0.0.1:1", "j", on_failure="retry")


def test_recalibrated_threshold_keeps_the_planned_escalation_share():
    scores = [float(s) for s in range(100)][::-1]
    for share in (0.0, 0.1, 0.3, 0.55, 1.0):
        h = recalibrate_threshold(scores, share)
        assert sum(s < h for s in scores) / len(scores) == pytest.approx(share)
    assert recalibrate_threshold([5.0, -math.inf, 1.0], 0.5) == 5.0  # failed scores ignored
    with pytest.raises(ValueError):
        recalibrate_threshold(scores, 1.5)
    with pytest.raises(ValueError):
        recalibrate_threshold([], 0.5)


# --- cascade ------------------------------------------------------------------------

def test_threshold_between_two_prompts_splits_them_between_the_stages():
    cascade, small, large = two_stage()
    easy = asyncio.run(cascade.run(chat("a", "an easy question")))
    hard = asyncio.run(cascade.run(chat("b", "a hard question")))
    assert logprob_score([HARD_LOGPROB]) < THRESHOLD < logprob_score([EASY_LOGPROB])

    assert (easy.stage_index, easy.stage_name) == (0, "small")
    assert easy.scores == pytest.approx((logprob_score([EASY_LOGPROB] * 4),))
    assert easy.text == "".join(small.words("")) and easy.finish_reason == "length"
    assert easy.usage.completion_tokens == 4 and easy.usage.prompt_tokens == 4  # "<small> an easy question"
    assert large.started == ["b-s1"] and small.started == ["a-s0", "b-s0"]

    assert (hard.stage_index, hard.stage_name, hard.escalations) == (1, "large", 1)
    assert hard.scores == pytest.approx((logprob_score([HARD_LOGPROB] * 4),))  # the last stage is not judged
    assert hard.text == "".join(large.words(""))
    assert [v.accepted for v in hard.visits] == [False, True] and hard.visits[1].score is None
    assert large.prompts == ["<large> a hard question"]  # each stage applies its own chat template
    assert small.aborted == large.aborted == []


def test_last_stage_answers_even_with_a_low_score():
    cascade, small, large = two_stage(logprob=-9.0)
    result = asyncio.run(cascade.run(chat("a", "anything")))
    assert result.stage_name == "large" and result.scores[0] < 1


def test_judge_latency_is_measured_with_the_injected_clock():
    class SlowJudge(LogprobJudge):
        async def score(self, request, answer):
            await asyncio.sleep(0.05)
            return 10.0

    cascade, _, _ = two_stage(judge=SlowJudge())
    result = asyncio.run(cascade.run(chat("a", "x")))
    assert result.visits[0].judge_s >= 0.05 and result.timings.judge_s == result.visits[0].judge_s
    assert result.timings.e2e_s >= result.timings.judge_s


def test_cascade_configuration_is_checked():
    e = FakeEngine("e")
    with pytest.raises(ValueError, match="threshold"):
        Cascade([Stage("a", e, None), Stage("b", e, None)], LogprobJudge())
    with pytest.raises(ValueError, match="judge"):
        Cascade([Stage("a", e, 50.0), Stage("b", e, None)], None)
    with pytest.raises(ValueError):
        Cascade([], None)


async def _collect(cascade, req):
    deltas = []
    async for d in cascade.stream(req):
        deltas.append((time.perf_counter(), d))
    return deltas


def test_streaming_holds_a_judged_stage_until_it_is_accepted():
    cascade, small, large = two_stage(delay_s=0.02)
    deltas = asyncio.run(_collect(cascade, chat("a", "easy")))
    first_text_at = next(t for t, d in deltas if d.text)
    assert first_text_at >= small.finished_at["a-s0"]  # nothing shown before the judge saw all of it
    assert "".join(d.text for _, d in deltas) == "".join(small.words(""))
    assert all(d.stage_name == "small" and d.scores for _, d in deltas)
    assert deltas[-1][1].finished and deltas[-1][1].result.stage_index == 0

    hard = asyncio.run(_collect(cascade, chat("b", "hard")))
    assert "".join(d.text for _, d in hard) == "".join(large.words(""))  # stage 1's text never leaks
    assert {d.stage_name for _, d in hard} == {"large"}


def test_opting_out_of_escalation_streams_stage_one_at_once():
    cascade, small, large = two_stage(delay_s=0.02)
    deltas = asyncio.run(_collect(cascade, chat("a", "hard", escalate=False)))
    first_text_at = next(t for t, d in deltas if d.text)
    assert first_text_at < small.finished_at["a-s0"]  # streamed while stage 1 is still generating
    result = deltas[-1][1].result
    assert (result.stage_name, result.scores) == ("small", ())  # no judge, no escalation
    assert large.started == []


def test_cancelling_a_request_aborts_the_engine_work():
    async def scenario(req, engine_of, wait_for):
        cascade, small, large = two_stage(delay_s=0.05)
        task = asyncio.ensure_future(cascade.run(req))
        for _ in range(200):  # bounded: 2 s
            if wait_for(small, large):
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return engine_of(small, large), cascade

    # stage 1 generating (its output held for judging)
    aborted, cascade = asyncio.run(scenario(chat("a", "easy"), lambda s, l: s.aborted, lambda s, l: s.started))
    assert aborted == ["a-s0"] and cascade.in_flight == [0, 0]
    # escalated: stage 2 generating
    aborted, _ = asyncio.run(scenario(chat("b", "hard"), lambda s, l: (s.aborted, l.aborted), lambda s, l: l.started))
    assert aborted == ([], ["b-s1"])


def test_closing_a_stream_early_aborts_the_engine_work():
    async def scenario():
        cascade, small, _ = two_stage(delay_s=0.02, n_tokens=20)
        stream = cascade.stream(chat("a", "x", escalate=False, max_tokens=20))
        first = await stream.__anext__()
        await stream.aclose()
        return first, small

    first, small = asyncio.run(scenario())
    assert first.text and small.aborted == ["a-s0"]


def test_a_finished_request_is_not_aborted_and_engine_errors_propagate():
    cascade, small, large = two_stage()
    asyncio.run(cascade.run(chat("a", "easy")))
    assert small.aborted == []
    broken, _, _ = two_stage(fail=True)
    with pytest.raises(EngineError, match="replica died"):
        asyncio.run(broken.run(chat("b", "easy")))
