"""The cascade state machine: stage 1 answers, the judge scores, the stage's threshold
decides; a rejected answer goes to the next stage; the last stage always answers.

A stage's backend is anything implementing the Engine protocol (router/protocol.py): a
single engine or a ReplicaPool. The cascade never thresholds inside the judge.

Streaming and its TTFT cost. An answer that may still be escalated cannot be shown:
the client would see text that is then replaced. So a judged stage's output is *held*
until its judge has scored it; only the accepted stage's output reaches the client. For
a request answered by stage k the first token therefore arrives after
    sum over stages j < k of (full generation_j + judge_j) + generation_k up to its TTFT
    (+ judge_k when stage k is not the last: it is held too),
i.e. a stage-1-accepted streaming request waits for the whole stage-1 answer and the
judge. A client that opts out of escalation (``escalate=False``; the server maps
``"cascade": {"escalate": false}`` or the header ``x-cascadia-escalate: false``) gets
stage 1 streamed at once, with no judge: plain single-model TTFT.

``judge_answer``: the client also wants the judge's score of the answer it gets
(``CascadeResult.answer_score``): an accepted stage's score is reused; an unjudged answer
(the last stage, or a one-stage member cascade) is scored after it is generated, without
holding its stream.

Cancelling ``run`` or closing ``stream`` (client disconnect) aborts the engine request
in flight, including one whose output is being held.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Sequence

from router.judges import FAILURE_POLICIES, Answer, Judge
from router.pool import PoolFull
from router.protocol import EngineError, GenerateRequest

log = logging.getLogger("cascadia.router")

if TYPE_CHECKING:
    from router.protocol import Engine, TokenChunk


@dataclass(frozen=True)
class Stage:
    """``threshold``: accept when score >= threshold; None for the last stage."""

    name: str
    pool: "Engine"
    threshold: float | None = None


@dataclass(frozen=True)
class CascadeRequest:
    """One client request, before a stage's chat template is applied. Exactly one of
    ``messages`` (chat) and ``prompt`` (completion) is set."""

    request_id: str
    max_tokens: int
    messages: tuple[dict, ...] | None = None
    prompt: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    escalate: bool = True
    # Stage 1's templated prompt when the caller already made it (the server does, to check
    # the context length): saves a second chat-template call into the engine per request.
    first_stage_prompt: str | None = None
    judge_answer: bool = False
    prompt_tokens: int | None = None  # of first_stage_prompt, when the caller counted them

    @property
    def question(self) -> str:
        if self.messages:
            users = [m for m in self.messages if m.get("role") == "user"]
            return str((users or list(self.messages))[-1].get("content", ""))
        return self.prompt or ""


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class StageVisit:
    """One stage's work on a request. ``score`` is None when the stage was not judged
    (last stage, or escalation opted out); non-finite when the judge failed."""

    stage_index: int
    stage_name: str
    score: float | None
    accepted: bool
    generate_s: float
    judge_s: float
    usage: Usage


@dataclass(frozen=True)
class Timings:
    ttft_s: float  # request start -> first token released to the client
    e2e_s: float
    judge_s: float  # summed over judged stages


@dataclass(frozen=True)
class CascadeResult:
    text: str
    stage_index: int
    stage_name: str
    scores: tuple[float, ...]  # one per judged stage, in stage order
    usage: Usage  # the answering stage's tokens (what the client receives)
    timings: Timings
    finish_reason: str
    visits: tuple[StageVisit, ...] = ()
    token_ids: tuple[int, ...] = ()  # of the answer, for clients that ask for logprobs
    logprobs: tuple[float, ...] = ()
    answer_score: float | None = None  # the judge's score of the returned answer, when asked for

    @property
    def escalations(self) -> int:
        return self.stage_index


@dataclass(frozen=True)
class StreamDelta:
    """A piece of the accepted answer. Every delta names the answering stage; the last one
    has ``finished`` set and carries ``result``."""

    text: str
    stage_index: int
    stage_name: str
    scores: tuple[float, ...]
    finished: bool = False
    result: CascadeResult | None = None


@dataclass
class _StageOutput:
    chunks: list = field(default_factory=list)
    prompt_tokens: int = 0
    first_token_s: float | None = None
    finish_reason: str = "stop"

    @property
    def text(self) -> str:
        return "".join(c.text for c in self.chunks)

    def answer(self, question: str) -> Answer:
        return Answer(text=self.text, token_ids=tuple(t for c in self.chunks for t in c.token_ids),
                      logprobs=tuple(lp for c in self.chunks for lp in c.logprobs),
                      finish_reason=self.finish_reason, question=question)

    @property
    def usage(self) -> Usage:
        return Usage(self.prompt_tokens, sum(len(c.token_ids) for c in self.chunks))


class Cascade:
    """A stage whose engine fails (replica died) before any of its tokens reached the client
    is run again, up to ``max_retries`` times (see ``stream``).

    ``on_judge_failure`` ("escalate" or "accept") applies when the judge raises or takes
    longer than ``judge_timeout_s`` (None: no limit beyond the judge's own): the stage's
    score becomes -inf (escalate) or +inf (accept), so the request completes, and the
    non-finite score is what the metrics count as a judge failure. Judges with their own
    policy (LLMJudge's ``on_failure``) apply it before raising would happen."""

    def __init__(self, stages: Sequence[Stage], judge: Judge | None, *, clock=time.perf_counter,
                 on_judge_failure: str = "escalate", judge_timeout_s: float | None = None, max_retries: int = 2):
        if on_judge_failure not in FAILURE_POLICIES:
            raise ValueError(f"on_judge_failure must be one of {FAILURE_POLICIES}, got {on_judge_failure!r}")
        if judge_timeout_s is not None and not judge_timeout_s > 0:
            raise ValueError(f"judge_timeout_s must be > 0, got {judge_timeout_s}")
        self.on_judge_failure, self.judge_timeout_s = on_judge_failure, judge_timeout_s
        self.max_retries = max_retries  # re-runs of a stage whose replica failed before the client saw a token
        self.retries = 0
        if not stages:
            raise ValueError("a cascade needs at least one stage")
        for i, s in enumerate(stages[:-1]):
            if s.threshold is None or math.isnan(s.threshold):
                raise ValueError(f"stage {i} ({s.name}) is not the last: it needs a threshold")
        if len(stages) > 1 and judge is None:
            raise ValueError("a cascade of more than one stage needs a judge")
        self.stages = tuple(stages)
        self.judge = judge
        self.clock = clock
        self.in_flight = [0] * len(stages)  # requests inside each stage (queue depth gauge)

    def set_threshold(self, stage: int, threshold: float) -> None:
        """A new threshold for a judged stage (rolling updates). Requests that start after
        the change use it; requests in flight keep the stages they started with."""
        if not 0 <= stage < len(self.stages) - 1:
            raise ValueError(f"stage {stage} has no threshold (the last stage always answers)")
        if threshold is None or math.isnan(threshold):
            raise ValueError(f"a judged stage needs a threshold, got {threshold}")
        stages = list(self.stages)
        stages[stage] = dataclasses.replace(stages[stage], threshold=float(threshold))
        self.stages = tuple(stages)

    @property
    def max_model_len(self) -> int:
        return min(s.pool.max_model_len for s in self.stages)

    async def _stage_request(self, i: int, req: CascadeRequest):
        pool = self.stages[i].pool
        if i == 0 and req.first_stage_prompt is not None:
            prompt = req.first_stage_prompt
        elif req.messages is not None:
            prompt = await pool.chat_prompt(list(req.messages))
        else:
            prompt = req.prompt or ""
        return GenerateRequest(request_id=f"{req.request_id}-s{i}", prompt=prompt, max_tokens=req.max_tokens,
                               temperature=req.temperature, top_p=req.top_p, stop=req.stop, seed=req.seed,
                               ignore_eos=req.ignore_eos, logprobs=True)

    async def _generate(self, i: int, gen_req) -> AsyncIterator["TokenChunk"]:
        """The stage's chunks; an abandoned or cancelled generation is aborted in the engine."""
        pool = self.stages[i].pool
        finished = False
        self.in_flight[i] += 1
        try:
            async for chunk in pool.generate(gen_req):
                finished = finished or chunk.finished
                yield chunk
        finally:
            self.in_flight[i] -= 1
            if not finished:
                # shield: the abort must reach the engine even while we are being cancelled
                await asyncio.shield(pool.abort(gen_req.request_id))

    def _judged(self, i: int, req: CascadeRequest) -> bool:
        return req.escalate and i < len(self.stages) - 1

    async def _score(self, gen_req, out: _StageOutput, req: CascadeRequest) -> tuple[float, float]:
        start = self.clock()
        try:
            score = await asyncio.wait_for(self.judge.score(gen_req, out.answer(req.question)), self.judge_timeout_s)
            score = float(score)
            if math.isnan(score):
                raise ValueError("the judge returned NaN")
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a plug-in judge that raises, times out or returns garbage
            why = "timed out" if isinstance(e, asyncio.TimeoutError) else f"{type(e).__name__}: {e}"
            log.warning("request %s: judge failed (%s); policy %s", gen_req.request_id, why, self.on_judge_failure)
            score = math.inf if self.on_judge_failure == "accept" else -math.inf
        return score, self.clock() - start

    async def run(self, req: CascadeRequest) -> CascadeResult:
        final = None
        async for delta in self.stream(req, client_streams=False):
            final = delta.result if delta.finished else final
        assert final is not None
        return final

    async def stream(self, req: CascadeRequest, *, client_streams: bool = True) -> AsyncIterator[StreamDelta]:
        """Deltas of the accepted stage's answer (see the module docstring for holding).
        ``client_streams=False``: the caller keeps the deltas to itself until the end (a
        non-streaming response), so a stage that fails midway can always be run again."""
        start = self.clock()
        scores: list[float] = []
        visits: list[StageVisit] = []
        ttft_s = None
        judge_total_s = 0.0
        for i, stage in enumerate(self.stages):
            gen_req = await self._stage_request(i, req)
            held = self._judged(i, req)
            stage_start = self.clock()
            for attempt in range(self.max_retries + 1):
                out, sent = _StageOutput(), False
                chunks = self._generate(i, gen_req)
                try:
                    async for chunk in chunks:
                        if chunk.prompt_tokens is not None:
                            out.prompt_tokens = chunk.prompt_tokens
                        if chunk.finished:
                            out.finish_reason = chunk.finish_reason or "stop"
                        out.chunks.append(chunk)
                        if not held and chunk.text:
                            ttft_s = self.clock() - start if ttft_s is None else ttft_s
                            sent = client_streams
                            yield StreamDelta(chunk.text, i, stage.name, tuple(scores))
                    break
                except EngineError as e:
                    # Nothing of this stage reached the client (held, or failed before its
                    # first token): run it again -- the pool sends it to a replica that is
                    # up, or holds it until one restarts. Once tokens were sent, the client
                    # gets an error instead of a second, different answer.
                    if sent or isinstance(e, PoolFull) or attempt == self.max_retries:
                        raise
                    self.retries += 1
                    log.warning("request %s: stage %s failed (%s); retrying (%d of %d)", req.request_id,
                                stage.name, str(e)[:200], attempt + 1, self.max_retries)
                    gen_req = dataclasses.replace(gen_req, request_id=f"{req.request_id}-s{i}-r{attempt + 1}")
                finally:
                    await chunks.aclose()
            generate_s = self.clock() - stage_start
            if not held:
                score, judge_s = None, 0.0
                if req.judge_answer and self.judge is not None:
                    score, judge_s = await self._score(gen_req, out, req)
                    judge_total_s += judge_s
                visits.append(StageVisit(i, stage.name, score, True, generate_s, judge_s, out.usage))
                break
            score, judge_s = await self._score(gen_req, out, req)
            judge_total_s += judge_s
            scores.append(score)
            accepted = score >= stage.threshold
            visits.append(StageVisit(i, stage.name, score, accepted, generate_s, judge_s, out.usage))
            if accepted:
                for chunk in out.chunks:  # release the held answer
                    if chunk.text:
                        ttft_s = self.clock() - start if ttft_s is None else ttft_s
                        yield StreamDelta(chunk.text, i, stage.name, tuple(scores))
                break
        answered = visits[-1]
        now = self.clock()
        result = CascadeResult(
            text=out.text, stage_index=answered.stage_index, stage_name=answered.stage_name, scores=tuple(scores),
            usage=answered.usage, timings=Timings(ttft_s if ttft_s is not None else now - start, now - start,
                                                  judge_total_s),
            finish_reason=out.finish_reason, visits=tuple(visits),
            token_ids=tuple(t for c in out.chunks for t in c.token_ids),
            logprobs=tuple(lp for c in out.chunks for lp in c.logprobs),
            answer_score=answered.score if req.judge_answer else None)
        yield StreamDelta("", answered.stage_index, answered.stage_name, tuple(scores), finished=True, result=result)
