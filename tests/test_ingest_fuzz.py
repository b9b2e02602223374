"""Fuzzing the ingest HTTP surface: generated requests against the real function and broker.

The requests come from the published contract: the request bodies, content
types and headers of docs/ingest.openapi.yaml (whose event schemas are
docs/audit-event.schema.json), made by hypothesis-jsonschema, then mutated:
required fields dropped, wrong types, U+0000, lone surrogates, deep nesting,
huge strings and numbers, duplicate keys, odd times, odd header values,
non-UTF-8 bytes, random content types and random bodies. They are sent in
every content mode and on the audit manager's paths. Tokens are on, as
deployed: most requests carry a valid caller's token, and the Authorization
header is fuzzed too (forged tokens, random bytes, other schemes), where
anything but a valid token must be a 401 with WWW-Authenticate.

Every answer must keep the promises of the README and the OpenAPI document:
never a 5xx (the broker is up, so not even a 503), every refusal is a JSON
object with `error` (and `problems` for 400/403/413/415), every 202 lists one id
per event sent. At the end the topic must hold exactly the events answered
202, each as many times as it was accepted: no refused event leaks to Kafka.

Hypothesis runs derandomized and without an example database, so CI sees the
same requests every time.
"""

from __future__ import annotations

import json
import os
import re
import string
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from auth_support import forged
from ingest_support import read_topic, request
from openg2p_audit.devservices import LocalFunction
from openg2p_audit.devservices.issuer import LocalIssuer
from openg2p_audit.kafka_binding import decode_record

DOCS = Path(__file__).parents[1] / "docs"
OPENAPI = yaml.safe_load((DOCS / "ingest.openapi.yaml").read_text())
EVENT_SCHEMA = json.loads((DOCS / "audit-event.schema.json").read_text())

STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
LEGACY, LEGACY_BATCH = "/v1/auditmanager/events", "/v1/auditmanager/events/batch"
REASONS = set(
    OPENAPI["components"]["responses"]["Refused"]["content"]["application/json"]["schema"][
        "properties"
    ]["problems"]["items"]["properties"]["reason"]["enum"]
)

# Small limits make the size cases cheap (as in test_ingest.py).
LIMITS = {
    "ingest_max_event_bytes": 4096,
    "ingest_max_batch_events": 10,
    "ingest_max_batch_bytes": 16384,
    "ingest_max_depth": 8,
    "ingest_max_clock_skew_seconds": 300,
    "retention_months": 12,
    "log_level": "WARNING",
}

FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.large_base_example,
    ],
)


# FUZZ_SCALE=10 runs ten times as many examples (locally, to dig deeper).
SCALE = float(os.environ.get("FUZZ_SCALE", "1"))


def fuzz(examples: int) -> settings:
    return settings(FUZZ, max_examples=max(1, round(examples * SCALE)))


# -- the published documents as strategies -------------------------------------


def _resolve(schema: Any) -> Any:
    """The OpenAPI schema with its references to audit-event.schema.json inlined."""
    if isinstance(schema, list):
        return [_resolve(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    ref = schema.get("$ref")
    if ref is not None and ref.startswith("audit-event.schema.json"):
        _, _, pointer = ref.partition("#")
        target = EVENT_SCHEMA
        for part in [p for p in pointer.split("/") if p]:
            target = target[part]
        resolved = {k: v for k, v in target.items() if k not in ("$schema", "$id")}
        resolved["$defs"] = EVENT_SCHEMA["$defs"]
        return resolved
    return {k: _resolve(v) for k, v in schema.items()}


def _hoist_defs(schema: dict) -> dict:
    """One `$defs` at the root, so every `#/$defs/...` reference resolves from there."""

    def strip(value: Any) -> Any:
        if isinstance(value, list):
            return [strip(v) for v in value]
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k != "$defs"}
        return value

    return {**strip(schema), "$defs": EVENT_SCHEMA["$defs"]}


def _cap(schema: Any) -> Any:
    """Batches of at most three events: generating from the schema is the slow part here,
    and test_batches crosses the limit of 10 events."""
    if isinstance(schema, list):
        return [_cap(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _cap(v) for k, v in schema.items()}
    if out.get("type") == "array" and "maxItems" in out:
        out["maxItems"] = min(out["maxItems"], 3)
    return out


def _operations() -> list[tuple[str, str, dict]]:
    """(path, media type, body schema) for every request body the OpenAPI document names."""
    out = []
    for path, item in OPENAPI["paths"].items():
        body = item.get("post", {}).get("requestBody")
        for media, content in (body or {}).get("content", {}).items():
            out.append((path, media, _hoist_defs(_cap(_resolve(content["schema"])))))
    return out


OPERATIONS = _operations()
BINARY_HEADERS = {
    p["name"]: p["schema"]
    for p in OPENAPI["paths"]["/"]["post"]["parameters"]
    if p["in"] == "header"
}

# Header bytes gunicorn takes (field-vchar, obs-text, space, tab): anything else is refused
# by the HTTP server itself before the function runs, which is not what is fuzzed here.
HEADER_BYTES = bytes([9, 32, *range(0x21, 0x7F), *range(0x80, 0x100)])
header_value = st.binary(max_size=60).map(
    lambda b: bytes(HEADER_BYTES[x % len(HEADER_BYTES)] for x in b).strip(b" \t")
)


def header_bytes(value: str | bytes) -> bytes:
    """`value` as header bytes gunicorn takes: the rest percent-encoded, ends stripped."""
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogatepass")
    allowed = set(HEADER_BYTES)
    out = b"".join(bytes([c]) if c in allowed else b"%%%02X" % c for c in value)
    # gunicorn answers a header line over 8190 bytes itself (431), before the function runs.
    return out[:4000].strip(b" \t")


TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+^_`|~.-]+")
header_token = st.text(
    string.ascii_letters + string.digits + "-_.!#$%&'*+^`|~", min_size=1, max_size=64
)


def now_z(delta: timedelta = timedelta()) -> str:
    return (datetime.now(UTC) + delta).isoformat().replace("+00:00", "Z")


ODD_TIMES = [
    "9999-12-31T23:59:59-23:59",
    "0001-01-01T00:00:00+01:00",
    "0001-01-01T00:00:00Z",
    "9999-12-31T23:59:59Z",
    "2026-02-30T00:00:00Z",
    "2026-13-01T00:00:00Z",
    "2026-01-01T24:00:00Z",
    "2026-01-01T23:59:60Z",
    "2026-01-01T00:00:00+24:00",
    "2026-01-01T00:00:00+99:99",
    "2026-01-01T00:00:00.1234567890Z",
    "2026-01-01t00:00:00z",
    "2026-01-01 00:00:00Z",
    "2026-01-01T00:00:00",
    "",
    "now",
    "\uff11\uff12\uff13\uff14-01-01T00:00:00Z",
    "2026-01-01T00:00:00Z\u0000",
]
times = st.one_of(
    st.sampled_from(ODD_TIMES),
    st.builds(lambda s: now_z(timedelta(seconds=s)), st.integers(-(10**9), 10**9)),
    st.text(max_size=40),
)

# Strings a JSON body can carry; the lone surrogates only through their \\u escape.
LONE_SURROGATES = ["\ud800", "\udfff", "a\udc00b", "\ud83d"]
odd_strings = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        [
            "\u0000",
            "x\u0000y",
            "\u202e\ufeff\u200b",
            "\U0010ffff",
            "😀",
            "é" * 3,
            "%00",
            "%ff%fe",
            "\r\n",
            *LONE_SURROGATES,
        ]
    ),
    st.integers(1, 20000).map(lambda n: "x" * n),
)
odd_json_values = st.one_of(
    odd_strings,
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.builds(list),
    st.builds(dict),
    st.lists(st.integers(), max_size=3),
)


def valid_event() -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": f"fz-{uuid.uuid4()}",
        "source": "/openg2p/fuzz",
        "type": "org.openg2p.fuzz",
        "time": now_z(),
        "data": {"actor": {"id": "officer-7"}, "action": "view", "outcome": "success"},
    }


EVENT = _hoist_defs(_resolve({"$ref": "audit-event.schema.json"}))


@st.composite
def schema_event(draw) -> dict[str, Any]:
    """An event from the published schema; most get a time inside the window and a fresh id."""
    e = draw(from_schema(EVENT))
    if draw(st.integers(0, 9)) < 8:
        e["time"] = now_z(timedelta(seconds=draw(st.integers(-3600, 60))))
    if draw(st.booleans()):
        e["id"] = f"fz-{uuid.uuid4()}"
    return e


def _paths(value: Any, here: tuple = ()) -> list[tuple]:
    out = [here]
    if isinstance(value, dict):
        for k, v in value.items():
            out.extend(_paths(v, (*here, k)))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out.extend(_paths(v, (*here, i)))
    return out


def _nested(levels: int) -> Any:
    value: Any = "leaf"
    for i in range(levels):
        value = {"n": value} if i % 2 else [value]
    return value


# Mostly hand-made valid events: drawing from the schema costs ~0.1 s an event.
QUICK = st.one_of(*[st.builds(valid_event)] * 5, schema_event())
SOME = st.one_of(st.builds(valid_event), st.builds(valid_event), schema_event())


@st.composite
def mutated(draw, event: st.SearchStrategy = None) -> dict[str, Any]:
    """A valid or schema-made event with up to three things done to it."""
    e = draw(SOME if event is None else event)
    for _ in range(draw(st.integers(0, 3))):
        paths = _paths(e)
        path = draw(st.sampled_from(paths[1:] or [("id",)]))
        parent: Any = e
        for part in path[:-1]:
            parent = parent[part]
        last = path[-1]
        kind = draw(
            st.sampled_from(
                ["drop", "value", "time", "nest", "huge", "key", "required", "extension"]
            )
        )
        if kind == "drop" and isinstance(parent, dict):
            parent.pop(last, None)
        elif kind == "required":
            field = draw(st.sampled_from(["id", "specversion", "source", "type", "data", "time"]))
            e.pop(field, None)
        elif kind == "time":
            e["time"] = draw(times)
        elif kind == "nest":
            if isinstance(parent, dict | list):
                parent[last] = _nested(draw(st.integers(1, 40)))
        elif kind == "huge" and isinstance(parent, dict | list):
            parent[last] = "h" * draw(st.sampled_from([1000, 4000, 5000, 20000]))
        elif kind == "key" and isinstance(parent, dict):
            parent[draw(odd_strings)] = draw(odd_json_values)
        elif kind == "extension":
            e[draw(st.text(string.ascii_lowercase + "_-" + string.digits, min_size=1))] = draw(
                odd_json_values
            )
        elif isinstance(parent, dict | list):
            parent[last] = draw(odd_json_values)
    return e


@st.composite
def encoded(draw, value: Any) -> bytes:
    """JSON bytes of `value`, sometimes spelled oddly: duplicate keys, 1e400, NaN, bad bytes."""
    text = json.dumps(value, ensure_ascii=draw(st.booleans()))
    if not isinstance(value, dict | list) or not value:
        raw = text.encode("utf-8", "surrogatepass")
    else:
        raw = text.encode("utf-8", "surrogatepass")
        trick = draw(st.integers(0, 12))
        if trick == 0 and raw.startswith(b"{"):
            raw = b'{"id": "dup-1", "id": "dup-2", ' + raw[1:]
        elif trick == 1 and raw.startswith(b"{"):
            raw = b'{"n": 1e400, ' + raw[1:]
        elif trick == 2 and raw.startswith(b"{"):
            raw = b'{"n": NaN, "m": -Infinity, ' + raw[1:]
        elif trick == 3:
            at = draw(st.integers(0, len(raw)))
            raw = raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3(", b"\xed\xa0\x80", b"\x00"]))
            raw += raw[at:]
        elif trick == 4:
            raw = raw[: draw(st.integers(0, max(0, len(raw) - 1)))]
        elif trick == 5:
            raw = text.encode("utf-16", "surrogatepass")
        elif trick == 6 and raw.startswith(b"{"):
            raw = b'{"s": "\\ud800", ' + raw[1:]
    return raw


# -- the function under test, and what every answer must look like ---------------


class Ledger:
    """Every id answered 202, and how many requests of each kind were sent."""

    def __init__(self) -> None:
        self.accepted: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()


@pytest.fixture(scope="module")
def ledger() -> Ledger:
    return Ledger()


# The fuzzing caller may use any source: what is fuzzed here is the surface, and the
# source policy has its own tests (test_ingest_auth).
POLICY = 'callers:\n  fuzzer:\n    sources: ["*"]\n'
ISSUER = LocalIssuer()
GOOD = {"Authorization": ""}  # filled in once the issuer serves its JWKS
FORGED_TOKENS: dict[str, str] = {}  # likewise


@pytest.fixture(scope="module")
def issuer():
    ISSUER.serve()
    GOOD["Authorization"] = f"Bearer {ISSUER.mint('fuzzer', ())}"
    FORGED_TOKENS.update(forged(ISSUER))
    yield ISSUER
    ISSUER.stop()


@pytest.fixture(scope="module")
def fn(topics, tmp_path_factory, ledger, issuer):
    update = {
        **LIMITS, "ingest_auth": "required", "ingest_source_policy": POLICY,
        "auth_issuer": issuer.url, "auth_jwks_url": issuer.jwks_url,
    }  # fmt: skip
    server = LocalFunction(
        "ingest", "ingest", topics.model_copy(update=update), tmp_path_factory.mktemp("fuzz")
    )
    server.start()
    started = time.monotonic()
    yield server
    server.stop()
    print(
        f"\nfuzzed ingest: {sum(ledger.sent.values())} requests in "
        f"{time.monotonic() - started:.0f}s {dict(ledger.sent)}; statuses "
        f"{dict(sorted(ledger.statuses.items()))}; {sum(ledger.accepted.values())} events accepted"
    )


def send(fn, ledger: Ledger, kind: str, path: str, body: bytes, headers: dict, events=None):
    """POST and check the answer against the published promises; returns the reply."""
    ledger.sent[kind] += 1
    headers = {**GOOD, **headers}  # a caller's valid token unless the test sends another
    if headers["Authorization"] is None:
        del headers["Authorization"]
    authorised = headers.get("Authorization") == GOOD["Authorization"]
    try:
        method = headers.pop(":method", "POST")
        reply = request(fn.url, path, body, headers, method=method)
    except (BrokenPipeError, ConnectionResetError):
        # A 413 closes the connection without reading the rest of an oversized body.
        assert len(body) > LIMITS["ingest_max_event_bytes"], "connection dropped"
        ledger.statuses[413] += 1
        return None
    ledger.statuses[reply.status] += 1
    if reply.status == 200 and method == "GET":
        assert path in ("/healthz", "/readyz", "/metrics"), path
        return reply
    where = f"{kind} {path} {headers!r} {body[:300]!r}"
    assert reply.status < 500, f"{reply.status} {reply.body[:500]!r} for {where}"
    posted = method == "POST" and path.rstrip("/") in ("", LEGACY, LEGACY_BATCH)
    if posted and not authorised:
        assert reply.status == 401, f"{reply.status} without a valid token: {where}"
        assert reply.headers["www-authenticate"].startswith('Bearer realm="openg2p-audit"')
        assert reply.json == {
            "error": "unauthorized",
            "message": "a valid bearer token is required",
        }
        return reply
    if reply.status == 202:
        assert reply.headers["content-type"] == "application/json", where
        answer = reply.json
        assert set(answer) == {"accepted"}, where
        ids = answer["accepted"]
        assert isinstance(ids, list) and all(isinstance(i, str) and i for i in ids), where
        if events is not None:
            assert len(ids) == events, where
        ledger.accepted.update(ids)
        return reply
    assert 400 <= reply.status < 500, f"{reply.status} for {where}"
    assert reply.headers.get("content-type") == "application/json", f"{reply.headers} {where}"
    answer = json.loads(reply.body.decode("utf-8"))
    assert isinstance(answer, dict) and isinstance(answer.get("error"), str), where
    assert reply.status not in (401, 403), f"{reply.status} for a valid caller: {where}"
    if reply.status in (400, 413, 415):
        problems = answer["problems"]
        assert isinstance(problems, list) and problems, where
        for p in problems:
            assert p["reason"] in REASONS and isinstance(p["message"], str), where
            assert isinstance(p.get("index", 0), int), where
            assert isinstance(p.get("field", ""), str), where
        if reply.status == 415:
            assert {p["reason"] for p in problems} == {"unsupported_media_type"}, where
    return reply


# -- strategy 1: the OpenAPI document's request bodies, content types and headers --


@fuzz(350)
@given(data=st.data())
def test_openapi_request_bodies(fn, ledger, data):
    path, media, schema = data.draw(st.sampled_from(OPERATIONS), label="operation")
    body = data.draw(from_schema(schema), label="body")
    # Random times almost never fall inside the accepted window: most get a current one.
    events = body if isinstance(body, list) else body.get("events", [body])
    if path != "/" or media != "application/json":
        for e in events:
            if data.draw(st.integers(0, 4)) and isinstance(e, dict):
                e["time"] = now_z()
                e["id"] = f"oa-{uuid.uuid4()}"
    headers = {"Content-Type": media}
    if path == "/" and media == "application/json":
        for name, param in BINARY_HEADERS.items():
            if name in ("ce-specversion", "ce-id", "ce-source", "ce-type") or data.draw(
                st.booleans()
            ):
                value = data.draw(from_schema(param), label=name)
                if name == "ce-time" and data.draw(st.integers(0, 3)):
                    value = now_z()
                if name == "ce-id":
                    value = f"oa-{uuid.uuid4()}"
                headers[name] = header_bytes(value)
    count = len(events) if media != "application/json" or path != "/" else 1
    send(fn, ledger, "openapi", path, json.dumps(body).encode(), headers, events=count)


# -- strategy 2: events from the schema, mutated, in every content mode --------------


@fuzz(700)
@given(event=mutated(), data=st.data())
def test_structured_and_legacy_single(fn, ledger, event, data):
    path, media = data.draw(
        st.sampled_from([("/", STRUCTURED), (LEGACY, "application/json"), (LEGACY, STRUCTURED)])
    )
    body = data.draw(encoded(event))
    send(fn, ledger, "single", path, body, {"Content-Type": media}, events=1)


@fuzz(400)
@given(events=st.lists(mutated(QUICK), min_size=0, max_size=12), data=st.data())
def test_batches(fn, ledger, events, data):
    shape = data.draw(st.sampled_from(["array", "legacy", "object", "scalar", "not events"]))
    if shape == "array":
        path, value = "/", events
    elif shape == "legacy":
        path, value = LEGACY_BATCH, {"events": events}
    elif shape == "object":
        path, value = "/", (events[0] if events else {})
    elif shape == "scalar":
        path, value = data.draw(st.sampled_from(["/", LEGACY_BATCH])), data.draw(odd_json_values)
    else:
        path, value = LEGACY_BATCH, {"events": data.draw(odd_json_values)}
    media = BATCH if path == "/" else data.draw(st.sampled_from(["application/json", STRUCTURED]))
    body = data.draw(encoded(value))
    send(fn, ledger, "batch", path, body, {"Content-Type": media}, events=len(events) or None)


@st.composite
def binary_request(draw) -> tuple[dict, bytes]:
    e = draw(mutated())
    headers: dict[str, Any] = {}
    for name, value in e.items():
        if name == "data" or not TOKEN.fullmatch(name) or len(name) > 64:
            continue  # not sendable as a header name
        headers[f"ce-{name}"] = header_bytes(value if isinstance(value, str) else json.dumps(value))
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(["ce-", "Ce-", "CE-"])) + draw(header_token)
        headers[name] = draw(header_value)
    if draw(st.booleans()):
        pick = draw(st.sampled_from(sorted(headers) or ["ce-id"]))
        headers[pick] = draw(header_value)
    media = draw(
        st.sampled_from(
            [
                "application/json",
                "application/json; charset=utf-8",
                "application/vnd.openg2p+json",
                "APPLICATION/JSON",
                "text/plain",
                "application/octet-stream",
                None,
            ]
        )
    )
    if media is not None:
        headers["Content-Type"] = media
    if draw(st.integers(0, 5)) == 0:
        headers["traceparent"] = draw(header_value)
    if "data" in e:
        body = draw(encoded(e["data"]))
    else:
        body = draw(st.sampled_from([b"", b"null", b"{}", b"[]"]))
    return headers, body


@fuzz(700)
@given(req=binary_request())
def test_binary_mode(fn, ledger, req):
    headers, body = req
    send(fn, ledger, "binary", "/", body, headers, events=1)


# -- strategy 3: random content types, bodies, paths and methods ----------------------

media_types = st.one_of(
    st.sampled_from(
        [
            STRUCTURED,
            BATCH,
            "application/json",
            f"{STRUCTURED}; charset=latin-1",
            f"{BATCH};;;",
            "application/cloudevents",
            "multipart/form-data; boundary=x",
            "application/x-www-form-urlencoded",
            "*/*",
            "",
        ]
    ),
    st.builds(lambda a, b: f"{a}/{b}", header_token, header_token),
    header_value.map(lambda b: b.decode("latin-1")),
)


@fuzz(950)
@given(
    path=st.sampled_from(["/", LEGACY, LEGACY_BATCH, "/healthz", "/v2/x", "//", "/%00", "/%C3%A9"]),
    method=st.sampled_from(["POST", "POST", "POST", "PUT", "PATCH", "DELETE", "GET"]),
    media=media_types,
    body=st.one_of(
        st.binary(max_size=2000),
        st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
        st.sampled_from([b"", b"{}", b"[]", b"[{}]", b"null", b'{"events": {}}', b"[" * 5000]),
    ),
    ce=st.booleans(),
    auth=st.one_of(st.none(), st.just("good"), st.just("good"), st.just("good")),
)
def test_random_requests(fn, ledger, path, method, media, body, ce, auth):
    headers: dict[str, Any] = {":method": method}
    if auth is None:
        headers["Authorization"] = None
    if media:
        headers["Content-Type"] = media.encode("latin-1")
    if ce:
        headers["ce-id"] = b"raw-1"
    reply = send(fn, ledger, "random", path, body, headers)
    if reply is not None and path.rstrip("/") in ("", LEGACY, LEGACY_BATCH):
        assert reply.status != 202 or body.strip().startswith((b"{", b"[")), body[:200]


# -- strategy 4: the Authorization header --------------------------------------------

FORGED = sorted(forged(LocalIssuer("http://127.0.0.1:9/issuer")))  # the names only


@st.composite
def authorization(draw) -> bytes | None:
    """Anything but the caller's valid token: forged tokens, mangled ones, other schemes."""
    kind = draw(st.sampled_from(["forged", "mangled", "scheme", "random", "missing", "dup"]))
    good = GOOD["Authorization"].removeprefix("Bearer ")
    if kind == "forged":
        return f"Bearer {FORGED_TOKENS[draw(st.sampled_from(FORGED))]}".encode()
    if kind == "mangled":
        # Not the last character of a segment: base64url's final character carries unused
        # bits, so changing it may leave the decoded bytes (and the signature) intact.
        inner = [j for j in range(len(good) - 1) if good[j + 1] != "." and good[j] != "."]
        i = draw(st.sampled_from(inner))
        swap = draw(st.sampled_from("AZaz09-_."))
        mangled = good[:i] + (swap if good[i] != swap else "Q") + good[i + 1 :]
        return f"Bearer {mangled}".encode()
    if kind == "scheme":
        scheme = draw(st.sampled_from(["Basic", "Token", "JWT", "Bearer:", "", "Bearer\t"]))
        return f"{scheme} {good}".encode()
    if kind == "random":
        return b"Bearer " + draw(header_value)
    if kind == "dup":
        return f"Bearer {good} {good}".encode()
    return None


@fuzz(300)
@given(auth=authorization(), event=mutated(QUICK), data=st.data())
def test_authorization_header(fn, ledger, auth, event, data):
    path, media = data.draw(
        st.sampled_from([("/", STRUCTURED), (LEGACY, "application/json"), ("/", BATCH)])
    )
    value = [event] if media == BATCH else event
    body = data.draw(encoded(value))
    send(fn, ledger, "auth", path, body, {"Content-Type": media, "Authorization": auth})


# -- nothing refused reached the topic ----------------------------------------------


def test_topic_holds_exactly_the_accepted_events(fn, topics, ledger):
    """Runs last in this module: every record is an accepted id, as often as it was accepted."""
    assert sum(ledger.sent.values()) >= 3000 * min(SCALE, 1), dict(ledger.sent)
    assert ledger.accepted, "no request was accepted: the generators are too wild"
    records = read_topic(topics.kafka_bootstrap_servers, topics.kafka_events_topic)
    # Values travel percent-encoded (kafka_binding); every reader decodes them.
    on_topic = Counter(decode_record(r.headers)["id"] for r in records)
    assert on_topic == ledger.accepted
