"""The ingest function over real HTTP, producing to the real broker.

Each accepted request is checked on the topic (key, ce_* headers,
content-type, value); each refused one by its status, its error body, and
the topic's end offsets not moving.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cloudevents.conversion import to_binary, to_structured
from cloudevents.http import CloudEvent

from ingest_support import end_offsets, read_topic
from ingest_support import request as _request
from openg2p_audit import kafka_binding
from openg2p_audit.devservices import LocalFunction
from openg2p_audit.devservices.issuer import LocalIssuer
from openg2p_audit.http_binding import header_value

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
STRUCTURED = {"Content-Type": "application/cloudevents+json"}
BATCH = {"Content-Type": "application/cloudevents-batch+json"}
JSON = {"Content-Type": "application/json"}

# Small limits keep the size cases cheap; the defaults are checked in test_settings.
LIMITS = {
    "ingest_max_event_bytes": 4096,
    "ingest_max_batch_events": 10,
    "ingest_max_batch_bytes": 16384,
    "ingest_max_depth": 8,
    "ingest_max_clock_skew_seconds": 300,
    "retention_months": 12,
    "log_level": "DEBUG",  # one line per accepted request, to check its trace id
}


def now_z(delta: timedelta = timedelta()) -> str:
    return (datetime.now(UTC) + delta).isoformat().replace("+00:00", "Z")


def data(**over):
    base = {"actor": {"id": "officer-7"}, "action": "view", "outcome": "success"}
    base.update(over)
    return base


def event(**over):
    base = {
        "specversion": "1.0",
        "id": f"evt-{uuid.uuid4()}",
        "source": "/openg2p/registry",
        "type": "org.openg2p.registry.beneficiary.viewed",
        "time": now_z(),
        "data": data(),
    }
    base.update(over)
    return base


# Tokens on, as deployed: every POST of this module comes from one caller the policy lets
# use any source (who may use which source is test_ingest_auth's subject).
ISSUER = LocalIssuer()
POLICY = 'callers:\n  ingest-tests:\n    sources: ["*"]\n'
TOKEN: dict[str, str] = {}


def request(url, path, body=None, headers=None, method="POST", **kw):
    """A POST carries the module's caller token (unless the test sends its own)."""
    if method == "POST" and TOKEN:
        headers = {"Authorization": f"Bearer {TOKEN['value']}", **(headers or {})}
    return _request(url, path, body, headers, method=method, **kw)


@pytest.fixture(scope="module")
def fn(topics, tmp_path_factory):
    ISSUER.serve()
    TOKEN["value"] = ISSUER.mint("ingest-tests", ())
    settings = topics.model_copy(
        update={
            **LIMITS, "ingest_auth": "required", "ingest_source_policy": POLICY,
            "auth_issuer": ISSUER.url, "auth_jwks_url": ISSUER.jwks_url,
        }
    )  # fmt: skip
    server = LocalFunction("ingest", "ingest", settings, tmp_path_factory.mktemp("ingest"))
    server.start()
    yield server
    server.stop()
    TOKEN.clear()
    ISSUER.stop()


@pytest.fixture(scope="module")
def bootstrap(topics):
    return topics.kafka_bootstrap_servers


@pytest.fixture
def landed(fn, topics, bootstrap):
    """Call it after a request: the records it put on the topic, by ce_id."""
    before = end_offsets(bootstrap, topics.kafka_events_topic)

    def read():
        records = read_topic(bootstrap, topics.kafka_events_topic, since=before)
        return {dict(r.headers)["ce_id"].decode(): r for r in records}

    return read


def headers_of(record) -> dict[str, str]:
    """A record's headers, attribute values decoded as every reader of the topic decodes them
    (ingest writes them percent-encoded, kafka_binding)."""
    return {
        k: header_value(v.decode()) if k.startswith("ce_") else v.decode()
        for k, v in record.headers
    }


# -- every content mode ------------------------------------------------------


def test_binary_mode_from_the_cloudevents_sdk(fn, landed):
    ce = CloudEvent(
        {
            "id": "bin-1",
            "source": "/openg2p/registry",
            "type": "org.openg2p.registry.beneficiary.updated",
            "subject": "beneficiary/ben-9",
            "traceparent": TRACEPARENT,
            "tenant": "moz",
        },
        data(
            action="update",
            resource={"type": "beneficiary", "id": "ben-9", "program_id": "p-1"},
            changes=[{"field": "phone", "old": "+2581", "new": "+2582"}],
        ),
    )
    headers, body = to_binary(ce)
    reply = request(fn.url, "/", body, headers)
    assert reply.status == 202, reply.body
    assert reply.json == {"accepted": ["bin-1"]}

    record = landed()["bin-1"]
    assert record.key == b"beneficiary/ben-9"
    h = headers_of(record)
    assert h["content-type"] == "application/json"
    assert h["ce_specversion"] == "1.0"
    assert h["ce_source"] == "/openg2p/registry"
    assert h["ce_type"] == "org.openg2p.registry.beneficiary.updated"
    assert h["ce_subject"] == "beneficiary/ben-9"
    assert h["ce_traceparent"] == TRACEPARENT
    assert h["ce_tenant"] == "moz"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", h["ce_time"])
    value = json.loads(record.value)
    assert value["actor"] == {"type": "user", "id": "officer-7"}
    assert value["changes"] == [{"field": "phone", "old": "+2581", "new": "+2582"}]
    assert value["resource"]["program_id"] == "p-1"
    back = kafka_binding.decode(record.headers, record.key, record.value)
    assert back.trace_id == TRACE_ID
    # the emitter's extension, and ingest's authcontext for the caller
    assert back.extensions == {
        "tenant": "moz", "authtype": "user", "authid": "ingest-tests",
        "authclaims": json.dumps({"iss": ISSUER.url}, separators=(",", ":")),
    }  # fmt: skip


def test_binary_mode_as_a_knative_broker_trigger_delivers_it(fn, landed):
    # Header spelling, the arrival-time extension and the tracing header as
    # the broker's dispatcher sends them; no subject, so the actor is the key.
    headers = {
        "Ce-Id": "knative-1",
        "Ce-Source": "/openg2p/caf%C3%A9",
        "Ce-Specversion": "1.0",
        "Ce-Type": "org.openg2p.auth.login.succeeded",
        "Ce-Time": "2026-01-05T10:00:00.123Z",
        "Ce-Knativearrivaltime": "2026-01-05T10:00:00.200Z",
        "Traceparent": TRACEPARENT,
        "Content-Type": "application/json",
        "Prefer": "reply",
    }
    body = data(actor={"id": "user-42", "session_id": "s-1"}, action="login")
    fresh = {**headers, "Ce-Time": now_z()}
    reply = request(fn.url, "/", body, fresh)
    assert reply.status == 202, reply.body

    record = landed()["knative-1"]
    assert record.key == b"user-42"
    h = headers_of(record)
    assert h["ce_source"] == "/openg2p/café"
    assert h["ce_knativearrivaltime"] == "2026-01-05T10:00:00.200Z"
    assert "ce_subject" not in h
    assert json.loads(record.value)["actor"] == {
        "type": "user",
        "id": "user-42",
        "session_id": "s-1",
    }


def test_time_defaults_to_now(fn, landed):
    before = datetime.now(UTC)
    headers = {"ce-specversion": "1.0", "ce-id": "no-time-1", "ce-source": "/s", "ce-type": "t"}
    reply = request(fn.url, "/", data(), {**headers, "Content-Type": "application/json"})
    assert reply.status == 202, reply.body
    stored = headers_of(landed()["no-time-1"])["ce_time"]
    moment = datetime.fromisoformat(stored.replace("Z", "+00:00"))
    assert before - timedelta(seconds=1) <= moment <= datetime.now(UTC)


def test_structured_mode_from_the_cloudevents_sdk(fn, landed):
    ce = CloudEvent(
        {
            "id": "str-1",
            "source": "/openg2p/payments",
            "type": "org.openg2p.payment.approved",
            "subject": "payment/pay-1",
        },
        data(
            actor={"id": "finance-2", "roles": ["approver"]},
            action="approve",
            resource={"type": "payment", "id": "pay-1", "amount": "1500.00", "currency": "MZN"},
        ),
    )
    headers, body = to_structured(ce)
    reply = request(fn.url, "/", body, headers)
    assert reply.status == 202, reply.body
    assert reply.json == {"accepted": ["str-1"]}
    record = landed()["str-1"]
    assert record.key == b"payment/pay-1"
    assert headers_of(record)["ce_type"] == "org.openg2p.payment.approved"
    assert json.loads(record.value)["resource"] == {
        "type": "payment",
        "id": "pay-1",
        "amount": "1500.00",
        "currency": "MZN",
    }


def test_batched_mode_produces_every_event_with_its_own_key(fn, landed):
    events = [event(subject=f"beneficiary/b-{i}") for i in range(5)]
    events[2].pop("subject")
    reply = request(fn.url, "/", events, BATCH)
    assert reply.status == 202, reply.body
    assert reply.json == {"accepted": [e["id"] for e in events]}
    records = landed()
    assert set(records) == {e["id"] for e in events}
    assert records[events[0]["id"]].key == b"beneficiary/b-0"
    assert records[events[2]["id"]].key == b"officer-7"
    for e in events:
        assert json.loads(records[e["id"]].value)["action"] == "view"


def test_structured_time_with_an_offset_is_stored_in_utc(fn, landed):
    local = datetime.now(UTC).astimezone(__import__("datetime").timezone(timedelta(hours=2)))
    e = event(time=local.isoformat())
    assert request(fn.url, "/", e, STRUCTURED).status == 202
    stored = headers_of(landed()[e["id"]])["ce_time"]
    assert stored.endswith("Z")
    assert datetime.fromisoformat(stored.replace("Z", "+00:00")) == local


@pytest.mark.parametrize(
    "path",
    sorted((Path(__file__).parents[1] / "docs" / "examples").glob("*.json")),
    ids=lambda p: p.stem,
)
def test_published_examples_are_accepted(path, fn, landed):
    e = json.loads(path.read_text())
    e["time"] = now_z()  # inside the accepted window whenever the suite runs
    reply = request(fn.url, "/", e, STRUCTURED)
    assert reply.status == 202, reply.body
    record = landed()[e["id"]]
    assert record.key == (e.get("subject") or e["data"]["actor"]["id"]).encode()
    assert json.loads(record.value)["action"] == e["data"]["action"]


# -- the audit manager's paths -----------------------------------------------


def test_legacy_single_event_gets_an_id_when_it_has_none(fn, landed):
    e = event()
    del e["id"], e["specversion"]
    reply = request(fn.url, "/v1/auditmanager/events", e, JSON)
    assert reply.status == 202, reply.body
    (new_id,) = reply.json["accepted"]
    uuid.UUID(new_id)
    record = landed()[new_id]
    assert headers_of(record)["ce_specversion"] == "1.0"
    assert record.key == b"officer-7"


def test_legacy_single_event_keeps_its_own_id(fn, landed):
    e = event(subject="beneficiary/b-77")
    reply = request(fn.url, "/v1/auditmanager/events", e, JSON)
    assert reply.status == 202 and reply.json == {"accepted": [e["id"]]}
    assert landed()[e["id"]].key == b"beneficiary/b-77"


def test_legacy_batch(fn, landed):
    events = [event(), event(), event()]
    del events[1]["id"]
    reply = request(fn.url, "/v1/auditmanager/events/batch", {"events": events}, JSON)
    assert reply.status == 202, reply.body
    ids = reply.json["accepted"]
    assert len(ids) == 3 and ids[0] == events[0]["id"] and ids[2] == events[2]["id"]
    assert set(landed()) == set(ids)


# -- bad input: a clear 4xx, nothing produced --------------------------------


def nested(levels: int):
    value: dict = {}
    for _ in range(levels):
        value = {"x": value}
    return value


def binary_headers(**over):
    h = {
        "ce-specversion": "1.0",
        "ce-id": f"bin-{uuid.uuid4()}",
        "ce-source": "/s",
        "ce-type": "t",
        "Content-Type": "application/json",
    }
    h.update(over)
    return {k: v for k, v in h.items() if v is not None}


LEGACY, LEGACY_BATCH = "/v1/auditmanager/events", "/v1/auditmanager/events/batch"
MEDIA = "unsupported_media_type"


def P(reason, field=None, index=None):
    return (index, reason, field)


# name: (path, headers, body (or a function making it), status, [expected problems])
BAD = {
    "invalid json, structured": ("/", STRUCTURED, b'{"id": ', 400, [P("invalid_json")]),
    "invalid json, binary": ("/", binary_headers(), b"{oops", 400, [P("invalid_json")]),
    "invalid json, batch": ("/", BATCH, b"[{}, ", 400, [P("invalid_json")]),
    "invalid json, legacy": (LEGACY, JSON, b"\xff\xfe", 400, [P("invalid_json")]),
    "invalid utf-8 in json": ("/", STRUCTURED, b'{"id": "\xc3("}', 400, [P("invalid_json")]),
    "id missing, structured": (
        "/", STRUCTURED, lambda: {k: v for k, v in event().items() if k != "id"}, 400,
        [P("schema", "id")],
    ),
    "id missing, binary": (
        "/", binary_headers(**{"ce-id": None}), data(), 400, [P("schema", "id")],
    ),
    "specversion 0.3": (
        "/", STRUCTURED, lambda: event(specversion="0.3"), 400, [P("schema", "specversion")],
    ),
    "source and type missing, binary": (
        "/", binary_headers(**{"ce-source": None, "ce-type": None}), data(), 400,
        [P("schema", "source"), P("schema", "type")],
    ),
    "outcome unknown and actor missing": (
        "/", STRUCTURED, lambda: event(data={"action": "view", "outcome": "maybe"}), 400,
        [P("schema", "data.actor"), P("schema", "data.outcome")],
    ),
    "actor type unknown": (
        "/", STRUCTURED, lambda: event(data=data(actor={"id": "u", "type": "robot"})), 400,
        [P("schema", "data.actor.type")],
    ),
    "time not rfc 3339": (
        "/", STRUCTURED, lambda: event(time="5 May 2026"), 400, [P("schema", "time")],
    ),
    "traceparent malformed": (
        "/", STRUCTURED, lambda: event(traceparent="00-abc-01"), 400,
        [P("schema", "traceparent")],
    ),
    "data not json": (
        "/", binary_headers(**{"Content-Type": "text/plain"}), b"hello", 415, [P(MEDIA)],
    ),
    "nul in a string": (
        "/", STRUCTURED, lambda: event(data=data(reason="bad\u0000byte")), 400,
        [P("nul", "data.reason")],
    ),
    "nul in a binary-mode body": (
        "/", binary_headers(), lambda: data(context={"note": "x\u0000"}), 400,
        [P("nul", "data.context.note")],
    ),
    "time too old": (
        "/", STRUCTURED, lambda: event(time=now_z(-timedelta(days=400))), 400,
        [P("time_window", "time")],
    ),
    "time in the future": (
        "/", STRUCTURED, lambda: event(time=now_z(timedelta(hours=1))), 400,
        [P("time_window", "time")],
    ),
    # A lone surrogate escape is not Unicode text: it could be neither produced nor stored.
    "lone surrogate escape": (
        "/", STRUCTURED, lambda: json.dumps(event(data=data(reason="\ud800"))), 400,
        [P("invalid_json")],
    ),
    "lone surrogate escape in a key, binary": (
        "/", binary_headers(), b'{"actor": {"id": "u"}, "action": "a", "outcome": "success",'
        b' "\\udc00": 1}', 400, [P("invalid_json")],
    ),
    "lone surrogate escape in a batch": (
        LEGACY_BATCH, JSON, lambda: json.dumps({"events": [event(), event(subject="\udfff")]}),
        400, [P("invalid_json")],
    ),
    # Only UTF-8 is JSON here; in UTF-16 the escape of U+0000 would go unseen.
    "utf-16 body": (
        "/", STRUCTURED, lambda: json.dumps(event(data=data(reason="\u0000"))).encode("utf-16"),
        400, [P("invalid_json")],
    ),
    # Python's json takes these, but they would be stored as null.
    "NaN is not json": (
        "/", STRUCTURED, lambda: json.dumps(event(data=data(context={"score": float("nan")}))),
        400, [P("invalid_json")],
    ),
    "number out of range, binary": (
        "/", binary_headers(), b'{"actor": {"id": "u"}, "action": "a", "outcome": "success",'
        b' "amount": -1e400}', 400, [P("invalid_json")],
    ),
    # Parses as a valid time, but its UTC instant is past year 9999.
    "time beyond year 9999 in utc": (
        "/", STRUCTURED, lambda: event(time="9999-12-31T23:59:59-23:59"), 400,
        [P("schema", "time")],
    ),
    "time before year 1 in utc, binary": (
        "/", binary_headers(**{"ce-time": "0001-01-01T00:00:00+01:00"}), data(), 400,
        [P("schema", "time")],
    ),
    "nested too deep": (
        "/", STRUCTURED, lambda: event(data=data(context=nested(8))), 400, [P("depth")],
    ),
    "event too large": (
        "/", STRUCTURED, lambda: event(data=data(reason="x" * 5000)), 413, [P("too_large")],
    ),
    "legacy event too large": (
        LEGACY, JSON, lambda: event(data=data(reason="x" * 5000)), 413, [P("too_large")],
    ),
    "batch with too many events": (
        "/", BATCH, lambda: [event() for _ in range(11)], 413, [P("too_large")],
    ),
    "batch too many bytes": (
        "/", BATCH, lambda: [event(data=data(reason="x" * 3000)) for _ in range(6)], 413,
        [P("too_large")],
    ),
    "one event of a batch too large": (
        "/", BATCH, lambda: [event(), event(data=data(reason="x" * 5000)), event()], 413,
        [P("too_large", index=1)],
    ),
    "one bad event spoils the batch": (
        "/", BATCH, lambda: [event(), event(), event(data=data(outcome="maybe"))], 400,
        [P("schema", "data.outcome", 2)],
    ),
    "several bad events, each with its index": (
        "/", BATCH, lambda: [event(id=""), event(), event(time=now_z(timedelta(days=2)))], 400,
        [P("schema", "id", 0), P("time_window", "time", 2)],
    ),
    "batch element not an object": ("/", BATCH, lambda: [event(), 7], 400, [P("schema", index=1)]),
    "batch not an array": ("/", BATCH, lambda: event(), 400, [P("schema")]),
    "empty batch": ("/", BATCH, b"[]", 400, [P("schema")]),
    "legacy batch without events": (LEGACY_BATCH, JSON, lambda: [event()], 400, [P("schema")]),
    "legacy batch with a bad event": (
        LEGACY_BATCH, JSON, lambda: {"events": [event(), event(data={})]}, 400,
        [P("schema", "data.actor", 1), P("schema", "data.action", 1),
         P("schema", "data.outcome", 1)],
    ),
    "plain json on the cloudevents path": ("/", JSON, lambda: event(), 415, [P(MEDIA)]),
    "no content type": ("/", {}, lambda: event(), 415, [P(MEDIA)]),
    "text on the legacy path": (
        LEGACY, {"Content-Type": "text/plain"}, lambda: event(), 415, [P(MEDIA)],
    ),
    "form on the legacy batch path": (
        LEGACY_BATCH, {"Content-Type": "application/x-www-form-urlencoded"}, b"events=1", 415,
        [P(MEDIA)],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_and_never_produced(case, fn, topics, bootstrap):
    path, headers, body, status, expected = BAD[case]
    if callable(body):
        body = body()
    before = end_offsets(bootstrap, topics.kafka_events_topic)
    reply = request(fn.url, path, body, headers)
    assert reply.status == status, reply.body
    assert reply.headers["content-type"] == "application/json"
    answer = reply.json
    assert answer["error"]
    got = [(p.get("index"), p["reason"], p.get("field")) for p in answer["problems"]]
    assert got == expected, answer
    assert all(p["message"] for p in answer["problems"])
    assert end_offsets(bootstrap, topics.kafka_events_topic) == before


def test_unknown_path_and_wrong_method(fn):
    assert request(fn.url, "/v2/other", event(), STRUCTURED).status == 404
    reply = request(fn.url, "/", method="GET")
    assert reply.status == 405 and reply.headers["allow"] == "POST"
    assert request(fn.url, "/healthz", b"{}", JSON).status == 405


# -- operability ---------------------------------------------------------------


def test_probes(fn):
    assert request(fn.url, "/healthz", method="GET").json == {"status": "ok"}
    ready = request(fn.url, "/readyz", method="GET")
    assert ready.status == 200 and ready.json["ready"] is True


def metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{re.escape(name)}{re.escape('{' + want + '}') if want else ''} (\S+)$"
    m = re.search(pattern, text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def test_metrics_count_accepted_and_rejected_events(fn):
    def scrape():
        return request(fn.url, "/metrics", method="GET").body.decode()

    before = scrape()
    assert request(fn.url, "/", [event(), event()], BATCH).status == 202
    bad = [event(), event(data=data(outcome="maybe")), event(time="2000-01-01T00:00:00Z")]
    assert request(fn.url, "/", bad, BATCH).status == 400
    after = scrape()

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("audit_ingest_events_accepted_total") == 2
    assert delta("audit_ingest_events_rejected_total", reason="schema") == 1
    assert delta("audit_ingest_events_rejected_total", reason="time_window") == 1
    assert delta("audit_ingest_events_rejected_total", reason="batch") == 1
    assert delta("audit_ingest_produce_latency_seconds_count") == 1
    assert "audit_ingest_unavailable_responses_total" in after


def test_logs_are_json_and_carry_the_trace_id(fn):
    e = event(traceparent=TRACEPARENT)
    assert request(fn.url, "/", e, STRUCTURED).status == 202
    refused = request(fn.url, "/", b"{", {**STRUCTURED, "traceparent": TRACEPARENT})
    assert refused.status == 400
    lines = [json.loads(line) for line in fn.log_text().splitlines() if line.startswith("{")]
    accepted = [x for x in lines if e["id"] in x.get("event_ids", [])]
    assert accepted and accepted[0]["trace_id"] == TRACE_ID and accepted[0]["level"] == "debug"
    rejected = [x for x in lines if x.get("reasons") == ["invalid_json"]]
    assert rejected and rejected[-1]["trace_id"] == TRACE_ID


def test_metrics_add_up_over_several_workers(topics, tmp_path):
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    settings = topics.model_copy(update=LIMITS)
    with LocalFunction(
        "ingest", "ingest", settings, tmp_path, workers=2,
        env={"PROMETHEUS_MULTIPROC_DIR": str(multiproc)},
    ) as server:  # fmt: skip
        for _ in range(12):
            assert request(server.url, "/", event(), STRUCTURED).status == 202
        assert request(server.url, "/", b"{", STRUCTURED).status == 400
        for _ in range(3):  # whichever worker answers, the sums are the same
            text = request(server.url, "/metrics", method="GET").body.decode()
            assert metric(text, "audit_ingest_events_accepted_total") == 12
            assert metric(text, "audit_ingest_events_rejected_total", reason="invalid_json") == 1
    assert len(list(multiproc.glob("*.db"))) >= 2
