"""Ingest with tokens on: who may write, under which source, and what the event then says.

A real ingest (functions-framework, its own process) trusts a local issuer
whose JWKS is served over HTTP, and produces to the real broker. Every
refusal is checked by its status, its body and headers, and by the topic's
end offsets not moving: nothing of a refused request may reach Kafka.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest

from auth_support import forged
from ingest_support import end_offsets, read_topic, request
from openg2p_audit.auth import TokenVerifier
from openg2p_audit.devservices import LocalFunction
from openg2p_audit.devservices.issuer import LocalIssuer
from openg2p_audit.http_binding import header_value
from openg2p_audit.policy import SourcePolicy
from openg2p_audit.settings import SettingsError
from test_ingest import BATCH, JSON, STRUCTURED, event

POLICY = """
callers:
  openg2p-registry:
    sources: ["/openg2p/registry", "/openg2p/registry/*"]
  system:serviceaccount:openg2p:payments:
    sources: ["/openg2p/payments*"]
    types: ["org.openg2p.payments."]
"""


@pytest.fixture(scope="module")
def auth_settings(topics, issuer):
    return topics.model_copy(
        update={
            "ingest_auth": "required",
            "auth_issuer": issuer.url,
            "auth_jwks_url": issuer.jwks_url,
            "ingest_source_policy": POLICY,
        }
    )


@pytest.fixture(scope="module")
def fn(auth_settings, tmp_path_factory):
    server = LocalFunction("ingest", "ingest", auth_settings, tmp_path_factory.mktemp("ingest"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def bootstrap(topics):
    return topics.kafka_bootstrap_servers


def registry_token(issuer: LocalIssuer, **extra) -> str:
    """A Keycloak client-credentials token of the registry's client."""
    return issuer.mint(
        "service-account-openg2p-registry", (), azp="openg2p-registry", **extra
    )  # fmt: skip


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def headers_of(record) -> dict[str, str]:
    """A record's headers, attribute values decoded as every reader of the topic decodes them
    (ingest writes them percent-encoded, kafka_binding)."""
    return {
        k: header_value(v.decode()) if k.startswith("ce_") else v.decode()
        for k, v in record.headers
    }


@pytest.fixture
def nothing_produced(fn, topics, bootstrap):
    before = end_offsets(bootstrap, topics.kafka_events_topic)
    yield
    assert end_offsets(bootstrap, topics.kafka_events_topic) == before


def test_an_authorised_caller_lands_with_its_authcontext(fn, issuer, topics, bootstrap):
    before = end_offsets(bootstrap, topics.kafka_events_topic)
    ev = event(source="/openg2p/registry/beneficiaries")
    reply = request(fn.url, "/", ev, {**STRUCTURED, **bearer(registry_token(issuer))})
    assert reply.status == 202, reply.body
    assert reply.json == {"accepted": [ev["id"]]}
    (record,) = read_topic(bootstrap, topics.kafka_events_topic, before)
    h = headers_of(record)
    assert h["ce_id"] == ev["id"]
    assert h["ce_authtype"] == "service_account"
    assert h["ce_authid"] == "service-account-openg2p-registry"
    assert json.loads(h["ce_authclaims"]) == {"azp": "openg2p-registry", "iss": issuer.url}


def test_a_projected_service_account_token_is_a_service_account(fn, issuer, topics, bootstrap):
    before = end_offsets(bootstrap, topics.kafka_events_topic)
    token = issuer.mint("system:serviceaccount:openg2p:payments", ())
    ev = event(source="/openg2p/payments", type="org.openg2p.payments.payment.approved")
    reply = request(fn.url, "/", [ev], {**BATCH, **bearer(token)})
    assert reply.status == 202, reply.body
    (record,) = read_topic(bootstrap, topics.kafka_events_topic, before)
    assert headers_of(record)["ce_authid"] == "system:serviceaccount:openg2p:payments"
    assert headers_of(record)["ce_authtype"] == "service_account"


@pytest.mark.parametrize(
    "name",
    [
        "malformed", "malformed_segments", "garbage_base64", "expired", "not_yet_valid",
        "wrong_issuer", "wrong_audience", "no_audience", "no_expiry", "no_subject",
        "unknown_kid", "other_key_same_kid", "no_kid", "alg_none", "hs256_with_public_key",
        "tampered_payload", "oversized",
    ],
)  # fmt: skip
def test_every_forged_token_is_a_401_and_nothing_is_produced(fn, issuer, name, nothing_produced):
    token = forged(issuer)[name]
    reply = request(fn.url, "/", event(), {**STRUCTURED, **bearer(token)})
    assert reply.status == 401, (name, reply.body)
    challenge = 'Bearer realm="openg2p-audit", error="invalid_token"'
    assert reply.headers["www-authenticate"] == challenge
    assert reply.json == {"error": "unauthorized", "message": "a valid bearer token is required"}


def test_a_token_for_another_audience_is_a_401(fn, issuer, nothing_produced):
    # e.g. the writer's delivery token, or a token a user got for another client
    for audience in ("openg2p-audit-writer", "openg2p-registry"):
        token = registry_token(issuer, aud=audience)
        reply = request(fn.url, "/", event(), {**STRUCTURED, **bearer(token)})
        assert reply.status == 401, reply.body
        assert "invalid_token" in reply.headers["www-authenticate"]


@pytest.mark.parametrize(
    "authorization", [None, "", "Bearer", "Bearer ", "Basic dXNlcjpwdw==", "token abc"]
)
def test_no_bearer_token_is_a_401_without_invalid_token(fn, authorization, nothing_produced):
    headers = dict(STRUCTURED)
    if authorization is not None:
        headers["Authorization"] = authorization
    reply = request(fn.url, "/", event(), headers)
    assert reply.status == 401
    assert reply.headers["www-authenticate"] == 'Bearer realm="openg2p-audit"'
    assert reply.json["error"] == "unauthorized"


@pytest.mark.parametrize(
    "path,body",
    [
        ("/v1/auditmanager/events", lambda ev: ev),
        ("/v1/auditmanager/events/batch", lambda ev: {"events": [ev]}),
    ],
)
def test_legacy_paths_follow_the_same_rules(fn, issuer, topics, bootstrap, path, body):
    before = end_offsets(bootstrap, topics.kafka_events_topic)
    ev = event()
    assert request(fn.url, path, body(ev), JSON).status == 401
    forged_token = forged(issuer)["hs256_with_public_key"]
    assert request(fn.url, path, body(ev), {**JSON, **bearer(forged_token)}).status == 401
    wrong = event(source="/openg2p/payments")
    reply = request(fn.url, path, body(wrong), {**JSON, **bearer(registry_token(issuer))})
    assert reply.status == 403
    assert end_offsets(bootstrap, topics.kafka_events_topic) == before
    reply = request(fn.url, path, body(ev), {**JSON, **bearer(registry_token(issuer))})
    assert reply.status == 202, reply.body
    (record,) = read_topic(bootstrap, topics.kafka_events_topic, before)
    assert headers_of(record)["ce_authid"] == "service-account-openg2p-registry"


def test_another_services_source_is_a_403_naming_the_event(fn, issuer, nothing_produced):
    batch = [event(), event(source="/openg2p/payments"), event(), event(source="/openg2p/reg")]
    reply = request(fn.url, "/", batch, {**BATCH, **bearer(registry_token(issuer))})
    assert reply.status == 403
    assert reply.json == {
        "error": "forbidden",
        "problems": [
            {"reason": "forbidden", "index": 1, "field": "source",
             "message": "caller openg2p-registry may not emit under source '/openg2p/payments'"},
            {"reason": "forbidden", "index": 3, "field": "source",
             "message": "caller openg2p-registry may not emit under source '/openg2p/reg'"},
        ],
    }  # fmt: skip


def test_a_type_outside_the_callers_prefixes_is_a_403(fn, issuer, nothing_produced):
    token = issuer.mint("system:serviceaccount:openg2p:payments", ())
    ev = event(source="/openg2p/payments", type="org.openg2p.registry.beneficiary.viewed")
    reply = request(fn.url, "/", ev, {**STRUCTURED, **bearer(token)})
    assert reply.status == 403
    (problem,) = reply.json["problems"]
    assert "may not emit events of type" in problem["message"]


def test_a_caller_the_policy_does_not_name_is_a_403(fn, issuer, nothing_produced):
    reply = request(fn.url, "/", event(), {**STRUCTURED, **bearer(issuer.mint("stranger", ()))})
    assert reply.status == 403
    assert reply.json["problems"][0]["message"] == "the caller is not named in the source policy"


@pytest.mark.parametrize("name", ["authtype", "authid", "authclaims"])
def test_an_authcontext_sent_by_the_emitter_is_refused(fn, issuer, name, nothing_produced):
    ev = event(**{name: "user"})
    reply = request(fn.url, "/", [event(), ev], {**BATCH, **bearer(registry_token(issuer))})
    assert reply.status == 400
    (problem,) = reply.json["problems"]
    assert problem["reason"] == "authcontext"
    assert problem["index"] == 1
    assert problem["field"] == name


def test_a_repeated_token_is_checked_from_the_cache(auth_settings, issuer):
    """The cost the ingest benchmark reports per request; here only bounded, generously."""
    verifier = TokenVerifier.for_settings(auth_settings)
    token = registry_token(issuer)
    first = verifier.verify(token)
    rounds = 20_000
    started = time.perf_counter()
    for _ in range(rounds):
        assert verifier.cached(token) is first
    per_call = (time.perf_counter() - started) / rounds
    assert per_call < 30e-6, f"{per_call * 1e6:.1f} µs per cached check"
    # an expired token is not answered from the cache
    stale = issuer.mint("openg2p-registry", (), lifetime=1)
    verifier.verify(stale)
    time.sleep(1.1)
    assert verifier.cached(stale) is None


def test_ingest_will_not_start_with_a_bad_policy(auth_settings, tmp_path):
    bad = auth_settings.model_copy(
        update={"ingest_source_policy": "callers:\n  x:\n    sourcez: ['/a']\n"}
    )
    server = LocalFunction("ingest", "ingest", bad, tmp_path)
    with pytest.raises(RuntimeError) as err:
        server.start(timeout=30)
    assert "invalid source policy in INGEST_SOURCE_POLICY: callers.x.sourcez" in str(err.value)


@pytest.mark.parametrize(
    "text,says",
    [
        ("callers: [1]", "callers: Input should be a valid dictionary"),
        ("callers:\n  a: {sources: []}", "callers.a.sources is empty"),
        ("callers:\n  a: {sources: ['']}", "callers.a.sources.0"),
        ("{", "not YAML"),
        ("nobody: {}", "callers: Field required"),
    ],
)
def test_a_bad_policy_is_one_line_naming_the_problem(text, says):
    with pytest.raises(SettingsError) as err:
        SourcePolicy.parse(text)
    line = str(err.value)
    assert says in line and "\n" not in line


def test_ingest_will_not_start_without_a_policy_when_tokens_are_required(auth_settings, tmp_path):
    bad = auth_settings.model_copy(update={"ingest_source_policy": None})
    server = LocalFunction("ingest", "ingest", bad, tmp_path)
    with pytest.raises(RuntimeError) as err:
        server.start(timeout=30)
    assert "INGEST_SOURCE_POLICY (or INGEST_SOURCE_POLICY_FILE) is not set" in str(err.value)


def test_disabling_tokens_is_said_at_warning(topics, tmp_path):
    server = LocalFunction("ingest", "ingest", topics, tmp_path).start()
    try:
        reply = request(server.url, "/", event(id=f"open-{uuid.uuid4()}"), STRUCTURED)
        assert reply.status == 202
    finally:
        server.stop()
    log = server.log_path.read_text()
    assert "INGEST_AUTH=disabled: ingest accepts events from anyone" in log
    assert "WARNING" in log or '"level": "warning"' in log.lower()
