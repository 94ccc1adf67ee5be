"""The OpenAI HTTP boundary: request bodies validated into typed dataclasses (errors name
the field), OpenAI-style error bodies, and the response/chunk shapes.

Accepted: ``model``, ``messages`` (chat) or ``prompt`` (completions), ``max_tokens`` (or
``max_completion_tokens``), ``temperature``, ``top_p``, ``stop``, ``seed``, ``n`` (1 only),
``stream``, ``stream_options.include_usage``, and Cascadia's own
``cascade: {"escalate": bool, "judge_answer": bool}`` (``judge_answer``: also score the
returned answer with the server's judge, e.g. a direct member call, so clients can build
quality profiles). Other fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant", "tool", "developer")


class RequestError(Exception):
    """A 4xx answer. ``param``: the offending field; ``code``: a short machine code."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, status: int = 400,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type

    def body(self) -> dict:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass(frozen=True)
class CompletionParams:
    """One validated request. ``messages`` for chat, ``prompt`` for completions."""

    model: str
    messages: tuple[dict, ...] | None
    prompt: str | None
    max_tokens: int | None  # None: up to the context
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool
    escalate: bool
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks rely on it)
    logprobs: bool = False  # return each sampled token's logprob (non-streaming responses)
    judge_answer: bool = False  # score the returned answer with the judge (cascade.answer_score)


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise RequestError("request body is nested too deeply", code="invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError(f"request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


def _wrong_type(param: str, expected: str, value: Any) -> RequestError:
    return RequestError(f"'{param}' must be {expected}, got {json.dumps(value)[:80]}", param=param,
                        code="invalid_type")


def _number(body: dict, param: str, default: float, lo: float, hi: float) -> float:
    value = body.get(param)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _wrong_type(param, "a number", value)
    if not lo <= value <= hi:
        raise RequestError(f"'{param}' must be in [{lo:g}, {hi:g}], got {value}", param=param, code="invalid_value")
    return float(value)


def _integer(body: dict, param: str) -> int | None:
    value = body.get(param)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong_type(param, "an integer", value)
    return value


def _boolean(obj: dict, param: str, default: bool, where: str | None = None) -> bool:
    value = obj.get(param)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _wrong_type(where or param, "a boolean", value)
    return value


def _message_content(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text is served
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"'{param}[{j}]' must be a text part {{\"type\": \"text\", \"text\": ...}}",
                                   param=f"{param}[{j}]", code="invalid_type")
            texts.append(part["text"])
        return "".join(texts)
    raise _wrong_type(param, "a string or a list of text parts", content)


def _messages(body: dict) -> tuple[dict, ...]:
    if "messages" not in body or body["messages"] is None:
        raise RequestError("'messages' is required", param="messages", code="missing_required_parameter")
    messages = body["messages"]
    if not isinstance(messages, list):
        raise _wrong_type("messages", "a list of messages", messages)
    if not messages:
        raise RequestError("'messages' must not be empty", param="messages", code="invalid_value")
    parsed = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _wrong_type(f"messages[{i}]", "an object with 'role' and 'content'", m)
        role = m.get("role")
        if role not in ROLES:
            raise RequestError(f"'messages[{i}].role' must be one of {list(ROLES)}, got {json.dumps(role)}",
                               param=f"messages[{i}].role", code="invalid_value")
        parsed.append({"role": role, "content": _message_content(m.get("content"), f"messages[{i}].content")})
    return tuple(parsed)


def _prompt(body: dict) -> str:
    if "prompt" not in body or body["prompt"] is None:
        raise RequestError("'prompt' is required", param="prompt", code="missing_required_parameter")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    if isinstance(prompt, list):
        raise RequestError("'prompt' as a list must hold exactly one string (batched prompts are not served)",
                           param="prompt", code="unsupported_value")
    if not isinstance(prompt, str):
        raise _wrong_type("prompt", "a string", prompt)
    return prompt


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        return tuple(stop)
    raise _wrong_type("stop", "a string or a list of up to 4 strings", stop)


def parse_request(body: dict, *, chat: bool) -> CompletionParams:
    model = body.get("model")
    if model is None:
        raise RequestError("'model' is required", param="model", code="missing_required_parameter")
    if not isinstance(model, str):
        raise _wrong_type("model", "a string", model)
    messages = _messages(body) if chat else None
    prompt = None if chat else _prompt(body)
    max_param = "max_tokens" if body.get("max_tokens") is not None or not chat else "max_completion_tokens"
    max_tokens = _integer(body, max_param)
    if max_tokens is not None and max_tokens <= 0:
        raise RequestError(f"'{max_param}' must be at least 1, got {max_tokens}", param=max_param,
                           code="invalid_value")
    n = _integer(body, "n")
    if n is not None and n != 1:
        raise RequestError(f"'n' must be 1 (one answer per request is served), got {n}", param="n",
                           code="unsupported_value")
    seed = _integer(body, "seed")
    stream = _boolean(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _wrong_type("stream_options", "an object", options)
    include_usage = _boolean(options or {}, "include_usage", False, "stream_options.include_usage")
    cascade = body.get("cascade")
    if cascade is not None and not isinstance(cascade, dict):
        raise _wrong_type("cascade", "an object like {\"escalate\": false}", cascade)
    escalate = _boolean(cascade or {}, "escalate", True, "cascade.escalate")
    judge_answer = _boolean(cascade or {}, "judge_answer", False, "cascade.judge_answer")
    return CompletionParams(
        model=model, messages=messages, prompt=prompt, max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0), top_p=_top_p(body),
        stop=_stop(body), seed=seed, stream=stream, include_usage=include_usage, escalate=escalate,
        ignore_eos=_boolean(body, "ignore_eos", False), logprobs=_logprobs_flag(body, chat),
        judge_answer=judge_answer)


def _top_p(body: dict) -> float:
    """In (0, 1]: nucleus sampling over no probability mass is undefined (vLLM refuses 0)."""
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise RequestError("'top_p' must be in (0, 1], got 0", param="top_p", code="invalid_value")
    return top_p


def _logprobs_flag(body: dict, chat: bool) -> bool:
    """Chat asks with `logprobs: true`; completions with `logprobs: N` (only N <= 1: the
    sampled token's own logprob is what the engines return)."""
    if chat:
        return _boolean(body, "logprobs", False)
    n = _integer(body, "logprobs")
    if n is not None and not 0 <= n <= 1:
        raise RequestError(f"'logprobs' must be 0 or 1 (the sampled token only), got {n}", param="logprobs",
                           code="unsupported_value")
    return n is not None


def logprobs_body(chat: bool, token_ids, logprobs) -> dict:
    """OpenAI's logprobs object for the sampled tokens. Token strings are given as
    `token_id:N` (as vLLM does with return_tokens_as_token_ids): engines stream text per
    chunk, not per token."""
    tokens = [f"token_id:{t}" for t in token_ids]
    if chat:
        return {"content": [{"token": tok, "logprob": lp, "bytes": None, "top_logprobs": []}
                            for tok, lp in zip(tokens, logprobs)]}
    return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": None, "text_offset": None}


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response_body(*, chat: bool, response_id: str, created: int, model: str, text: str, finish_reason: str,
                  usage: dict, cascade: dict | None, logprobs: dict | None = None) -> dict:
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                  "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    body = {"id": response_id, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": [choice], "usage": usage}
    if cascade is not None:
        body["cascade"] = cascade
    return body


def chunk_body(*, chat: bool, response_id: str, created: int, model: str, text: str | None,
               finish_reason: str | None, first: bool = False, usage: dict | None = None,
               include_usage: bool = False, cascade: dict | None = None) -> dict:
    """One SSE chunk. ``text=None`` makes the usage-only chunk (empty ``choices``)."""
    choices = []
    if text is not None:
        if chat:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        else:
            choices = [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]
    body = {"id": response_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": model, "choices": choices}
    if include_usage:
        body["usage"] = usage  # null on every chunk but the last, as OpenAI does
    if cascade is not None:
        body["cascade"] = cascade
    return body
