"""Building events: what `emit` produces and what it refuses before anything is kept."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone

import pytest

from openg2p_audit_client import InvalidEvent
from openg2p_audit_client.event import build_event, check, complete, encode, record_size


def viewed(**over):
    args = dict(
        type="org.openg2p.registry.beneficiary.viewed", source="/openg2p/registry",
        actor="officer-17", action="view", outcome="success",
        resource={"type": "beneficiary", "id": "BEN-1"}, subject="beneficiary/BEN-1",
    )  # fmt: skip
    args.update(over)
    return build_event(**args)


def test_a_built_event_is_a_valid_cloudevent():
    event = viewed(reason="case review", context={"office": "north"}, tenant_note="x")
    check(event)
    assert event["specversion"] == "1.0" and event["datacontenttype"] == "application/json"
    assert event["data"] == {
        "actor": {"id": "officer-17"}, "action": "view", "outcome": "success",
        "resource": {"type": "beneficiary", "id": "BEN-1"}, "reason": "case review",
        "context": {"office": "north"}, "tenant_note": "x",
    }  # fmt: skip
    assert event["time"].endswith("Z") and len(event["id"]) == 36


def test_time_and_id_given_are_kept():
    moment = datetime(2026, 4, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    event = viewed(id="given-1", time=moment)
    assert event["id"] == "given-1" and event["time"] == "2026-04-01T12:00:00Z"
    with pytest.raises(InvalidEvent, match="time zone"):
        viewed(time=datetime(2026, 4, 1))


def test_an_actor_object_and_extensions():
    event = viewed(actor={"type": "service", "id": "openg2p-payments"}, extensions={"tenant": "t1"})
    check(event)
    assert event["tenant"] == "t1" and event["data"]["actor"]["type"] == "service"
    with pytest.raises(InvalidEvent, match="envelope attribute"):
        viewed(extensions={"source": "/elsewhere"})


@pytest.mark.parametrize(
    "change,words",
    [
        (lambda e: e["data"].update(outcome="maybe"), "data.outcome"),
        (lambda e: e.update(time="yesterday"), "RFC 3339"),
        (lambda e: e.update(traceparent="00-xyz"), "traceparent"),
        (lambda e: e.update(authid="someone"), "set by ingest"),
        (lambda e: e.update(authtype="user"), "set by ingest"),
        (lambda e: e.update(Tenant="x"), "lowercase"),
        (lambda e: e.update(tenant={"a": 1}), "string, int or bool"),
        (lambda e: e.update(data_base64="eA=="), "data must be JSON"),
        (lambda e: e.update(datacontenttype="text/plain"), "application/json"),
        (lambda e: e.update(datacontenttype="application/cloudevents+json"), "application/json"),
        (lambda e: e["data"].update(reason="a\x00b"), r"U\+0000"),
        (lambda e: e["data"].update(context={"x": math.nan}), "NaN"),
        (lambda e: e["data"].update(context=_nested(40)), "levels deep"),
    ],
)
def test_contract_rules_beyond_the_schema(change, words):
    event = viewed()
    change(event)
    with pytest.raises(InvalidEvent, match=words):
        check(event)


def test_complete_fills_only_what_is_missing():
    event = complete({"id": "x", "source": "/s", "type": "t", "data": {}})
    assert event["id"] == "x" and event["specversion"] == "1.0" and "time" in event
    assert complete({"source": "/s"})["id"]


def test_encoding_is_compact_utf8_and_refuses_non_json():
    event = viewed(reason="ação")
    body = encode(event)
    assert json.loads(body) == event and "ação".encode() in body and b": " not in body
    with pytest.raises(InvalidEvent, match="JSON-serialisable"):
        encode(viewed(context={"when": datetime.now(timezone.utc)}))
    assert record_size(event, body) > len(body)


def _nested(depth: int):
    value: dict = {}
    for _ in range(depth):
        value = {"a": value}
    return value
