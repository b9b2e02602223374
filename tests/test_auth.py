"""Bearer tokens: forged in every way an attacker would try, against a real JWKS endpoint.

The tokens come from a local issuer (a generated RSA key whose JWKS is served
over HTTP), so the verifier fetches, caches and refreshes keys as it would
from Keycloak. Bad tokens are built the way an attacker builds them: `alg:
none`, HS256 keyed with the public key, another key under the issuer's key id.
The last tests send each of them to the real query service and check that the
answers are identical: a refusal says nothing about which check failed.
"""

from __future__ import annotations

import time
import uuid

import pytest

from auth_support import forged
from ingest_support import request
from openg2p_audit.auth import AuthError, TokenVerifier, bearer_token, roles_at
from openg2p_audit.devservices import LocalFunction
from openg2p_audit.devservices.issuer import LocalIssuer
from openg2p_audit.settings import SettingsError
from query_support import full_range, reader_role, url_with


@pytest.fixture(scope="module")
def auth_settings(settings, issuer):
    return settings.model_copy(update={"auth_issuer": issuer.url, "auth_jwks_url": issuer.jwks_url})


@pytest.fixture
def verifier(auth_settings):
    return TokenVerifier(auth_settings)


def test_a_good_token_gives_its_subject_and_roles(verifier, issuer):
    principal = verifier.authorize(issuer.mint("inv-7", ("audit.read",)), "audit.read")
    assert principal.subject == "inv-7"
    assert principal.roles == {"audit.read"}
    assert principal.name == "inv-7"


@pytest.mark.parametrize("name", list(forged(LocalIssuer("http://127.0.0.1:1/issuer"))))
def test_every_forged_token_is_a_401(verifier, issuer, name):
    token = forged(issuer)[name]
    with pytest.raises(AuthError) as refused:
        verifier.authorize(token, "audit.read")
    assert refused.value.status == 401, refused.value.reason


def test_no_token_is_a_401(verifier):
    with pytest.raises(AuthError) as refused:
        verifier.authorize(None, "audit.read")
    assert refused.value.status == 401


def test_leeway_absorbs_small_clock_skew_only(verifier, issuer):
    now = int(time.time())
    claims = issuer.claims("skewed")
    verifier.verify(issuer.sign({**claims, "exp": now - 5}))  # within AUTH_LEEWAY_SECONDS
    verifier.verify(issuer.sign({**claims, "nbf": now + 5}))
    with pytest.raises(AuthError):
        verifier.verify(issuer.sign({**claims, "exp": now - 60}))


def test_a_missing_role_is_a_403(verifier, issuer):
    with pytest.raises(AuthError) as refused:
        verifier.authorize(issuer.mint("reader", ("audit.read",)), "audit.read", "audit.export")
    assert refused.value.status == 403


def test_roles_come_from_the_configured_claim_paths(auth_settings, issuer):
    claims = {
        "realm_access": {"roles": ["audit.read", 7]},
        "resource_access": {"openg2p-audit": {"roles": ["audit.export"]}, "x": {"roles": ["y"]}},
        "groups": "auditors",
    }
    assert roles_at(claims, ["realm_access.roles", "resource_access.openg2p-audit.roles"]) == {
        "audit.read",
        "audit.export",
    }
    assert roles_at(claims, ["groups", "missing.path", "realm_access.roles.deeper"]) == {"auditors"}
    custom = TokenVerifier(auth_settings.model_copy(update={"auth_role_claims": "groups"}))
    token = issuer.sign({**issuer.claims("grouped", ()), "groups": ["audit.read"]})
    assert custom.authorize(token, "audit.read").roles == {"audit.read"}
    with pytest.raises(AuthError):  # realm roles no longer count with this setting
        custom.authorize(issuer.mint("realm", ("audit.read",)), "audit.read")


def test_keys_are_cached_and_refreshed_once_for_a_new_key_id(auth_settings):
    issuer = LocalIssuer().serve()
    try:
        settings = auth_settings.model_copy(
            update={"auth_issuer": issuer.url, "auth_jwks_url": issuer.jwks_url}
        )
        verifier = TokenVerifier(settings)
        for _ in range(5):
            verifier.verify(issuer.mint())
        assert issuer.jwks_requests == 1  # cached

        stranger = LocalIssuer(issuer.url)
        for _ in range(20):  # made-up key ids do not each cost a fetch
            stranger.kid = f"made-up-{uuid.uuid4().hex}"
            with pytest.raises(AuthError):
                verifier.verify(stranger.mint())
        assert issuer.jwks_requests == 1

        issuer.rotate()  # the issuer's new key: one refresh, once the interval has passed
        verifier.keys.min_refresh_seconds = 0.2
        time.sleep(0.3)
        assert verifier.verify(issuer.mint("after-rotation")).subject == "after-rotation"
        assert issuer.jwks_requests == 2
    finally:
        issuer.stop()


def test_an_unreachable_jwks_is_a_503_not_a_401(auth_settings, issuer):
    dead = auth_settings.model_copy(update={"auth_jwks_url": "http://127.0.0.1:1/jwks.json"})
    with pytest.raises(AuthError) as refused:
        TokenVerifier(dead).verify(issuer.mint())
    assert refused.value.status == 503


def test_settings_refuse_shared_secret_algorithms(auth_settings):
    from openg2p_audit.settings import load_settings

    for bad in ("HS256", "none", "RS256,HS512", ""):
        with pytest.raises(SettingsError):
            load_settings(auth_algorithms=bad)
    with pytest.raises(SettingsError):
        TokenVerifier(auth_settings.model_copy(update={"auth_issuer": None}))


def test_bearer_header_parsing():
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer  abc ") == "abc"
    for header in (None, "", "Basic abc", "Bearer", "Bearer  ", "abc"):
        assert bearer_token(header) is None


# ------------------------------------------------------------------ over HTTP


@pytest.fixture(scope="module")
def service(settings, auth_settings, topics, tmp_path_factory):
    reader = reader_role(auth_settings, f"audit_auth_{uuid.uuid4().hex[:8]}")
    fn = LocalFunction("query", "query", reader, tmp_path_factory.mktemp("query-auth"))
    fn.start()
    yield fn
    fn.stop()


def test_every_refusal_answers_the_same_few_words(service, issuer):
    answers = set()
    url = url_with(service.url, "/v1/audit/events", full_range()).removeprefix(service.url)
    for name, token in forged(issuer).items():
        headers = {"Authorization": f"Bearer {token}"}
        reply = request(service.url, url, method="GET", headers=headers)
        assert reply.status == 401, name
        assert reply.headers["www-authenticate"] == (
            'Bearer realm="openg2p-audit", error="invalid_token"'
        )
        answers.add(reply.body)
    assert answers == {b'{"error": "unauthorized", "message": "a valid bearer token is required"}'}
    for header in ({}, {"Authorization": "Basic dXNlcjpwdw=="}):
        reply = request(service.url, url, method="GET", headers=header)
        assert reply.status == 401 and reply.headers["www-authenticate"] == (
            'Bearer realm="openg2p-audit"'
        )
    no_role = issuer.mint("nobody", ("offline_access",))
    reply = request(service.url, url, method="GET", headers={"Authorization": f"Bearer {no_role}"})
    assert reply.status == 403
    assert reply.json == {
        "error": "forbidden",
        "message": "the token does not grant access to this resource",
    }
    log = service.log_text()
    assert "refused GET /v1/audit/events" in log  # the reason is for the operator's log only


def test_the_query_service_will_not_start_without_an_issuer(settings, tmp_path):
    """No configured issuer means no way to check a token: refuse to serve at all."""
    unconfigured = settings.model_copy(update={"auth_issuer": None, "auth_jwks_url": None})
    fn = LocalFunction("query", "query", unconfigured, tmp_path)
    with pytest.raises(RuntimeError, match="exited"):
        fn.start(timeout=60)
    assert "AUTH_ISSUER and AUTH_JWKS_URL are not set" in fn.log_text()
