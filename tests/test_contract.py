"""The event contract and its Kafka binding, as pure logic."""

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from attestation_support import INGEST
from openg2p_audit import kafka_binding
from openg2p_audit.contract import AuditEvent, find_nul, json_schema, nesting_depth

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def event(**over):
    base = {
        "specversion": "1.0",
        "id": "evt-1",
        "source": "/openg2p/registry",
        "type": "org.openg2p.registry.beneficiary.viewed",
        "time": "2026-04-01T10:00:00Z",
        "data": {"actor": {"id": "u-1"}, "action": "view", "outcome": "success"},
    }
    base.update(over)
    return base


def test_minimal_event_gets_defaults():
    e = AuditEvent.model_validate(event())
    assert e.time == datetime(2026, 4, 1, 10, tzinfo=UTC)
    assert e.data.actor.type == "user"
    assert e.partition_key == "u-1"
    assert e.trace_id is None


def test_offsets_are_normalised_to_utc_and_trace_id_extracted():
    e = AuditEvent.model_validate(
        event(time="2026-04-01T12:30:00.5+02:00", traceparent=TRACEPARENT, subject="ben-9")
    )
    assert e.time_rfc3339 == "2026-04-01T10:30:00.500000Z"
    assert e.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert e.partition_key == "ben-9"


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"specversion": "0.3"}, "specversion"),
        ({"id": ""}, "id"),
        ({"time": "yesterday"}, "time"),
        ({"time": 1700000000}, "time"),
        ({"traceparent": "00-zz-00"}, "traceparent"),
        ({"datacontenttype": "text/plain"}, "datacontenttype"),
        ({"data": {"actor": {"id": "u"}, "action": "x", "outcome": "maybe"}}, "data.outcome"),
        ({"data": {"action": "x", "outcome": "success"}}, "data.actor"),
        (
            {"data": {"actor": {"id": "u", "type": "robot"}, "action": "x", "outcome": "success"}},
            "data.actor.type",
        ),
    ],
)
def test_violations_name_the_field(over, field):
    with pytest.raises(ValidationError) as err:
        AuditEvent.model_validate(event(**over))
    locs = {".".join(str(p) for p in e["loc"]) for e in err.value.errors()}
    assert field in locs


def test_extensions_are_kept_and_checked():
    e = AuditEvent.model_validate(event(tenant="moz", partofbatch=True))
    assert e.extensions == {"tenant": "moz", "partofbatch": True}
    with pytest.raises(ValidationError):
        AuditEvent.model_validate(event(**{"Bad-Name": "x"}))


def test_binary_kafka_round_trip_keeps_everything():
    e = AuditEvent.model_validate(
        event(
            subject="ben-9",
            traceparent=TRACEPARENT,
            tenant="moz",
            data={
                "actor": {"id": "u-1", "roles": ["officer"], "office": "north"},
                "action": "update",
                "outcome": "success",
                "resource": {"type": "beneficiary", "id": "ben-9", "program_id": "p1"},
                "changes": [{"field": "phone", "old": "1", "new": "2"}],
                "channel": "web",
            },
        )
    )
    record = kafka_binding.encode(e, INGEST)
    headers = dict(record.headers)
    assert record.key == b"ben-9"
    assert headers["content-type"] == b"application/json"
    assert headers["ce_id"] == b"evt-1"
    assert headers["ce_time"] == b"2026-04-01T10:00:00Z"
    assert headers["ce_tenant"] == b"moz"
    back = kafka_binding.decode(record.headers, record.key, record.value)
    assert back == e
    assert back.data.actor.model_extra == {"office": "north"}
    assert back.data.model_extra == {"channel": "web"}


def test_a_structured_record_is_not_an_event_of_the_topic():
    """Ingest writes binary mode only: an envelope in a record's value is never read."""
    import json

    value = json.dumps(event()).encode()
    with pytest.raises(kafka_binding.NotBinary):
        kafka_binding.decode([("content-type", b"application/cloudevents+json")], None, value)
    with pytest.raises(ValueError):
        kafka_binding.decode([], None, b"not json")


def test_nul_and_depth_helpers():
    assert find_nul({"a": [{"b": "x\x00y"}]}) == "a[0].b"
    assert find_nul({"a\x00": 1}) == "a\x00"
    assert find_nul({"a": ["ok"]}) is None
    assert nesting_depth("x") == 0
    assert nesting_depth({}) == 1
    assert nesting_depth({"a": [{"b": 1}]}) == 3


def test_json_schema_is_published_from_the_models():
    schema = json_schema()
    assert set(schema["required"]) >= {"specversion", "id", "source", "type", "data"}
    assert "AuditData" in schema["$defs"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_numbers_are_refused_with_their_path(bad):
    data = {
        "actor": {"id": "officer-7"},
        "action": "view",
        "outcome": "success",
        "context": {"scores": [1.5, {"risk": bad}]},
    }
    with pytest.raises(ValidationError) as info:
        AuditEvent.model_validate(
            {"specversion": "1.0", "id": "e1", "source": "/s", "type": "t", "data": data}
        )
    assert "context.scores[1].risk: NaN and Infinity are not JSON numbers" in str(info.value)


def test_finite_floats_pass():
    data = {"actor": {"id": "officer-7"}, "action": "pay", "outcome": "success", "amount": 12.5}
    event = AuditEvent.model_validate(
        {"specversion": "1.0", "id": "e1", "source": "/s", "type": "t", "data": data}
    )
    assert event.data_json()["amount"] == 12.5
