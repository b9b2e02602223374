"""Knative Eventing's `authentication-oidc` feature off, with the manifests' audiences in place.

What upstream does then (knative-extensions/eventing-kafka-broker, WebClientCloudEventSender):
the KafkaSource's sink names an audience but the source has no OIDC service account, so the
dispatcher fails each delivery before sending anything (OIDCTokenRequestException), does not
retry it, and dead-letters it with `knativeerrordest` and no `knativeerrorcode`; the writer
never sees a request. The dead-letter KafkaSink, with no audience of its own, checks nothing.
And the PingSource sends its pings without a token, which maintenance refuses.

The redrive stays safe: it stores the events ingest attested, whatever their (missing)
error code, and none of what anyone else may now post to the open sink.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
import urllib3

from eventing_support import headers_of, read_topic
from ingest_support import request
from openg2p_audit.maintenance import run_maintenance
from openg2p_audit.topics import ensure_topics
from pipeline_support import INGEST, PING, WRITER, audit_event, start_pipeline, stored_ids

STRUCTURED = {"Content-Type": "application/cloudevents+json"}


@pytest.fixture(scope="module")
def pipeline(settings, tmp_path_factory):
    ensure_topics(settings)
    runner = start_pipeline(
        settings, tmp_path_factory.mktemp("oidc-off"), ingest_auth=True, oidc=False
    )
    yield runner
    runner.stop()


def _dead_letters(settings, ids: set[str], timeout: float = 60.0) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    found: dict[str, dict] = {}
    while time.monotonic() < deadline and set(found) < ids:
        for r in read_topic(settings.bootstrap_servers, settings.kafka_dlq_topic, 10**6, 2):
            h = headers_of(r)
            if h.get("ce_id") in ids:
                found[h["ce_id"]] = h
    return found


def test_oidc_off_dead_letters_have_no_code_and_only_ingests_are_redriven(pipeline, settings):
    token = pipeline.issuer.mint("service-account-openg2p-registry", (), azp="openg2p-registry")
    genuine = audit_event()
    reply = request(pipeline.service_url(INGEST), "/", genuine,
                    {**STRUCTURED, "Authorization": f"Bearer {token}"})  # fmt: skip
    assert reply.status == 202, reply.body

    # With the feature off the sink is open: a forged dead letter, no code, as a "transient"
    # failure would be, with a forged authcontext.
    forged = audit_event(f"forged-{uuid.uuid4()}", source="/openg2p/payments",
                         authid="system:serviceaccount:openg2p:payments")  # fmt: skip
    headers = {f"ce-{k}": str(v) for k, v in forged.items() if k != "data"}
    headers.update({"Content-Type": "application/json", "ce-knativeerrordest": "http://x"})
    sent = urllib3.PoolManager(retries=False).request(
        "POST", pipeline.sink_url("audit-dlq"), body=json.dumps(forged["data"]), headers=headers
    )
    assert sent.status == 202

    dead = _dead_letters(settings, {genuine["id"], forged["id"]})
    assert set(dead) == {genuine["id"], forged["id"]}
    # Upstream's OIDC-off dead letter: the destination, and no code (no answer was had).
    assert dead[genuine["id"]]["ce_knativeerrordest"] == pipeline.service_url(WRITER)
    assert "ce_knativeerrorcode" not in dead[genuine["id"]]
    assert stored_ids(settings, [genuine["id"]]) == {}  # the writer never saw it

    # The PingSource's ping carries no token now: maintenance refuses it (MAINTENANCE_AUTH).
    assert pipeline.fire_ping(PING).status == 401

    # An operator runs the same upkeep (`openg2p-audit upkeep`): ingest's event is stored,
    # the forged one is not.
    summary = run_maintenance(settings.model_copy(update={"integrity_signing_key_file": None}))
    assert summary.redrive.error is None
    assert stored_ids(settings, [genuine["id"]]) == {genuine["id"]: 1}
    assert stored_ids(settings, [forged["id"]]) == {}
    reasons = {p["id"]: p["reason"] for p in summary.redrive.permanent}
    assert reasons.get(forged["id"]) == "not_attested"
