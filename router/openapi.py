"""The server's OpenAPI 3.1 document (``GET /openapi.json``), built from what
router/openai_schema.py accepts, so clients, gateways and fuzzers (schemathesis,
hypothesis-jsonschema) see the real contract: the served model names, the numeric ranges
and the largest ``max_tokens`` a request may ask for.

A request valid under this document can still be refused when its prompt and
``max_tokens`` together exceed the model's context (a token count no JSON Schema can
state); that answer is a 400 ``context_length_exceeded``.
"""

from __future__ import annotations

from typing import Sequence

from router.openai_schema import ROLES

OPENAPI_VERSION = "3.1.0"


def _text_part() -> dict:
    return {"type": "object", "required": ["type", "text"],
            "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}


def _common_properties(models: Sequence[str], max_tokens_max: int) -> dict:
    return {
        "model": {"type": "string", "enum": list(models),
                  "description": "the cascade's name, or one member model's name (served directly)"},
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": max_tokens_max},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "stop": {"oneOf": [{"type": "string"},
                           {"type": "array", "items": {"type": "string"}, "maxItems": 4}]},
        "seed": {"type": "integer"},
        "n": {"const": 1, "description": "one answer per request"},
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
        "ignore_eos": {"type": "boolean", "description": "vLLM's extension: generate exactly max_tokens"},
        "cascade": {"type": "object", "description": "Cascadia's options",
                    "properties": {"escalate": {"type": "boolean",
                                                "description": "false: stage 1 answers, streamed at once"},
                                   "judge_answer": {"type": "boolean",
                                                    "description": "also return the judge's score of the answer"}}},
    }


def chat_request_schema(models: Sequence[str], max_tokens_max: int) -> dict:
    props = _common_properties(models, max_tokens_max)
    props["max_completion_tokens"] = dict(props["max_tokens"])
    props["logprobs"] = {"type": "boolean"}
    props["messages"] = {
        "type": "array", "minItems": 1,
        "items": {"type": "object", "required": ["role", "content"],
                  "properties": {"role": {"type": "string", "enum": list(ROLES)},
                                 "content": {"oneOf": [{"type": "string"},
                                                       {"type": "array", "items": _text_part()}]}}}}
    return {"type": "object", "required": ["model", "messages"], "properties": props}


def completion_request_schema(models: Sequence[str], max_tokens_max: int) -> dict:
    props = _common_properties(models, max_tokens_max)
    props["logprobs"] = {"type": "integer", "minimum": 0, "maximum": 1}
    props["prompt"] = {"oneOf": [{"type": "string"},
                                 {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1}]}
    return {"type": "object", "required": ["model", "prompt"], "properties": props}


def _error_response(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def openapi_document(models: Sequence[str], max_tokens_max: int, *, api_keys: bool = False) -> dict:
    """The document for a server serving ``models`` (cascade first) whose requests may ask
    for at most ``max_tokens_max`` tokens."""
    errors = {"400": _error_response("invalid request (the message names the field)"),
              "404": _error_response("unknown model"), "413": _error_response("body over the size limit"),
              "429": _error_response("the stage's queue is full; see Retry-After"),
              "503": _error_response("engine failure or shutting down")}
    if api_keys:
        errors["401"] = _error_response("missing or invalid API key")

    def post(summary: str, schema: dict) -> dict:
        return {"post": {"summary": summary,
                         "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
                         "responses": {"200": {"description": "the answer (JSON, or SSE when stream is true)"},
                                       **errors}}}

    def get(summary: str, codes: Sequence[str] = ("200",)) -> dict:
        return {"get": {"summary": summary, "responses": {c: {"description": summary} for c in codes}}}

    doc = {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "Cascadia", "version": "1",
                 "description": "OpenAI-compatible endpoint in front of an LLM cascade"},
        "paths": {
            "/v1/chat/completions": post("chat completion through the cascade",
                                         chat_request_schema(models, max_tokens_max)),
            "/v1/completions": post("text completion through the cascade",
                                    completion_request_schema(models, max_tokens_max)),
            "/v1/models": get("the cascade and its member models"),
            "/health": get("ready: every stage has a healthy replica", ("200", "503")),
            "/health/ready": get("ready: every stage has a healthy replica", ("200", "503")),
            "/health/live": get("the process answers"),
            "/metrics": get("Prometheus metrics"),
            "/openapi.json": get("this document"),
        },
        "components": {"schemas": {"Error": {
            "type": "object", "required": ["error"],
            "properties": {"error": {"type": "object", "required": ["message", "type"],
                                     "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                                                    "param": {"type": ["string", "null"]},
                                                    "code": {"type": ["string", "null"]}}}}}}},
    }
    if api_keys:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc
