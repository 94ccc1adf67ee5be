"""A stage served by any OpenAI-compatible HTTP endpoint (an external API, an existing
vLLM server, or another Cascadia server): the router's `Engine` interface over HTTP.

Which endpoint a request goes to
- The router renders chat messages with the stage's `chat_prompt` and hands the engine the
  resulting text. A remote server applies its own model's chat template, which the router
  does not know, so with ``chat=True`` (the default) `chat_prompt` does not render
  anything: it returns the messages JSON-encoded under one key (`CHAT_KEY`), and
  `generate` recognises that text and sends the messages to ``/v1/chat/completions``. Any
  other prompt (a client's plain completion request) goes to ``/v1/completions`` as is.
  A completion prompt that is itself exactly such a JSON object would be taken for chat.
- With ``chat=False`` (endpoints that serve only ``/v1/completions`` with a base model),
  `chat_prompt` renders a plain "role: content" transcript ending in "assistant:".

What comes back
- Streams with ``stream: true`` and ``stream_options.include_usage``; asks for the
  sampled tokens' logprobs (completions: ``logprobs: 1``; chat: ``logprobs: true,
  top_logprobs: 0``) so the `logprob` judge can score a remote stage.
- Token ids: OpenAI-style APIs return token *strings*, not ids. Each token with a logprob
  is reported with id -1 (unknown), so `token_ids` and `logprobs` stay aligned and the
  completion token count is right; a vLLM server started with
  ``--return-tokens-as-token-ids`` (or asked via ``extra_body``) sends "token_id:N" and the
  real id is used. An endpoint that returns no logprobs gives chunks with text only
  (`token_ids == ()`), so the cascade counts 0 completion tokens for them.
- Finish reasons: "stop" and "length" map to themselves; anything else the endpoint ends
  with ("content_filter", "tool_calls", ...) becomes "stop". ``usage.prompt_tokens`` (or
  the ~4 characters/token estimate when the endpoint sends no usage) rides on the final
  chunk.
- ``ignore_eos`` is sent only when the request sets it (vLLM honours it; strict APIs such
  as OpenAI's reject unknown fields, so it is not sent otherwise).

Failures — refused connection, an HTTP error status, no bytes for ``timeout_s``, a
malformed event, an error event mid-stream, a stream that ends unfinished — raise
`router.protocol.EngineError` naming the engine, the URL and what happened. ``timeout_s``
bounds connecting and every wait for the next bytes, not a whole generation.

`abort(request_id)` closes that request's HTTP response (the remote server sees the
client go away and, for vLLM, aborts the request); its `generate` then ends with a chunk
whose finish reason is "abort". `count_tokens` asks the endpoint's ``/tokenize`` (vLLM has
it) on first use and falls back for good to ~4 characters/token when that fails.
The HTTP session is made on first use inside the running event loop; `shutdown` closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
from typing import AsyncIterator, Mapping

from router.protocol import EngineError, GenerateRequest, TokenChunk

CHAT_KEY = "cascadia_chat_messages"
CHARS_PER_TOKEN = 4
_TOKEN_ID_PREFIX = "token_id:"
_UNKNOWN_TOKEN_ID = -1


def approx_tokens(text: str) -> int:
    """Tokens of `text` under the ~4 characters per token rule (at least 1)."""
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


def encode_chat(messages: list[dict]) -> str:
    return json.dumps({CHAT_KEY: list(messages)}, ensure_ascii=False)


def decode_chat(prompt: str) -> list[dict] | None:
    """The messages of a prompt made by `encode_chat`; None for any other text."""
    if not prompt.startswith('{"' + CHAT_KEY + '"'):
        return None
    try:
        body = json.loads(prompt)
    except ValueError:
        return None
    messages = body.get(CHAT_KEY) if isinstance(body, dict) and len(body) == 1 else None
    if isinstance(messages, list) and all(isinstance(m, dict) for m in messages):
        return messages
    return None


def _finish_reason(reason: str) -> str:
    return reason if reason in ("stop", "length") else "stop"


def _token_id(token: object) -> int:
    if isinstance(token, str) and token.startswith(_TOKEN_ID_PREFIX):
        try:
            return int(token[len(_TOKEN_ID_PREFIX):])
        except ValueError:
            pass
    return _UNKNOWN_TOKEN_ID


def parse_choice(choice: dict, *, chat: bool) -> tuple[str, tuple[int, ...], tuple[float, ...]]:
    """Text, token ids and logprobs of one streamed choice (chat delta or completion text).
    Logprobs are kept only when there is one for every token reported."""
    if chat:
        text = (choice.get("delta") or {}).get("content") or ""
        entries = (choice.get("logprobs") or {}).get("content") or []
        tokens = [e.get("token") for e in entries]
        lps = [e.get("logprob") for e in entries]
    else:
        text = choice.get("text") or ""
        lp = choice.get("logprobs") or {}
        tokens = list(lp.get("tokens") or [])
        lps = list(lp.get("token_logprobs") or [])
    if not lps or len(lps) != len(tokens) or not all(isinstance(x, (int, float)) for x in lps):
        return text, (), ()
    return text, tuple(_token_id(t) for t in tokens), tuple(float(x) for x in lps)


def _error_message(body: bytes) -> str:
    """The `error.message` of an OpenAI-style error body, else the start of the body."""
    try:
        err = json.loads(body).get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
    except (ValueError, AttributeError):
        pass
    return body[:300].decode("utf-8", "replace").strip() or "(empty body)"


class OpenAIEngine:
    """An `Engine` backed by a remote OpenAI-compatible endpoint serving `model`."""

    def __init__(self, name: str, base_url: str, model: str, *, api_key: str | None = None,
                 api_key_env: str | None = None, timeout_s: float = 60.0, max_model_len: int = 8192,
                 chat: bool = True, extra_body: Mapping[str, object] | None = None):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if api_key is None and api_key_env is not None:
            api_key = os.environ.get(api_key_env)
            if not api_key:
                raise ValueError(f"{name}: environment variable {api_key_env} (the API key) is not set")
        self.name = name
        self.model = model
        self.max_model_len = max_model_len
        self.timeout_s = timeout_s
        self.chat = chat
        self.extra_body = dict(extra_body or {})
        root = base_url.rstrip("/")
        self.base_url = root[:-3] if root.endswith("/v1") else root
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session = None
        self._responses: dict[str, object] = {}  # request id -> its open aiohttp response
        self._aborted: set[str] = set()
        self._tokenize_works: bool | None = None  # unknown until first tried
        self._requests_done = self._requests_aborted = self._requests_failed = 0
        self._tokens_out = 0

    # ---------------- HTTP plumbing ----------------
    def _client(self):
        import aiohttp

        if self._session is None or self._session.closed:
            # no total limit: a long generation is fine as long as bytes keep coming
            timeout = aiohttp.ClientTimeout(total=None, connect=self.timeout_s, sock_read=self.timeout_s)
            self._session = aiohttp.ClientSession(timeout=timeout, headers=self._headers)
        return self._session

    def _fail(self, url: str, what: str) -> EngineError:
        return EngineError(f"{self.name}: {url}: {what}")

    def _payload(self, req: GenerateRequest, messages: list[dict] | None) -> dict:
        body: dict = {"model": self.model, "max_tokens": req.max_tokens, "temperature": req.temperature,
                      "top_p": req.top_p, "stream": True, "stream_options": {"include_usage": True}}
        if messages is not None:
            body["messages"] = messages
            if req.logprobs:
                body.update(logprobs=True, top_logprobs=0)
        else:
            body["prompt"] = req.prompt
            if req.logprobs:
                body["logprobs"] = 1
        if req.stop:
            body["stop"] = list(req.stop)
        if req.seed is not None:
            body["seed"] = req.seed
        if req.ignore_eos:
            body["ignore_eos"] = True
        body.update(self.extra_body)
        return body

    # ---------------- Engine protocol ----------------
    async def generate(self, req: GenerateRequest) -> AsyncIterator[TokenChunk]:
        import aiohttp

        if req.request_id in self._responses:
            raise EngineError(f"{self.name}: request id {req.request_id} is already in flight")
        messages = decode_chat(req.prompt)
        url = f"{self.base_url}/v1/{'chat/completions' if messages is not None else 'completions'}"
        self._aborted.discard(req.request_id)
        self._responses[req.request_id] = None  # claimed; the response is filled in once open
        resp = None
        finished = False
        try:
            try:
                resp = await self._client().post(url, json=self._payload(req, messages))
            except asyncio.TimeoutError:
                raise self._fail(url, f"no connection or answer within {self.timeout_s} s") from None
            except aiohttp.ClientError as e:
                raise self._fail(url, f"cannot connect ({e})") from None
            if resp.status >= 400:
                raise self._fail(url, f"HTTP {resp.status}: {_error_message(await resp.read())}")
            if req.request_id in self._aborted:  # aborted while connecting
                yield TokenChunk((), "", (), finished=True, finish_reason="abort")
                finished = True
                return
            self._responses[req.request_id] = resp
            async with contextlib.aclosing(self._read_stream(req, url, resp, chat=messages is not None)) as chunks:
                async for chunk in chunks:
                    finished = chunk.finished
                    yield chunk
                    if finished:
                        return
        except EngineError:
            self._requests_failed += 1
            raise
        finally:
            self._responses.pop(req.request_id, None)
            self._aborted.discard(req.request_id)
            if resp is not None:
                # closing (not releasing) drops the connection, so the server sees the client go
                resp.close()

    async def _read_stream(self, req: GenerateRequest, url: str, resp, *, chat: bool) -> AsyncIterator[TokenChunk]:
        import aiohttp

        finish: str | None = None
        prompt_tokens: int | None = None
        try:
            async for data in _sse_data(resp):
                if data.strip() == "[DONE]":
                    break
                try:
                    event = json.loads(data)
                except ValueError:
                    raise self._fail(url, f"malformed stream event {data[:120]!r}") from None
                if not isinstance(event, dict):
                    raise self._fail(url, f"malformed stream event {data[:120]!r}")
                if event.get("error"):
                    raise self._fail(url, f"error mid-stream: {_error_message(data.encode())}")
                usage = event.get("usage")
                if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
                    prompt_tokens = usage["prompt_tokens"]
                for choice in event.get("choices") or []:
                    if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                        continue
                    text, ids, lps = parse_choice(choice, chat=chat)
                    if choice.get("finish_reason"):
                        finish = _finish_reason(str(choice["finish_reason"]))
                    if text or ids:
                        self._tokens_out += len(ids)
                        yield TokenChunk(ids, text, lps if req.logprobs else ())
        except (aiohttp.ClientError, ConnectionError, ValueError) as e:
            if req.request_id in self._aborted:
                finish = "abort"
            else:
                raise self._fail(url, f"stream broke ({type(e).__name__}: {e})") from None
        except asyncio.TimeoutError:
            raise self._fail(url, f"no bytes for {self.timeout_s} s mid-stream") from None
        if req.request_id in self._aborted:
            finish = "abort"
        if finish is None:
            raise self._fail(url, "the stream ended before the answer finished")
        if finish == "abort":
            self._requests_aborted += 1
        else:
            self._requests_done += 1
        if prompt_tokens is None and finish != "abort":
            prompt_tokens = approx_tokens(req.prompt)
        yield TokenChunk((), "", (), finished=True, finish_reason=finish, prompt_tokens=prompt_tokens)

    async def abort(self, request_id: str) -> None:
        if request_id not in self._responses:
            return
        self._aborted.add(request_id)
        resp = self._responses.get(request_id)
        if resp is not None:
            resp.close()

    async def chat_prompt(self, messages: list[dict]) -> str:
        if self.chat:
            return encode_chat(messages)
        lines = [f"{m.get('role', 'user')}: {m.get('content', '')}" for m in messages]
        return "\n".join(lines) + "\nassistant:"

    async def count_tokens(self, text: str) -> int:
        messages = decode_chat(text)
        if self._tokenize_works is not False:
            counted = await self._tokenize(text, messages)
            if self._tokenize_works is None:
                self._tokenize_works = counted is not None
            if counted is not None:
                return counted
        if messages is not None:
            # the remote template adds a few tokens per message around the content
            return sum(approx_tokens(str(m.get("content", ""))) + 4 for m in messages)
        return approx_tokens(text)

    async def _tokenize(self, text: str, messages: list[dict] | None) -> int | None:
        """vLLM's ``/tokenize`` count, or None when the endpoint cannot say."""
        body: dict = {"model": self.model}
        if messages is not None:
            body.update(messages=messages, add_generation_prompt=True)
        else:
            body["prompt"] = text
        try:
            async with self._client().post(f"{self.base_url}/tokenize", json=body) as resp:
                if resp.status != 200:
                    return None
                count = (await resp.json(content_type=None)).get("count")
        except Exception:  # any failure means "no tokenizer here": fall back to the estimate
            return None
        return count if isinstance(count, int) else None

    async def health(self) -> bool:
        """The endpoint answers ``GET /v1/models`` and, when it lists models, lists ours."""
        try:
            async with self._client().get(f"{self.base_url}/v1/models") as resp:
                if resp.status != 200:
                    return False
                listed = (await resp.json(content_type=None)).get("data")
        except Exception:  # unreachable or not JSON: unhealthy, whatever the cause
            return False
        if not isinstance(listed, list):
            return True
        return any(isinstance(m, dict) and m.get("id") == self.model for m in listed)

    async def stats(self) -> dict:
        return {"name": self.name, "remote": True, "endpoint": self.base_url, "model": self.model,
                "running": len(self._responses), "requests_done": self._requests_done,
                "requests_aborted": self._requests_aborted, "requests_failed": self._requests_failed,
                "tokens_out": self._tokens_out}

    async def shutdown(self) -> None:
        for request_id in list(self._responses):
            await self.abort(request_id)
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _sse_data(resp) -> AsyncIterator[str]:
    """The ``data`` of each server-sent event (multi-line data joined by newlines; comments
    and other fields skipped)."""
    data: list[str] = []
    async for raw in resp.content:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if field == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)
