"""Judges score a stage's answer; the cascade's stages apply the thresholds.

Every judge has one scoring method, ``async score(request, answer) -> float``, on the
scale it declares (``score_low``..``score_high``; the built-ins use 0-100, the scale the
planner's thresholds are in). Built-ins, filled explicitly into ``JUDGES``:

- ``logprob``: confidence from the answer's own token log-probabilities, no extra model.
  Mapping: ``100 * exp(mean token logprob)``, i.e. the geometric-mean per-token
  probability in percent. It is monotone in the mean logprob, so thresholds keep their
  order; an answer with no tokens scores 0 (nothing to be confident about).
- ``llm``: LLM-as-judge with an MT-Bench-style single-answer grading prompt against any
  OpenAI-compatible ``/v1/chat/completions`` endpoint. The judge writes ``[[n]]`` with n
  in 1..10; the score is ``100 * (n - 1) / 9`` so 1 -> 0 and 10 -> 100.
- a user plug-in: ``"package.module:ClassName"`` (a ``Judge`` subclass).

``recalibrate_threshold`` re-derives a threshold when the serving judge differs from the
one the plan was made for: keep the plan's escalation share instead of the raw number.
"""

from __future__ import annotations

import abc
import asyncio
import importlib
import math
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # the judge only reads the request; no import cost at runtime
    from router.protocol import GenerateRequest

FAILURE_POLICIES = ("escalate", "accept")


@dataclass(frozen=True)
class Answer:
    """What a stage produced for one request. ``question``: the user's last message (the
    LLM judge grades against it; ``None`` falls back to the engine prompt)."""

    text: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()
    finish_reason: str | None = None
    question: str | None = None


class Judge(abc.ABC):
    """One scoring method. Never thresholds: a stage compares the score to its own."""

    name: str = "judge"
    score_low: float = 0.0
    score_high: float = 100.0

    @abc.abstractmethod
    async def score(self, request: "GenerateRequest", answer: Answer) -> float:
        """The answer's score on [score_low, score_high]. A judge that could not score
        returns +inf (accept) or -inf (escalate) per its failure policy; callers count
        non-finite scores as judge failures."""

    async def close(self) -> None:
        """Release clients (sessions); a no-op for judges that hold none."""


class LogprobJudge(Judge):
    """100 * exp(mean token logprob): the geometric-mean token probability in percent."""

    name = "logprob"

    async def score(self, request: "GenerateRequest", answer: Answer) -> float:
        return logprob_score(answer.logprobs)


def logprob_score(logprobs: Sequence[float]) -> float:
    if not logprobs:
        return 0.0
    mean = math.fsum(logprobs) / len(logprobs)
    return 100.0 * math.exp(min(mean, 0.0))


# MT-Bench's single-answer grading prompt, paraphrased: a strict impartial grader that
# explains briefly and ends with the rating in double brackets.
GRADING_SYSTEM_PROMPT = "You are a helpful assistant."
GRADING_TEMPLATE = (
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response "
    "provided by an AI assistant to the user question displayed below. Your evaluation should "
    "consider factors such as the helpfulness, relevance, accuracy, depth, creativity, and level "
    "of detail of the response. Begin your evaluation by providing a short explanation. Be as "
    "objective as possible. After providing your explanation, you must rate the response on a "
    "scale of 1 to 10 by strictly following this format: \"[[rating]]\", for example: "
    "\"Rating: [[5]]\".\n\n[Question]\n{question}\n\n[The Start of Assistant's Answer]\n{answer}\n"
    "[The End of Assistant's Answer]"
)
_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")


class JudgeFailure(RuntimeError):
    """The judge endpoint failed or answered without a parseable rating."""


def parse_rating(text: str, low: float = 1.0, high: float = 10.0) -> float:
    """The last ``[[n]]`` in the judge's reply (graders sometimes quote the format first).
    Raises JudgeFailure when there is none or it lies outside [low, high]."""
    found = _RATING.findall(text)
    if not found:
        raise JudgeFailure(f"no [[rating]] in the judge's reply: {text[-200:]!r}")
    rating = float(found[-1])
    if not low <= rating <= high:
        raise JudgeFailure(f"rating {rating:g} outside the declared scale [{low:g}, {high:g}]")
    return rating


def rescale(rating: float, low: float = 1.0, high: float = 10.0) -> float:
    return 100.0 * (rating - low) / (high - low)


class LLMJudge(Judge):
    """LLM-as-judge against an OpenAI-compatible endpoint (an external API or a cascade
    member's server). ``base_url`` is the server root (``http://host:port``); the judge
    posts to ``{base_url}/v1/chat/completions``. The HTTP session is made on first use,
    never at construction."""

    name = "llm"

    def __init__(self, base_url: str, model: str, *, timeout_s: float = 30.0,
                 on_failure: str = "escalate", rating_low: float = 1.0, rating_high: float = 10.0,
                 api_key: str | None = None, max_tokens: int = 512):
        if on_failure not in FAILURE_POLICIES:
            raise ValueError(f"on_failure must be one of {FAILURE_POLICIES}, got {on_failure!r}")
        if not rating_high > rating_low:
            raise ValueError(f"rating scale [{rating_low}, {rating_high}] is empty")
        self.url = base_url.rstrip("/") + "/v1/chat/completions"
        self.model, self.timeout_s, self.on_failure = model, timeout_s, on_failure
        self.rating_low, self.rating_high = rating_low, rating_high
        self.api_key, self.max_tokens = api_key, max_tokens
        self.failures = 0
        self.last_latency_s = 0.0
        self._session = None

    async def _post(self, payload: dict) -> dict:
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        async with self._session.post(self.url, json=payload, headers=headers) as resp:
            if resp.status != 200:
                raise JudgeFailure(f"judge endpoint {self.url} answered HTTP {resp.status}: "
                                   f"{(await resp.text())[:200]}")
            return await resp.json()

    async def rate(self, question: str, answer: str) -> float:
        """The raw rating on the judge's declared scale; raises JudgeFailure."""
        payload = {"model": self.model, "temperature": 0.0, "max_tokens": self.max_tokens,
                   "messages": [{"role": "system", "content": GRADING_SYSTEM_PROMPT},
                                {"role": "user", "content": GRADING_TEMPLATE.format(question=question, answer=answer)}]}
        try:
            body = await asyncio.wait_for(self._post(payload), self.timeout_s)
            content = body["choices"][0]["message"]["content"]
        except JudgeFailure:
            raise
        except asyncio.TimeoutError:
            raise JudgeFailure(f"judge endpoint {self.url} timed out after {self.timeout_s:g} s") from None
        except Exception as e:  # connection refused, bad JSON, missing fields: all mean "no rating"
            raise JudgeFailure(f"judge endpoint {self.url} failed: {type(e).__name__}: {e}") from None
        return parse_rating(content or "", self.rating_low, self.rating_high)

    async def score(self, request: "GenerateRequest", answer: Answer) -> float:
        start = time.perf_counter()
        try:
            rating = await self.rate(answer.question if answer.question is not None else request.prompt, answer.text)
            return rescale(rating, self.rating_low, self.rating_high)
        except JudgeFailure:
            self.failures += 1
            return math.inf if self.on_failure == "accept" else -math.inf
        finally:
            self.last_latency_s = time.perf_counter() - start

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


JUDGES: dict[str, type[Judge]] = {"logprob": LogprobJudge, "llm": LLMJudge}


def judge_class(spec: str) -> type[Judge]:
    """A registered name (``logprob``, ``llm``) or a plug-in import path ``module:Class``."""
    if spec in JUDGES:
        return JUDGES[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"judge {spec!r}: not one of {sorted(JUDGES)} nor an import path 'module:Class'")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"judge {spec!r}: cannot import ({e})") from None
    if not (isinstance(cls, type) and issubclass(cls, Judge)):
        raise ValueError(f"judge {spec!r}: {cls!r} is not a router.judges.Judge subclass")
    return cls


def make_judge(spec: str, **options) -> Judge:
    return judge_class(spec)(**options)


def recalibrate_threshold(scores: Sequence[float], escalation_share: float) -> float:
    """The threshold under which ``escalation_share`` of ``scores`` fall (score >= threshold
    is accepted). Used when the serving judge is not the one the plan's thresholds were
    made for: the plan's share of escalated requests is kept, the number is re-derived
    from this judge's scores on warm-up or recent requests. Ties can move the realised
    share by the tied count; share 0 accepts every observed score, share 1 none."""
    if not 0.0 <= escalation_share <= 1.0:
        raise ValueError(f"escalation_share must be in [0, 1], got {escalation_share}")
    finite = sorted(s for s in scores if math.isfinite(s))
    if not finite:
        raise ValueError("no finite scores to calibrate on")
    k = round(escalation_share * len(finite))  # how many of the lowest scores escalate
    if k >= len(finite):
        return math.nextafter(finite[-1], math.inf)
    return finite[k]
