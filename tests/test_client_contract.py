"""The emitter client and the server agree on the contract: the shipped schema, the limits,
and which events are valid (the client refuses locally what ingest would refuse for its shape).
"""

from __future__ import annotations

import copy
import json
import math
from importlib import resources
from pathlib import Path

import pytest
import yaml

from openg2p_audit.contract import Limits, check_event, json_schema
from openg2p_audit.settings import Settings
from openg2p_audit_client import AuditClient, InvalidEvent
from openg2p_audit_client import client as client_module
from openg2p_audit_client.event import build_event, check, complete

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = REPO / "docs" / "audit-event.schema.json"


def test_the_shipped_schema_is_the_published_one():
    shipped = resources.files("openg2p_audit_client").joinpath("audit-event.schema.json")
    assert json.loads(shipped.read_text()) == json.loads(PUBLISHED.read_text()) == json_schema(), (
        "copy docs/audit-event.schema.json to "
        "clients/python/src/openg2p_audit_client/audit-event.schema.json"
    )


def test_the_clients_limits_are_ingests_defaults_and_the_configmaps():
    defaults = Settings.model_fields
    configmap = yaml.safe_load((REPO / "knative" / "base" / "configmap.yaml").read_text())["data"]
    pairs = {
        "ingest_max_batch_events": client_module.MAX_BATCH_EVENTS,
        "ingest_max_batch_bytes": client_module.MAX_BATCH_BYTES,
        "ingest_max_event_bytes": client_module.MAX_EVENT_BYTES,
        "ingest_max_depth": client_module.MAX_DEPTH,
    }
    for name, value in pairs.items():
        assert defaults[name].default == value, name
        assert int(configmap[name.upper()]) == value, name


def test_the_client_does_not_depend_on_the_server():
    pyproject = (REPO / "clients" / "python" / "pyproject.toml").read_text()
    assert 'dependencies = ["urllib3>=1.26,<3"]' in pyproject
    for path in (REPO / "clients" / "python" / "src").rglob("*.py"):
        text = path.read_text()
        assert "openg2p_audit." not in text and "import openg2p_audit\n" not in text, path


def base() -> dict:
    return build_event(
        "org.openg2p.registry.beneficiary.updated", "/openg2p/registry", actor="officer-17",
        action="update", outcome="success", resource={"type": "beneficiary", "id": "BEN-1"},
        subject="beneficiary/BEN-1", changes=[{"field": "phone", "old": "1", "new": "2"}],
        context={"office": "north"}, extensions={"tenant": "gov-1"},
    )  # fmt: skip


def variants():
    cases = {"as built": lambda e: None}

    def put(path, value):
        def change(event):
            node = event
            for part in path[:-1]:
                node = node[part]
            node[path[-1]] = value

        return change

    def drop(path):
        def change(event):
            node = event
            for part in path[:-1]:
                node = node[part]
            del node[path[-1]]

        return change

    cases.update(
        {
            "no id": drop(["id"]),
            "empty source": put(["source"], ""),
            "specversion 0.3": put(["specversion"], "0.3"),
            "time not rfc3339": put(["time"], "2026-04-01 noon"),
            "time without zone": put(["time"], "2026-04-01T12:00:00"),
            "time with offset": put(["time"], "2026-04-01T12:00:00+02:00"),
            "time a number": put(["time"], 5),
            "datacontenttype text": put(["datacontenttype"], "text/plain"),
            "datacontenttype json suffix": put(["datacontenttype"], "application/vnd.x+json"),
            "traceparent bad": put(["traceparent"], "01-abc"),
            "traceparent all zero": put(["traceparent"], f"00-{'0' * 32}-{'1' * 16}-01"),
            "traceparent good": put(["traceparent"], f"00-{'a' * 32}-{'b' * 16}-01"),
            "extension uppercase": put(["Tenant"], "x"),
            "extension object": put(["tenant"], {"a": 1}),
            "extension int": put(["tenant"], 7),
            "data_base64": put(["data_base64"], "eA=="),
            "outcome maybe": put(["data", "outcome"], "maybe"),
            "actor type robot": put(["data", "actor", "type"], "robot"),
            "actor id empty": put(["data", "actor", "id"], ""),
            "no action": drop(["data", "action"]),
            "resource without type": put(["data", "resource"], {"id": "x"}),
            "changes object": put(["data", "changes"], {"a": 1}),
            "NUL in a value": put(["data", "reason"], "a\x00b"),
            "NUL in a key": put(["data", "context"], {"a\x00": 1}),
            "NaN": put(["data", "context"], {"x": math.nan}),
            "deep": put(["data", "context"], json.loads('{"a":' * 40 + "1" + "}" * 40)),
            "emitter-made authcontext": put(["authid"], "someone"),
            "datacontenttype a cloudevents format": put(
                ["datacontenttype"], "application/cloudevents+json"
            ),
        }
    )
    return cases


@pytest.mark.parametrize("name", sorted(variants()))
def test_the_client_refuses_locally_what_ingest_refuses_for_its_shape(name):
    event = copy.deepcopy(base())
    variants()[name](event)
    # Retention off: the time window is ingest's to decide (the client cannot know it).
    _, server_problems = check_event(copy.deepcopy(event), Limits(retention_months=0))
    try:
        check(complete(event) if "id" in event else event)
        client_ok = True
    except InvalidEvent:
        client_ok = False
    if name == "emitter-made authcontext":
        # Valid in shape; ingest refuses it with a 400 when it stamps the caller's identity.
        assert not client_ok and server_problems == []
        return
    if name == "datacontenttype a cloudevents format":
        # The client sends data as application/json only: an audit record is not an event.
        assert not client_ok
        return
    assert client_ok == (server_problems == []), server_problems


def test_events_the_client_builds_pass_the_servers_checks():
    client = AuditClient("http://127.0.0.1:9/", None, prometheus=False)
    item = client.prepare(base())
    event, problems = check_event(json.loads(item.body), Limits())
    assert problems == [] and event is not None
    assert event.datacontenttype == "application/json"
