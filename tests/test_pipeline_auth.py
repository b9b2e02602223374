"""Tokens through the whole pipeline as deployed: knative/base with its OIDC settings.

Ingest requires tokens and the ConfigMap's source policy; the KafkaSource and
the Trigger name OIDC audiences, so the runner delivers with tokens it mints
from its local issuer, as Knative Eventing does with `authentication-oidc`
on, and the writer checks them. What is asserted is what a deployment would
show: rows (with the caller's authcontext), the query service's answer, the
topic's end offsets, status codes and bodies.
"""

from __future__ import annotations

import json
import uuid

import pytest
import urllib3
from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent

from auth_support import forged
from ingest_support import end_offsets, request
from openg2p_audit.devservices.issuer import LocalIssuer
from openg2p_audit.knative_identity import oidc_subject
from openg2p_audit.topics import ensure_topics
from pipeline_support import (
    BROKER,
    INGEST,
    WRITER,
    audit_event,
    broker_sender,
    start_pipeline,
    stored_ids,
    wait_stored,
)
from query_support import reader_role

QUERY = "audit-query"
STRUCTURED = {"Content-Type": "application/cloudevents+json"}


@pytest.fixture(scope="module")
def pipeline(settings, tmp_path_factory):
    ensure_topics(settings)
    reader = reader_role(settings, f"audit_query_{uuid.uuid4().hex[:8]}")
    runner = start_pipeline(
        settings, tmp_path_factory.mktemp("pipeline-auth"), ingest_auth=True,
        service_env={QUERY: {"DATABASE_URL": reader.database_url}},
    )  # fmt: skip
    yield runner
    runner.stop()


def registry(issuer: LocalIssuer) -> dict[str, str]:
    """A Keycloak client-credentials token of the registry's client (the ConfigMap names it)."""
    token = issuer.mint("service-account-openg2p-registry", (), azp="openg2p-registry")
    return {"Authorization": f"Bearer {token}"}


def topic_end(settings) -> dict[int, int]:
    return end_offsets(settings.kafka_bootstrap_servers, settings.kafka_events_topic)


def details_of(settings, event_id: str) -> dict:
    import pg8000.native

    conn = pg8000.native.Connection(**settings.pg_connect_kwargs)
    try:
        ((details,),) = conn.run("SELECT details FROM audit_events WHERE id = :i", i=event_id)
    finally:
        conn.close()
    return details if isinstance(details, dict) else json.loads(details)


def test_an_authorised_callers_events_land_with_their_authcontext(pipeline, settings):
    issuer = pipeline.issuer
    events = [audit_event(), audit_event(source="/openg2p/registry/households")]
    reply = request(
        pipeline.service_url(INGEST), "/", events,
        {"Content-Type": "application/cloudevents-batch+json", **registry(issuer)},
    )  # fmt: skip
    assert reply.status == 202, reply.body
    ids = [e["id"] for e in events]
    assert wait_stored(settings, ids) == dict.fromkeys(ids, 1)
    extensions = details_of(settings, ids[0])["extensions"]
    assert extensions["authtype"] == "service_account"
    assert extensions["authid"] == "service-account-openg2p-registry"
    assert json.loads(extensions["authclaims"]) == {"azp": "openg2p-registry", "iss": issuer.url}

    # The investigators see who sent it.
    reader = {"Authorization": f"Bearer {issuer.mint('investigator-1', ('audit.read',))}"}
    shown = request(
        pipeline.service_url(QUERY), f"/v1/audit/events/{ids[0]}", method="GET", headers=reader
    )
    assert shown.status == 200, shown.body
    (row,) = shown.json["events"]
    assert row["details"]["extensions"]["authid"] == "service-account-openg2p-registry"


@pytest.mark.parametrize(
    "name", ["expired", "wrong_issuer", "wrong_audience", "unknown_kid", "alg_none",
             "hs256_with_public_key", "malformed"],
)  # fmt: skip
def test_forged_tokens_are_refused_and_nothing_reaches_the_topic(pipeline, settings, name):
    before = topic_end(settings)
    event = audit_event()
    token = forged(pipeline.issuer)[name]
    reply = request(
        pipeline.service_url(INGEST), "/", event,
        {**STRUCTURED, "Authorization": f"Bearer {token}"},
    )  # fmt: skip
    assert reply.status == 401, reply.body
    assert reply.headers["www-authenticate"].startswith('Bearer realm="openg2p-audit"')
    assert topic_end(settings) == before
    assert stored_ids(settings, [event["id"]]) == {}


def test_another_services_source_is_a_403(pipeline, settings):
    before = topic_end(settings)
    event = audit_event(source="/openg2p/payments", type="org.openg2p.payments.payment.approved")
    reply = request(
        pipeline.service_url(INGEST), "/", event, {**STRUCTURED, **registry(pipeline.issuer)}
    )
    assert reply.status == 403
    assert reply.json["error"] == "forbidden"
    assert "may not emit under source '/openg2p/payments'" in reply.json["problems"][0]["message"]
    assert topic_end(settings) == before


def _binary(event: dict) -> tuple[dict[str, str], bytes]:
    attrs = {k: v for k, v in event.items() if k != "data"}
    headers, body = to_binary(CloudEvent(attrs, event["data"]))
    return {**headers, "Content-Type": "application/json"}, body


def test_a_direct_post_to_the_writer_without_the_sources_token_stores_nothing(pipeline, settings):
    writer = pipeline.service_url(WRITER)
    issuer = pipeline.issuer
    other = LocalIssuer(issuer.url)  # same issuer URL, a key the writer does not know
    attempts = {
        "no token": None,
        "ingest's audience": issuer.mint("mallory", (), aud="openg2p-audit"),
        "an emitter's token": issuer.mint("service-account-openg2p-registry", ()),
        "unknown key": other.mint("mallory", (), aud="openg2p-audit-writer"),
        "forged alg none": forged(issuer, audience="openg2p-audit-writer")["alg_none"],
    }
    for what, token in attempts.items():
        event = audit_event()
        headers, body = _binary(event)
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        reply = request(writer, "/", body, headers)
        assert reply.status == 401, (what, reply.body)
        assert reply.json["error"] == "unauthorized"
        assert "www-authenticate" in reply.headers
        assert stored_ids(settings, [event["id"]]) == {}, what


def test_broker_deliveries_with_the_runners_token_land(pipeline, settings):
    event = audit_event()
    headers, body = _binary(event)
    reply = urllib3.PoolManager(retries=False).request(
        "POST",
        pipeline.broker_url(BROKER),
        body=body,
        headers={**headers, **broker_sender(pipeline)},
    )
    assert reply.status == 202, reply.data
    assert wait_stored(settings, [event["id"]]) == {event["id"]: 1}
    extensions = details_of(settings, event["id"])["extensions"]
    assert extensions["authid"] == oidc_subject("default", "Trigger", "audit-to-ingest")
    assert extensions["authtype"] == "service_account"
