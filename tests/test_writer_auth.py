"""The writer takes deliveries only with a token minted for its audience.

A real writer (functions-framework, its own process, real PostgreSQL) trusts
a local issuer, as it trusts the cluster's service-account issuer in a
deployment. Every refused delivery is checked by its 401, its
WWW-Authenticate header, and by the row not being there.
"""

from __future__ import annotations

import uuid

import pytest
from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent

from auth_support import forged
from ingest_support import request
from openg2p_audit.devservices import LocalFunction
from openg2p_audit.devservices.issuer import LocalIssuer
from openg2p_audit.knative_identity import oidc_subject
from pipeline_support import audit_event, stored_ids

AUDIENCE = "openg2p-audit-writer"


@pytest.fixture(scope="module")
def issuer():
    issuer = LocalIssuer(audience=AUDIENCE).serve()
    yield issuer
    issuer.stop()


@pytest.fixture(scope="module")
def auth_settings(settings, issuer):
    return settings.model_copy(
        update={
            "writer_auth": "required",
            "writer_auth_audience": AUDIENCE,
            "auth_issuer": issuer.url,
            "auth_jwks_url": issuer.jwks_url,
        }
    )


@pytest.fixture(scope="module")
def writer(auth_settings, tmp_path_factory):
    server = LocalFunction("writer", "write", auth_settings, tmp_path_factory.mktemp("writer"))
    server.start()
    yield server
    server.stop()


def delivery(token: str | None) -> tuple[str, dict[str, str], bytes]:
    event = audit_event(f"w-{uuid.uuid4()}")
    attrs = {k: v for k, v in event.items() if k != "data"}
    headers, body = to_binary(CloudEvent(attrs, event["data"]))
    headers = {**headers, "Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return event["id"], headers, body


def source_token(issuer: LocalIssuer, **extra) -> str:
    return issuer.mint(
        oidc_subject("default", "KafkaSource", "audit-events-to-writer"), (), **extra
    )


def test_a_delivery_with_the_sources_token_is_stored(writer, issuer, auth_settings):
    event_id, headers, body = delivery(source_token(issuer))
    reply = request(writer.url, "/", body, headers)
    assert reply.status == 201, reply.body
    assert stored_ids(auth_settings, [event_id]) == {event_id: 1}
    # the same token again is answered from the cache, and still checked for each delivery
    event_id, headers, body = delivery(source_token(issuer))
    assert request(writer.url, "/", body, headers).status == 201


@pytest.mark.parametrize(
    "name",
    ["expired", "wrong_issuer", "wrong_audience", "unknown_kid", "other_key_same_kid",
     "alg_none", "hs256_with_public_key", "tampered_payload", "malformed", "oversized"],
)  # fmt: skip
def test_a_forged_delivery_token_is_a_401_and_stores_nothing(writer, issuer, auth_settings, name):
    event_id, headers, body = delivery(forged(issuer, audience=AUDIENCE)[name])
    reply = request(writer.url, "/", body, headers)
    assert reply.status == 401, (name, reply.body)
    assert 'error="invalid_token"' in reply.headers["www-authenticate"]
    assert reply.json == {"error": "unauthorized", "message": "a valid bearer token is required"}
    assert stored_ids(auth_settings, [event_id]) == {}


def test_no_token_or_an_emitters_token_is_a_401(writer, issuer, auth_settings):
    for token in (None, source_token(issuer, aud="openg2p-audit")):
        event_id, headers, body = delivery(token)
        reply = request(writer.url, "/", body, headers)
        assert reply.status == 401
        assert reply.headers["www-authenticate"].startswith('Bearer realm="openg2p-audit"')
        assert stored_ids(auth_settings, [event_id]) == {}


def test_probes_need_no_token(writer):
    assert request(writer.url, "/healthz", method="GET").status == 200
    assert request(writer.url, "/readyz", method="GET").status == 200


def test_the_writer_will_not_start_without_an_issuer(auth_settings, tmp_path):
    bare = auth_settings.model_copy(update={"auth_issuer": None, "auth_jwks_url": None})
    server = LocalFunction("writer", "write", bare, tmp_path)
    with pytest.raises(RuntimeError) as err:
        server.start(timeout=30)
    assert "no trusted token issuer" in str(err.value)


def test_disabling_the_check_is_said_at_warning(settings, tmp_path):
    server = LocalFunction("writer", "write", settings, tmp_path).start()
    server.stop()
    assert (
        "WRITER_AUTH=disabled: the writer stores whatever is POSTed" in server.log_path.read_text()
    )
