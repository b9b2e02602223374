"""The published contract: the committed JSON Schema, the examples, and the limits."""

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from openg2p_audit.contract import (
    AuditEvent,
    Limits,
    check_event,
    exceeds_depth,
    json_schema,
    months_before,
    nesting_depth,
)

DOCS = Path(__file__).resolve().parents[1] / "docs"
SCHEMA_FILE = DOCS / "audit-event.schema.json"
FAMILIES = {
    "login-succeeded",
    "login-failed",
    "beneficiary-viewed",
    "beneficiary-updated",
    "payment-approved",
    "payment-reversed-by-system",
    "access-denied",
}


def examples():
    return sorted((DOCS / "examples").glob("*.json"))


def test_committed_schema_is_the_one_the_models_generate():
    committed = json.loads(SCHEMA_FILE.read_text())
    assert committed == json_schema(), (
        "docs/audit-event.schema.json is stale: openg2p-audit schema > docs/audit-event.schema.json"
    )
    Draft202012Validator.check_schema(committed)


def test_one_example_per_event_family():
    assert {p.stem for p in examples()} == FAMILIES


@pytest.mark.parametrize("path", examples(), ids=lambda p: p.stem)
def test_example_passes_the_schema_and_the_model(path):
    raw = json.loads(path.read_text())
    Draft202012Validator(json.loads(SCHEMA_FILE.read_text())).validate(raw)
    event, problems = check_event(raw, Limits(retention_months=0))
    assert problems == [] and isinstance(event, AuditEvent)
    assert event.data.outcome in ("success", "failure", "denied")


def test_schema_refuses_what_the_model_refuses():
    validator = Draft202012Validator(json.loads(SCHEMA_FILE.read_text()))
    raw = json.loads((DOCS / "examples" / "access-denied.json").read_text())
    raw["data"]["outcome"] = "maybe"
    assert not validator.is_valid(raw)
    del raw["id"]
    assert {e.validator for e in validator.iter_errors(raw)} >= {"required", "enum"}


def test_specific_examples_carry_what_their_family_needs():
    def load(name):
        return AuditEvent.model_validate_json((DOCS / "examples" / f"{name}.json").read_text())

    assert load("beneficiary-updated").data.changes
    payment = load("payment-approved").data.resource
    assert payment.model_extra["amount"] and payment.model_extra["currency"] == "MZN"
    assert load("payment-reversed-by-system").data.actor.type == "system"
    assert load("access-denied").data.outcome == "denied"
    assert load("login-failed").data.outcome == "failure"


def test_months_before_clamps_to_the_end_of_the_month():
    assert months_before(datetime(2026, 3, 31, 12, tzinfo=UTC), 1) == datetime(
        2026, 2, 28, 12, tzinfo=UTC
    )
    assert months_before(datetime(2026, 1, 15, tzinfo=UTC), 84) == datetime(2019, 1, 15, tzinfo=UTC)
    assert months_before(datetime(2026, 12, 5, tzinfo=UTC), 12) == datetime(2025, 12, 5, tzinfo=UTC)


def test_time_window_follows_retention_and_skew():
    now = datetime(2026, 6, 15, tzinfo=UTC)
    lower, upper = Limits(retention_months=84, max_clock_skew_seconds=60).time_window(now)
    assert lower == datetime(2019, 6, 15, tzinfo=UTC) and upper == now + timedelta(seconds=60)
    assert Limits(retention_months=0).time_window(now)[0] is None


def test_check_event_names_every_problem():
    raw = json.loads((DOCS / "examples" / "login-failed.json").read_text())
    raw["data"]["reason"] = "a\x00b"
    raw["data"]["outcome"] = "maybe"
    raw["time"] = "2001-01-01T00:00:00Z"
    event, problems = check_event(raw, Limits(), index=4)
    assert event is None
    # The schema violation hides the time check: time is only judged on a valid event.
    assert [(p.index, p.reason, p.field) for p in problems] == [
        (4, "nul", "data.reason"),
        (4, "schema", "data.outcome"),
    ]
    deep = {**raw, "data": {"x": [[[[{"y": 1}]]]]}}
    _, problems = check_event(deep, Limits(max_depth=4))
    assert [p.reason for p in problems] == ["depth"]


@pytest.mark.parametrize(
    "value", [{}, [], "x", 3, {"a": [{"b": 1}]}, [[[[]]]], {"a": {"b": {"c": {}}}}, [1, [2, [3]]]]
)
def test_exceeds_depth_agrees_with_nesting_depth(value):
    for limit in range(6):
        assert exceeds_depth(value, limit) == (nesting_depth(value) > limit)


def test_openapi_document_describes_the_ingest_surface():
    import yaml

    doc = yaml.safe_load((DOCS / "ingest.openapi.yaml").read_text())
    assert doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) == {
        "/",
        "/v1/auditmanager/events",
        "/v1/auditmanager/events/batch",
        "/healthz",
        "/readyz",
        "/metrics",
    }
    reasons = doc["components"]["responses"]["Refused"]["content"]["application/json"]["schema"]
    enum = reasons["properties"]["problems"]["items"]["properties"]["reason"]["enum"]
    assert "time_window" in enum and "too_large" in enum
