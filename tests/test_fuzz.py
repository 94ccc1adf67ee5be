"""Bad input, fuzzed (issue 6, item 4). The server publishes its contract at /openapi.json;
hypothesis generates requests valid under the document's request schemas (each must get
200: a catch-all rejection would fail), arbitrary and mutated JSON (4xx, never 5xx), and
hand-written nasties follow (huge headers, invalid UTF-8, deep nesting, NaN and negative
numbers, a 10 MB body, a slow client). The server runs on 127.0.0.1 in a thread of its own;
every request has a timeout, so a hang fails the test. Afterwards it is still healthy."""

from __future__ import annotations

import http.client
import json
import socket
import time

import pytest

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from router.cascade import Cascade, Stage  # noqa: E402
from router.judges import LogprobJudge  # noqa: E402
from router.metrics import RouterMetrics  # noqa: E402
from router.server import make_app  # noqa: E402
from server_thread import ServerThread, record_figure  # noqa: E402
from test_router_front import THRESHOLD, FakeEngine  # noqa: E402

TIMEOUT_S = 10.0
MAX_BODY = 1 << 20
COUNTS = {"valid": 0, "arbitrary": 0, "mutated": 0, "nasty": 0}


@pytest.fixture(scope="module")
def server():
    small = FakeEngine("small", max_model_len=1 << 20)
    large = FakeEngine("large", max_model_len=1 << 20)
    cascade = Cascade([Stage("small", small, THRESHOLD), Stage("large", large, None)], LogprobJudge())
    app = make_app(cascade, model_name="cascade", member_engines={"small": small, "large": large},
                   metrics=RouterMetrics(), max_body_bytes=MAX_BODY)
    s = ServerThread(app).start()
    yield s
    s.stop()


def send(server, path: str, body: bytes | str | None = None, method: str = "POST", headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT_S)
    try:
        data = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
        conn.request(method, path, body=data, headers={"content-type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def openapi(server) -> dict:
    status, raw = send(server, "/openapi.json", method="GET")
    assert status == 200
    return json.loads(raw)


def request_schema(doc: dict, path: str) -> dict:
    return doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]


def assert_ok_or_client_error(status: int, raw: bytes, body: object):
    assert status < 500, (status, raw[:300], repr(body)[:300])
    if status >= 400:
        err = json.loads(raw)["error"]
        assert err["message"] and err["type"], raw[:300]


def test_openapi_document_names_the_models_and_limits(server):
    doc = openapi(server)
    assert doc["openapi"].startswith("3.1")
    chat = request_schema(doc, "/v1/chat/completions")
    assert chat["properties"]["model"]["enum"] == ["cascade", "small", "large"]
    assert chat["properties"]["max_tokens"]["maximum"] == (1 << 20) - 1
    assert set(doc["paths"]) >= {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"}


def from_schema(schema: dict) -> st.SearchStrategy:
    """Values valid under the JSON Schema subset the document uses (object/properties/
    required, enum, const, oneOf, integer and number ranges incl. exclusiveMinimum, boolean,
    string, arrays with item counts). hypothesis-jsonschema would do this, but its releases lag hypothesis's
    internals; this subset is small enough to state here. Optional properties are drawn
    or left out independently."""
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "oneOf" in schema:
        return st.one_of([from_schema(s) for s in schema["oneOf"]])
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        required = set(schema.get("required", ()))
        fixed = {k: from_schema(v) for k, v in props.items() if k in required}
        optional = {k: from_schema(v) for k, v in props.items() if k not in required}
        return st.fixed_dictionaries(fixed, optional=optional)
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {})), min_size=schema.get("minItems", 0),
                        max_size=schema.get("maxItems", 6))
    if kind == "integer":
        return st.integers(schema.get("minimum"), schema.get("maximum"))
    if kind == "number":
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        return st.floats(low, schema.get("maximum"), exclude_min="exclusiveMinimum" in schema, allow_nan=False,
                         allow_infinity=False)
    if kind == "boolean":
        return st.booleans()
    if kind == "string":
        return st.text(max_size=schema.get("maxLength", 40))
    raise ValueError(f"schema outside the supported subset: {schema}")


FUZZ = settings(max_examples=500, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


def _bounded(schema: dict, max_tokens: int = 16) -> dict:
    """Small generated requests (the server's own limits are much larger): max_tokens <= 16."""
    out = json.loads(json.dumps(schema))
    for key in ("max_tokens", "max_completion_tokens"):
        if key in out["properties"]:
            out["properties"][key]["maximum"] = max_tokens
    return out


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_schema_valid_generated_requests_get_200(server, path):
    schema = _bounded(request_schema(openapi(server), path))

    @FUZZ
    @given(from_schema(schema))
    def check(body):
        body = dict(body, stream=False)  # the streamed variant is checked separately below
        raw = json.dumps(body)
        status, out = send(server, path, raw)
        COUNTS["valid"] += 1
        assert status == 200, (status, out[:300], raw[:300])
        answer = json.loads(out)
        assert answer["choices"][0]["finish_reason"] in ("stop", "length")

    check()


def test_schema_valid_streaming_requests_end_with_done(server):
    schema = _bounded(request_schema(openapi(server), "/v1/chat/completions"))

    @settings(max_examples=100, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(from_schema(schema))
    def check(body):
        status, out = send(server, "/v1/chat/completions", json.dumps(dict(body, stream=True)))
        COUNTS["valid"] += 1
        assert status == 200 and out.rstrip().endswith(b"data: [DONE]"), (status, out[-200:])

    check()


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
                    | st.text(max_size=50),
                    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner,
                                                                                max_size=5),
                    max_leaves=30)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_arbitrary_json_is_never_a_server_error(server, path):
    @FUZZ
    @given(JSON)
    def check(value):
        raw = json.dumps(value)  # NaN/Infinity become the non-standard literals Python's json reads
        status, out = send(server, path, raw)
        COUNTS["arbitrary"] += 1
        assert_ok_or_client_error(status, out, value)

    check()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_valid_requests_with_one_field_broken_get_4xx_never_5xx(server, path):
    schema = _bounded(request_schema(openapi(server), path))
    fields = sorted(schema["properties"])

    @FUZZ
    @given(from_schema(schema), st.sampled_from(fields), JSON)
    def check(body, field, junk):
        body = dict(body, stream=False)
        body[field] = junk
        status, out = send(server, path, json.dumps(body))
        COUNTS["mutated"] += 1
        assert_ok_or_client_error(status, out, body)

    check()


def _raw_http(server, payload: bytes, read_timeout_s: float = TIMEOUT_S) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=read_timeout_s) as s:
        s.sendall(payload)
        chunks = []
        try:
            while True:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
        except socket.timeout:
            pass
        return b"".join(chunks)


def _status(raw: bytes) -> int:
    """The status of a raw HTTP/1.x response (aiohttp's parser answers protocol errors
    itself, as HTTP/1.0 plain text, before any handler runs), 0 if there is none."""
    return int(raw.split(b" ", 2)[1]) if raw.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")) else 0


ASK = {"model": "cascade", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.parametrize("name, body, headers, expect", [
    ("invalid utf-8", b'{"model": "cascade", "messages": [{"role": "user", "content": "\xff\xfe"}]}', {}, {400}),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000, {}, {400}),
    ("NaN max_tokens", b'{"model": "cascade", "messages": [{"role": "user", "content": "x"}], "max_tokens": NaN}',
     {}, {400}),
    ("NaN temperature", json.dumps(dict(ASK, temperature=float("nan"))).encode(), {}, {400}),
    ("negative max_tokens", json.dumps(dict(ASK, max_tokens=-5)).encode(), {}, {400}),
    ("huge max_tokens", json.dumps(dict(ASK, max_tokens=10 ** 30)).encode(), {}, {400}),
    ("negative top_p", json.dumps(dict(ASK, top_p=-0.1)).encode(), {}, {400}),
    ("10 MB body", b'{"model": "cascade", "pad": "' + b"x" * (10 << 20) + b'"}', {}, {413}),
    ("empty body", b"", {}, {400}),
    ("not an object", b"[1, 2, 3]", {}, {400}),
    ("lone surrogate escape", b'{"model": "cascade", "messages": [{"role": "user", "content": "\\ud800"}]}', {},
     {200, 400}),
    ("n=2", json.dumps(dict(ASK, n=2)).encode(), {}, {400}),
    ("wrong content type", json.dumps(ASK).encode(), {"content-type": "text/plain"}, {200, 400, 415}),
])
def test_nasty_bodies(server, name, body, headers, expect):
    status, out = send(server, "/v1/chat/completions", body, headers=headers)
    COUNTS["nasty"] += 1
    assert status in expect, (name, status, out[:300])
    if status >= 400:
        assert json.loads(out)["error"]["message"]


def test_huge_headers_and_request_line_get_4xx(server):
    big = b"x" * 100_000
    raw = _raw_http(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + big + b"\r\n\r\n")
    assert 400 <= _status(raw) < 500, raw[:200]
    raw = _raw_http(server, b"GET /" + big + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert 400 <= _status(raw) < 500, raw[:200]
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(10_000))
    raw = _raw_http(server, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + many + b"\r\n")
    assert 400 <= _status(raw) < 500, raw[:200]
    COUNTS["nasty"] += 3


def test_slow_clients_do_not_block_others(server):
    """Ten clients trickle half a request and stall; others are still served at once."""
    stalled = []
    try:
        for _ in range(10):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT_S)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n{\"mo")
            stalled.append(s)
        t0 = time.perf_counter()
        status, out = send(server, "/v1/chat/completions", json.dumps(ASK))
        assert status == 200 and time.perf_counter() - t0 < 5.0
        COUNTS["nasty"] += 10
    finally:
        for s in stalled:
            s.close()


def test_still_healthy_and_enough_requests_were_sent(server):
    """Runs last in this module: the server answers health checks after everything above,
    and the fuzzing sent at least 2,000 generated requests."""
    status, out = send(server, "/health", method="GET")
    assert status == 200 and json.loads(out)["status"] == "ready"
    status, out = send(server, "/v1/chat/completions", json.dumps(ASK))
    assert status == 200
    generated = COUNTS["valid"] + COUNTS["arbitrary"] + COUNTS["mutated"]
    assert generated >= 2000, COUNTS
    record_figure("bad input, fuzzed", generated=generated, **COUNTS, server_errors=0, hangs=0,
                  healthy_after=True)
