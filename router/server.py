"""The OpenAI-compatible aiohttp server in front of a cascade.

Layers: route -> handler (validate with router.openai_schema, pick the cascade or a
member) -> ``Cascade.run`` / ``Cascade.stream``. Engines are injected, so the same app
serves vLLM engines on Ray, simulated engines or test fakes.

- ``model`` = the cascade's name goes through the cascade; a member's name goes straight
  to that engine (a one-stage cascade: never judged, unless the client asks for the
  answer's score with ``cascade: {"judge_answer": true}``, answered in
  ``cascade.answer_score`` by the cascade's own judge).
- The answering stage and the judge scores come back in the ``cascade`` JSON field (and
  on every SSE chunk) and the ``x-cascadia-stage`` header. In streaming the header is
  sent once the answering stage is known, i.e. after held stages were judged.
- ``x-request-id``: the client's, or a new one; returned on every response and logged.
- A client that goes away cancels its request; the cascade aborts the engine work.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import time
import uuid
from typing import Mapping

from aiohttp import web

from router.auth import AccessPolicy
from router.cascade import Cascade, CascadeRequest, CascadeResult, Stage
from router.metrics import RouterMetrics
from router.openai_schema import (CompletionParams, RequestError, chunk_body, error_body, logprobs_body, parse_json,
                                  parse_request, response_body, usage_body)
from router.pool import PoolFull
from router.protocol import EngineError

log = logging.getLogger("cascadia.router")

DISCONNECT_POLL_S = 0.05
HEALTH_TIMEOUT_S = 2.0
ESCALATE_HEADER = "x-cascadia-escalate"
RETRY_AFTER_S = 1  # what a shed request is told (Retry-After); queues turn over in about that here

_CASCADE = web.AppKey("cascade", Cascade)
_MEMBERS = web.AppKey("members", dict)
_MODEL = web.AppKey("model_name", str)
_METRICS = web.AppKey("metrics", RouterMetrics)
_CREATED = web.AppKey("created", int)
_NOTE = web.AppKey("threshold_note", str)
_ACCESS = web.AppKey("access", AccessPolicy)
_MONITOR = web.AppKey("monitor", object)  # a router.monitor.WorkloadMonitor, or None
_STATE = web.AppKey("state", dict)  # draining: set once shutdown begins; cut: requests cancelled while draining
# typed request storage (aiohttp >= 3.12); plain string keys before that
_RID = web.RequestKey("request_id", str) if hasattr(web, "RequestKey") else "request_id"
_REQ_MODEL = web.RequestKey("model", str) if hasattr(web, "RequestKey") else "model"


class ClientGone(Exception):
    """The client closed the connection before the answer was complete."""


def make_app(cascade: Cascade, *, model_name: str, member_engines: Mapping[str, object], metrics: RouterMetrics,
             max_body_bytes: int = 1 << 20, threshold_note: str = "",
             access: AccessPolicy = AccessPolicy(), monitor=None) -> web.Application:
    """``member_engines``: model name -> Engine, each addressable directly. ``threshold_note``
    says where the thresholds come from (e.g. re-calibrated for a different judge) and is
    shown in ``/v1/models``. ``access``: API keys and the per-request max_tokens limit
    (router/auth.py). ``monitor``: a router.monitor.WorkloadMonitor told of every request to
    the cascade (not of direct member calls), for online re-planning."""
    if model_name in member_engines:
        raise ValueError(f"the cascade's name {model_name!r} is also a member's name")
    app = web.Application(client_max_size=max_body_bytes, middlewares=[_request_id_and_errors])
    app[_CASCADE] = cascade
    app[_MEMBERS] = {name: Cascade([Stage(name, engine, None)], cascade.judge)
                     for name, engine in member_engines.items()}
    app[_MODEL] = model_name
    app[_METRICS] = metrics
    app[_CREATED] = int(time.time())
    app[_NOTE] = threshold_note
    app[_ACCESS] = access
    app[_MONITOR] = monitor
    app[_STATE] = {"draining": False, "cut": 0, "active": 0}
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _ready)
    app.router.add_get("/health/ready", _ready)
    app.router.add_get("/health/live", _live)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/openapi.json", _openapi)
    return app


def _json_error(status: int, body: dict, request_id: str) -> web.Response:
    return web.json_response(body, status=status, headers={"x-request-id": request_id})


@web.middleware
async def _request_id_and_errors(request: web.Request, handler):
    request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
    request[_RID] = request_id
    if not request.app[_ACCESS].allows(request.path, request.headers.get("Authorization")):
        request.app[_METRICS].record_failure("unknown", "unauthorized")
        log.info("request %s: 401 missing or invalid API key for %s", request_id, request.path)
        return _json_error(401, error_body("missing or invalid API key: send 'Authorization: Bearer <key>'",
                                           type="invalid_request_error", code="invalid_api_key"), request_id)
    if request.app[_STATE]["draining"] and request.path.startswith("/v1/"):
        return _json_error(503, error_body("the server is shutting down; retry on another replica",
                                           type="server_error", code="shutting_down"), request_id)
    try:
        response = await handler(request)
    except RequestError as e:
        if not getattr(e, "recorded", False):  # handlers record engine errors and sheds themselves
            request.app[_METRICS].record_failure(request.get(_REQ_MODEL, "unknown"), "client_error")
        log.info("request %s: %d %s", request_id, e.status, e.message)
        response = _json_error(e.status, e.body(), request_id)
        if e.status == 429:
            response.headers["Retry-After"] = str(RETRY_AFTER_S)
        return response
    except web.HTTPRequestEntityTooLarge:
        message = f"request body exceeds the limit of {request.app._client_max_size} bytes"
        log.info("request %s: 413 %s", request_id, message)
        return _json_error(413, error_body(message, type="invalid_request_error", code="request_too_large"),
                           request_id)
    except web.HTTPException as e:  # unknown route, wrong method
        if e.status < 400:
            raise
        return _json_error(e.status, error_body(f"{request.method} {request.path}: {e.reason}",
                                                type="invalid_request_error", code=str(e.status)), request_id)
    except Exception:
        log.exception("request %s: internal error", request_id)
        return _json_error(500, error_body("internal server error", type="server_error"), request_id)
    if not response.prepared:
        response.headers["x-request-id"] = request_id
    return response


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    return await _counted(request, chat=True)


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _counted(request, chat=False)


async def _counted(request: web.Request, *, chat: bool) -> web.StreamResponse:
    """_serve, counted in the state's ``active`` (what a drain waits for)."""
    state = request.app[_STATE]
    state["active"] += 1
    try:
        return await _serve(request, chat=chat)
    finally:
        state["active"] -= 1


def _target(app: web.Application, model: str) -> Cascade:
    if model == app[_MODEL]:
        return app[_CASCADE]
    if model in app[_MEMBERS]:
        return app[_MEMBERS][model]
    known = [app[_MODEL], *app[_MEMBERS]]
    raise RequestError(f"model {model!r} does not exist; this server serves {known}", param="model",
                       code="model_not_found", status=404)


async def _cascade_request(request: web.Request, params: CompletionParams, target: Cascade) -> CascadeRequest:
    first = target.stages[0].pool
    text = await first.chat_prompt(list(params.messages)) if params.messages is not None else params.prompt
    prompt_tokens = await first.count_tokens(text)
    context = target.max_model_len
    if prompt_tokens >= context:
        raise RequestError(f"the prompt has {prompt_tokens} tokens; the context is {context} tokens",
                           param="messages" if params.messages is not None else "prompt",
                           code="context_length_exceeded")
    max_tokens = params.max_tokens if params.max_tokens is not None else context - prompt_tokens
    if prompt_tokens + max_tokens > context:
        raise RequestError(f"max_tokens={max_tokens} plus the prompt's {prompt_tokens} tokens exceeds the "
                           f"context of {context} tokens", param="max_tokens", code="context_length_exceeded")
    escalate = params.escalate and request.headers.get(ESCALATE_HEADER, "").lower() not in ("false", "0", "no")
    return CascadeRequest(request_id=request[_RID], max_tokens=max_tokens, messages=params.messages,
                          prompt=params.prompt, temperature=params.temperature, top_p=params.top_p, stop=params.stop,
                          seed=params.seed, ignore_eos=params.ignore_eos, escalate=escalate,
                          first_stage_prompt=text, judge_answer=params.judge_answer, prompt_tokens=prompt_tokens)


def _cascade_field(stage_index: int, stage_name: str, scores: tuple[float, ...],
                   result: CascadeResult | None = None) -> dict:
    field = {"stage": stage_index, "stage_name": stage_name,
             "scores": [s if math.isfinite(s) else None for s in scores]}  # a failed judge is null
    if result is not None:
        field["escalations"] = result.escalations
        field["judge_s"] = result.timings.judge_s
        if result.answer_score is not None:
            field["answer_score"] = result.answer_score if math.isfinite(result.answer_score) else None
    return field


async def _until_disconnect(request: web.Request, coro):
    """Run ``coro``; cancel it (the cascade then aborts engine work) if the client leaves."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            transport = request.transport
            if transport is None or transport.is_closing():
                raise ClientGone()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def _serve(request: web.Request, *, chat: bool) -> web.StreamResponse:
    params = parse_request(parse_json(await request.read()), chat=chat)
    request[_REQ_MODEL] = params.model
    limit = request.app[_ACCESS].max_tokens_limit
    if limit is not None and params.max_tokens is not None and params.max_tokens > limit:
        raise RequestError(f"max_tokens {params.max_tokens} is above this server's limit of {limit}",
                           param="max_tokens", code="max_tokens_too_large")
    if limit is not None and params.max_tokens is None:
        params = dataclasses.replace(params, max_tokens=limit)  # no request runs past the limit
    target = _target(request.app, params.model)
    creq = await _cascade_request(request, params, target)
    metrics = request.app[_METRICS]
    monitor = request.app[_MONITOR] if target is request.app[_CASCADE] else None
    if monitor is not None:
        monitor.arrived(creq.request_id, creq.prompt_tokens or 0, creq.max_tokens)
    response_id = ("chatcmpl-" if chat else "cmpl-") + creq.request_id
    try:
        if params.stream:
            response = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache",
                                                   "x-request-id": creq.request_id})
            result = await _until_disconnect(request, _write_stream(request, response, target, creq, params, chat,
                                                                   response_id))
        else:
            result = await _until_disconnect(request, target.run(creq))
            response = web.json_response(
                response_body(chat=chat, response_id=response_id, created=int(time.time()), model=params.model,
                              text=result.text, finish_reason=result.finish_reason,
                              usage=usage_body(result.usage.prompt_tokens, result.usage.completion_tokens),
                              cascade=_cascade_field(result.stage_index, result.stage_name, result.scores, result),
                              logprobs=logprobs_body(chat, result.token_ids, result.logprobs) if params.logprobs
                              else None),
                headers={"x-cascadia-stage": result.stage_name, "x-cascadia-stage-index": str(result.stage_index)})
    except (ClientGone, ConnectionResetError):
        _record_abort(request, params.model, creq.request_id, "client disconnected")
        raise web.HTTPBadRequest(reason="client disconnected") from None  # nobody reads it
    except asyncio.CancelledError:  # aiohttp cancelled the handler (the client left, or shutdown)
        _record_abort(request, params.model, creq.request_id, "cancelled")
        raise
    except EngineError as e:
        shed = isinstance(e, PoolFull)  # the stage's queue is full: 429, the client may retry
        metrics.record_failure(params.model, "overloaded" if shed else "engine_error")
        (log.info if shed else log.warning)("request %s: %s: %s", creq.request_id,
                                             "shed" if shed else "engine error", e)
        if params.stream and response.prepared:
            # the error event is already in the stream: end it cleanly, or a second response would
            # be written into the keep-alive connection and garble the client's next request
            await response.write_eof()
            return response
        if shed:
            raise _recorded(RequestError(f"overloaded: {e}; retry after {RETRY_AFTER_S} s", type="server_error",
                                         code="overloaded", status=429)) from None
        raise _recorded(RequestError(f"engine failed: {e}", type="server_error", code="engine_error",
                                     status=503)) from None
    metrics.record_result(params.model, result)
    if monitor is not None:
        monitor.finished(creq.request_id, result)
    log.info("request %s: model=%s stage=%s scores=%s e2e=%.3fs", creq.request_id, params.model, result.stage_name,
             list(result.scores), result.timings.e2e_s)
    return response


def _record_abort(request: web.Request, model: str, request_id: str, why: str) -> None:
    """A request that ended without an answer (its engine work is aborted by the cascade);
    while draining, that is shutdown cutting it at the deadline."""
    request.app[_METRICS].record_failure(model, "aborted")
    if request.app[_STATE]["draining"]:
        request.app[_STATE]["cut"] += 1
    log.info("request %s: %s; engine work aborted", request_id, why)


def _recorded(e: RequestError) -> RequestError:
    """Mark an error whose failure the handler has already counted in the metrics."""
    e.recorded = True
    return e


def _sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def _write_stream(request: web.Request, response: web.StreamResponse, target: Cascade, creq: CascadeRequest,
                        params: CompletionParams, chat: bool, response_id: str) -> CascadeResult:
    created = int(time.time())
    common = dict(chat=chat, response_id=response_id, created=created, model=params.model,
                  include_usage=params.include_usage)
    result = None
    first = True
    async with contextlib.aclosing(target.stream(creq)) as deltas:
        try:
            async for delta in deltas:
                if not response.prepared:
                    response.headers["x-cascadia-stage"] = delta.stage_name
                    response.headers["x-cascadia-stage-index"] = str(delta.stage_index)
                    await response.prepare(request)
                cascade = _cascade_field(delta.stage_index, delta.stage_name, delta.scores, delta.result)
                if delta.finished:
                    result = delta.result
                    await response.write(_sse(chunk_body(**common, text="", finish_reason=result.finish_reason,
                                                         first=first, cascade=cascade)))
                else:
                    await response.write(_sse(chunk_body(**common, text=delta.text, finish_reason=None, first=first,
                                                         cascade=cascade)))
                first = False
        except EngineError as e:
            if not response.prepared:
                raise
            body = error_body(f"engine failed: {e}", type="server_error", code="engine_error")
            await response.write(_sse(body))
            await response.write(_sse("[DONE]"))
            raise
    if params.include_usage:
        usage = usage_body(result.usage.prompt_tokens, result.usage.completion_tokens)
        await response.write(_sse(chunk_body(**{**common, "include_usage": True}, text=None, finish_reason=None,
                                             usage=usage)))
    await response.write(_sse("[DONE]"))
    await response.write_eof()
    return result


async def _models(request: web.Request) -> web.Response:
    app = request.app
    cascade = app[_CASCADE]
    created = app[_CREATED]
    info = {"stages": [{"name": s.name, "threshold": s.threshold} for s in cascade.stages],
            "judge": None if cascade.judge is None else {"name": cascade.judge.name, "score_low": cascade.judge.score_low,
                                                         "score_high": cascade.judge.score_high}}
    if app[_NOTE]:
        info["thresholds"] = app[_NOTE]
    data = [{"id": app[_MODEL], "object": "model", "created": created, "owned_by": "cascadia",
             "max_model_len": cascade.max_model_len, "cascade": info}]
    data += [{"id": name, "object": "model", "created": created, "owned_by": "cascadia", "root": name,
              "parent": app[_MODEL], "max_model_len": member.max_model_len} for name, member in app[_MEMBERS].items()]
    return web.json_response({"object": "list", "data": data})


async def _healthy(engine) -> bool:
    try:
        return bool(await asyncio.wait_for(engine.health(), HEALTH_TIMEOUT_S))
    except Exception:  # a dead or hung engine is simply not healthy
        return False


async def _stage_health(app: web.Application) -> list[bool]:
    cascade = app[_CASCADE]
    healthy = await asyncio.gather(*(_healthy(s.pool) for s in cascade.stages))
    for stage, ok, in_flight in zip(cascade.stages, healthy, cascade.in_flight):
        app[_METRICS].set_stage_state(stage.name, in_flight=in_flight, healthy=ok, pool=stage.pool)
    return list(healthy)


def requests_cut(app: web.Application) -> int:
    """Requests cancelled because the drain deadline passed."""
    return app[_STATE]["cut"]


def requests_active(app: web.Application) -> int:
    """API requests being handled right now."""
    return app[_STATE]["active"]


def begin_drain(app: web.Application) -> int:
    """Shutdown has begun: readiness turns 503 and new API requests get 503 while the
    requests in flight finish. Returns how many API requests are being handled."""
    app[_STATE]["draining"] = True
    return requests_active(app)


async def _ready(request: web.Request) -> web.Response:
    if request.app[_STATE]["draining"]:
        return web.json_response({"status": "draining"}, status=503)
    healthy = await _stage_health(request.app)
    stages = {s.name: ok for s, ok in zip(request.app[_CASCADE].stages, healthy)}
    ready = all(healthy)
    return web.json_response({"status": "ready" if ready else "not ready", "stages": stages},
                             status=200 if ready else 503)


async def _openapi(request: web.Request) -> web.Response:
    from router.openapi import openapi_document

    app = request.app
    context = min([app[_CASCADE].max_model_len] + [m.max_model_len for m in app[_MEMBERS].values()])
    limit = app[_ACCESS].max_tokens_limit
    max_tokens = max(1, min(context - 1, limit) if limit is not None else context - 1)
    return web.json_response(openapi_document([app[_MODEL], *app[_MEMBERS]], max_tokens,
                                              api_keys=bool(app[_ACCESS].api_keys)))


async def _live(request: web.Request) -> web.Response:
    return web.json_response({"status": "live"})


async def _metrics(request: web.Request) -> web.Response:
    await _stage_health(request.app)
    metrics = request.app[_METRICS]
    return web.Response(body=metrics.exposition(), headers={"content-type": metrics.content_type})
