"""The open-loop replay client: an arrival task releases requests on their schedule into
a queue, whatever the server's speed; the send loop starts one streaming request per
released request (at most ``max_concurrency`` in flight when set: the rest wait, and the
wait shows as send_s > scheduled_s). Every request ends as a record, failures included.

Any OpenAI-compatible server: ``/v1/completions`` (or ``/v1/chat/completions``) with
``stream: true``, ``stream_options.include_usage``, ``max_tokens`` and ``ignore_eos`` (a
vLLM extension that Cascadia honours; servers that do not know it ignore it). Cascadia's
``cascade`` field on the chunks names the answering stage and the judge scores.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import aiohttp

from benchmarks.replay.records import ERROR, OK, ReplayRecord
from benchmarks.replay.workload import ReplayRequest

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
MAX_ERROR_CHARS = 300


class Unreachable(Exception):
    """The server did not answer /v1/models; the message says how."""


def base_url(url: str) -> str:
    """``http://host:port`` from a URL given with or without a trailing ``/v1``."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


async def served_models(session: aiohttp.ClientSession, url: str, timeout_s: float = 10.0) -> list[dict]:
    """``/v1/models``' data list; Unreachable when the server cannot be asked."""
    try:
        async with session.get(base_url(url) + "/v1/models", timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
            if r.status != 200:
                raise Unreachable(f"{url}/v1/models answered HTTP {r.status}")
            doc = await r.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
        raise Unreachable(f"cannot reach {url}: {type(e).__name__}: {e}".rstrip(": ")) from None
    except json.JSONDecodeError:
        raise Unreachable(f"{url}/v1/models did not answer JSON") from None
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        raise Unreachable(f"{url}/v1/models has no 'data' list")
    return data


@dataclass(frozen=True)
class ClientConfig:
    url: str
    model: str
    endpoint: str = "completions"
    max_concurrency: int | None = None
    request_timeout_s: float = 600.0
    ignore_eos: bool = True
    logprobs: bool = False  # ask for the sampled tokens' logprobs (recorded as a sum and a count)
    extra_body: dict = field(default_factory=dict)  # merged into every request body
    # request i is sent with x-request-id PREFIX-i: a server that draws anything per request
    # id (Cascadia's simulated engines: the synthetic answers) then replays reproducibly
    request_id_prefix: str = "replay"


def request_body(cfg: ClientConfig, req: ReplayRequest) -> dict:
    body = {"model": cfg.model, "max_tokens": req.max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if cfg.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    if cfg.logprobs:
        body["logprobs"] = True if cfg.endpoint == "chat" else 1
    return body | cfg.extra_body


def _error_text(raw: bytes) -> str:
    try:
        doc = json.loads(raw)
        msg = doc["error"]["message"] if isinstance(doc.get("error"), dict) else doc.get("error") or doc
    except (ValueError, AttributeError, KeyError, TypeError):
        msg = raw.decode(errors="replace")
    return str(msg)[:MAX_ERROR_CHARS]


def _chunk_text(choice: dict) -> str:
    if "delta" in choice:
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


def _add_logprobs(lp, rec: ReplayRecord) -> None:
    """OpenAI chat (``content: [{logprob}]``) or completions (``token_logprobs``) shapes."""
    if not isinstance(lp, dict):
        return
    items = [c.get("logprob") for c in lp.get("content") or [] if isinstance(c, dict)]
    items += list(lp.get("token_logprobs") or [])
    values = [float(x) for x in items if isinstance(x, (int, float)) and not isinstance(x, bool)]
    if values:
        rec.logprob_sum = (rec.logprob_sum or 0.0) + sum(values)
        rec.logprob_tokens += len(values)


def _read_event(doc: dict, rec: ReplayRecord, now: float) -> bool:
    """Update ``rec`` from one SSE event; True when it reported an error."""
    if "error" in doc:
        rec.error = _error_text(json.dumps(doc).encode())
        return True
    for choice in doc.get("choices") or []:
        if _chunk_text(choice):
            rec.token_times_s.append(now)
        _add_logprobs(choice.get("logprobs"), rec)
    usage = doc.get("usage")
    if isinstance(usage, dict):
        rec.prompt_tokens = usage.get("prompt_tokens", rec.prompt_tokens)
        if isinstance(usage.get("completion_tokens"), int):
            rec.output_tokens = usage["completion_tokens"]
    cascade = doc.get("cascade")
    if isinstance(cascade, dict):
        rec.stage, rec.stage_name = cascade.get("stage"), cascade.get("stage_name")
        rec.scores = list(cascade.get("scores") or [])
        if "answer_score" in cascade:
            rec.answer_score = cascade["answer_score"]
    return False


async def send_one(session: aiohttp.ClientSession, cfg: ClientConfig, req: ReplayRequest, rec: ReplayRecord,
                   clock: Callable[[], float]) -> None:
    """Send ``req`` and fill ``rec`` (times from ``clock``, already relative to the run)."""
    rec.send_s = clock()
    done = usage_seen = False
    try:
        async with session.post(base_url(cfg.url) + ENDPOINTS[cfg.endpoint], json=request_body(cfg, req),
                                headers={"x-request-id": rec.request_id},
                                timeout=aiohttp.ClientTimeout(total=cfg.request_timeout_s)) as resp:
            rec.http_status = resp.status
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}: {_error_text(await resp.read())}"
                return
            async for raw in resp.content:  # one SSE line at a time; ends with the stream
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[len(b"data:"):].strip()
                if payload == b"[DONE]":
                    done = True
                    break
                try:
                    doc = json.loads(payload)
                except json.JSONDecodeError:
                    rec.error = f"bad SSE data: {payload[:80]!r}"
                    return
                usage_seen = usage_seen or isinstance(doc.get("usage"), dict)
                if _read_event(doc, rec, clock()):
                    return
        if not done:
            rec.error = "the stream ended before [DONE]"
            return
        if not usage_seen:  # no usage from the server: count the chunks that carried text
            rec.output_tokens = len(rec.token_times_s)
        rec.status = OK
    except asyncio.TimeoutError:
        rec.error = f"timed out after {cfg.request_timeout_s:g} s"
    except (aiohttp.ClientError, OSError) as e:
        rec.error = f"{type(e).__name__}: {e}"[:MAX_ERROR_CHARS]
    except (ValueError, TypeError, AttributeError, KeyError) as e:  # a malformed answer is a failed request
        rec.error = f"unreadable answer: {type(e).__name__}: {e}"[:MAX_ERROR_CHARS]
    finally:
        rec.end_s = clock()
        if rec.status != OK:
            rec.status = ERROR


async def replay(requests: Sequence[ReplayRequest], cfg: ClientConfig, *, progress=None,
                 clock: Callable[[], float] = time.perf_counter) -> list[ReplayRecord]:
    """Send every request at its scheduled time; the records in request order."""
    t0 = clock()
    now = lambda: clock() - t0  # noqa: E731
    records = [ReplayRecord(index=r.index, request_id=f"{cfg.request_id_prefix}-{r.index}",
                            scheduled_s=r.scheduled_s, input_tokens=r.input_tokens, max_tokens=r.max_tokens)
               for r in requests]
    released: asyncio.Queue = asyncio.Queue()
    slots = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None

    async def arrivals() -> None:
        for pos, req in enumerate(requests):
            wait = req.scheduled_s - now()
            if wait > 0:
                await asyncio.sleep(wait)
            released.put_nowait(pos)
        released.put_nowait(None)

    async def one(session: aiohttp.ClientSession, pos: int) -> None:
        if slots is None:
            await send_one(session, cfg, requests[pos], records[pos], now)
        else:
            async with slots:
                await send_one(session, cfg, requests[pos], records[pos], now)
        if progress is not None:
            progress.update(1)

    connector = aiohttp.TCPConnector(limit=cfg.max_concurrency or 0)
    async with aiohttp.ClientSession(connector=connector) as session:
        arrival_task = asyncio.create_task(arrivals())
        tasks = []
        for _ in range(len(requests) + 1):  # every request, then the end marker
            pos = await released.get()
            if pos is None:
                break
            tasks.append(asyncio.create_task(one(session, pos)))
        await arrival_task
        await asyncio.gather(*tasks)
    return records
