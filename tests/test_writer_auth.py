"""The writer takes deliveries only from its KafkaSource: that issuer, that audience, that sub.

A real writer (functions-framework, its own process, real PostgreSQL) trusts
a local issuer, as it trusts the cluster's service-account issuer in a
deployment. Every refused delivery is checked by its 401 (with WWW-Authenticate)
or 403, and by the row not being there.
"""

from __future__ import annotations

import json
import uuid

import pytest

from attestation_support import record
from auth_support import forged
from ingest_support import request
from kafkasource import binary_delivery
from openg2p_audit.contract import AuditEvent
from openg2p_audit.devservices import LocalFunction
from openg2p_audit.devservices.issuer import LocalIssuer
from openg2p_audit.knative_identity import oidc_subject
from pipeline_support import audit_event, stored_ids

AUDIENCE = "openg2p-audit-writer"
SOURCE_SA = oidc_subject("default", "KafkaSource", "audit-events-to-writer")


@pytest.fixture(scope="module")
def issuer():
    issuer = LocalIssuer(audience=AUDIENCE).serve()
    yield issuer
    issuer.stop()


@pytest.fixture(scope="module")
def keycloak():
    """Another issuer the writer's settings trust (AUTH_ISSUER: the emitters' Keycloak)."""
    other = LocalIssuer(audience=AUDIENCE).serve()
    yield other
    other.stop()


@pytest.fixture(scope="module")
def auth_settings(settings, issuer, keycloak):
    return settings.model_copy(
        update={
            "writer_auth": "required",
            "writer_auth_audience": AUDIENCE,
            "auth_issuer": keycloak.url,
            "auth_jwks_url": keycloak.jwks_url,
            # The cluster's service-account issuer, which signs Knative's OIDC tokens.
            "auth_trusted_issuers": json.dumps(
                [{"issuer": issuer.url, "jwks_url": issuer.jwks_url, "audience": AUDIENCE}]
            ),
            "writer_auth_issuer": issuer.url,
            "writer_auth_subjects": SOURCE_SA,
        }
    )


@pytest.fixture(scope="module")
def writer(auth_settings, tmp_path_factory):
    server = LocalFunction("writer", "write", auth_settings, tmp_path_factory.mktemp("writer"))
    server.start()
    yield server
    server.stop()


def delivery(token: str | None) -> tuple[str, dict[str, str], bytes]:
    """A KafkaSource's delivery of a record ingest produced, with `token`."""
    event = AuditEvent.model_validate(audit_event(f"w-{uuid.uuid4()}"))
    headers, body = binary_delivery(record(event))
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return event.id, headers, body


def source_token(issuer: LocalIssuer, **extra) -> str:
    return issuer.mint(SOURCE_SA, (), **extra)


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


def test_a_good_token_of_anyone_but_the_kafkasource_is_a_403(
    writer, issuer, keycloak, auth_settings
):
    """Any pod can have a projected token minted for any audience it names: the audience
    proves nothing, the subject does. And the emitters' issuer signs no delivery."""
    for token in (
        issuer.mint("system:serviceaccount:evil-ns:attacker", ()),
        issuer.mint(oidc_subject("default", "Trigger", "audit-to-ingest"), ()),
        issuer.mint(oidc_subject("evil-ns", "KafkaSource", "audit-events-to-writer"), ()),
    ):
        event_id, headers, body = delivery(token)
        reply = request(writer.url, "/", body, headers)
        assert reply.status == 403, reply.body
        assert reply.json["error"] == "forbidden"
        assert stored_ids(auth_settings, [event_id]) == {}
    # The right subject and audience, but from Keycloak (trusted for other purposes): 401.
    event_id, headers, body = delivery(keycloak.mint(SOURCE_SA, ()))
    reply = request(writer.url, "/", body, headers)
    assert reply.status == 401, reply.body
    assert stored_ids(auth_settings, [event_id]) == {}


def test_probes_need_no_token(writer):
    assert request(writer.url, "/healthz", method="GET").status == 200
    assert request(writer.url, "/readyz", method="GET").status == 200


def test_the_writer_will_not_start_without_an_issuer(auth_settings, tmp_path):
    bare = auth_settings.model_copy(
        update={"auth_issuer": None, "auth_jwks_url": None, "auth_trusted_issuers": None}
    )
    server = LocalFunction("writer", "write", bare, tmp_path)
    with pytest.raises(RuntimeError) as err:
        server.start(timeout=30)
    assert "WRITER_AUTH_ISSUER" in str(err.value) and "is not a trusted issuer" in str(err.value)
    # Nor without the KafkaSource's identity, nor without the attestation keys.
    for update, named in (
        ({"writer_auth_subjects": None}, "WRITER_AUTH_SUBJECTS"),
        ({"attestation_ingest_keys": None}, "ATTESTATION_INGEST_KEYS"),
    ):
        server = LocalFunction("writer", "write", auth_settings.model_copy(update=update),
                               tmp_path / named)  # fmt: skip
        with pytest.raises(RuntimeError) as err:
            server.start(timeout=30)
        assert named in str(err.value)


def test_disabling_the_check_is_said_at_warning(settings, tmp_path):
    server = LocalFunction("writer", "write", settings, tmp_path).start()
    server.stop()
    assert (
        "WRITER_AUTH=disabled: the writer takes deliveries from anyone"
        in server.log_path.read_text()
    )
