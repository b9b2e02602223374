"""Bearer tokens from the deployment's OIDC issuer: the one place tokens are checked.

The query service is the first function behind a token; ingest and the writer
are to follow with the same module, so nothing here knows about queries. The
JOSE work (signature, `exp`, `nbf`, `iss`, `aud`) is PyJWT's; this module only
decides which key and which algorithms PyJWT may use, and what a caller is told.

- Keys come from the issuer's JWKS URL and are cached. A token signed with a
  key id the cache does not know triggers one refresh (the issuer rotated its
  keys), but at most one per `_MIN_REFRESH_SECONDS`, so a stream of tokens with
  made-up key ids cannot turn this service into a flood of requests to Keycloak.
- Only asymmetric algorithms are accepted (settings refuse others), and each
  key verifies only with the algorithm its JWK names. `alg: none` and an HS256
  token "signed" with the public key (key confusion) are therefore refused.
- Roles are read from claim paths set by `AUTH_ROLE_CLAIMS`: Keycloak puts realm
  roles in `realm_access.roles` and client roles in `resource_access.<client>.roles`.
- Refusals tell the caller only "unauthorized" (401, with WWW-Authenticate) or
  "forbidden" (403). Which check failed is logged, never answered: it would tell
  an attacker which part of a forged token to fix next.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt
import urllib3
from starlette.requests import Request
from starlette.responses import Response

from .settings import Settings, SettingsError

log = logging.getLogger("openg2p_audit.auth")

# A refresh for an unknown key id happens at most this often.
_MIN_REFRESH_SECONDS = 10.0
# How long fetching the JWKS may take before the request gives up (503).
_JWKS_TIMEOUT_SECONDS = 3.0
# Longest token accepted, in bytes: far above a Keycloak access token, far below abuse.
MAX_TOKEN_BYTES = 16 * 1024

REALM = "openg2p-audit"


class AuthError(Exception):
    """The request is refused: 401 (no usable token), 403 (no role) or 503 (cannot check)."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason  # for the log only


@dataclass(frozen=True)
class Principal:
    """Who a verified token speaks for."""

    subject: str
    roles: frozenset[str]
    claims: Mapping[str, Any] = field(repr=False)

    @property
    def name(self) -> str | None:
        value = self.claims.get("preferred_username")
        return value if isinstance(value, str) else None


class JwksUnavailable(Exception):
    """The issuer's keys could not be fetched."""


class JwksCache:
    """The issuer's signing keys by key id, fetched on demand and kept for a while."""

    def __init__(self, url: str, cache_seconds: float):
        self.url = url
        self.cache_seconds = cache_seconds
        self._http = urllib3.PoolManager(retries=False)
        self._lock = threading.Lock()
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = 0.0  # monotonic; 0 = never
        self.min_refresh_seconds = _MIN_REFRESH_SECONDS

    def key(self, kid: str) -> jwt.PyJWK | None:
        """The key with this id; refreshes when stale, or when the id is new (rate-limited)."""
        with self._lock:
            age = time.monotonic() - self._fetched_at
            stale = self._fetched_at == 0 or age > self.cache_seconds
            unknown = kid not in self._keys and age > self.min_refresh_seconds
            if stale or unknown:
                try:
                    self._refresh()
                except JwksUnavailable:
                    if kid not in self._keys:
                        raise
                    # A known key stays usable while the issuer is briefly away.
                    log.warning("JWKS refresh failed; using the cached keys")
            return self._keys.get(kid)

    def _refresh(self) -> None:
        try:
            resp = self._http.request("GET", self.url, timeout=_JWKS_TIMEOUT_SECONDS)
        except urllib3.exceptions.HTTPError as exc:
            raise JwksUnavailable(f"cannot fetch {self.url}: {exc}") from exc
        if resp.status != 200:
            raise JwksUnavailable(f"{self.url} answered {resp.status}")
        try:
            keyset = jwt.PyJWKSet.from_dict(json.loads(resp.data))
        except (ValueError, jwt.PyJWKSetError) as exc:
            raise JwksUnavailable(f"{self.url} holds no usable keys: {exc}") from exc
        self._keys = {k.key_id: k for k in keyset.keys if k.key_id and k.public_key_use != "enc"}
        self._fetched_at = time.monotonic()
        log.info("JWKS fetched", extra={"url": self.url, "kids": sorted(self._keys)})


def roles_at(claims: Mapping[str, Any], paths: Iterable[str]) -> frozenset[str]:
    """Every string found at the dotted claim paths (a list of strings, or one string)."""
    found: set[str] = set()
    for path in paths:
        node: Any = claims
        for part in path.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if isinstance(node, str):
            found.add(node)
        elif isinstance(node, list):
            found.update(v for v in node if isinstance(v, str))
    return frozenset(found)


class TokenVerifier:
    """Checks bearer tokens against one issuer, audience and set of algorithms."""

    def __init__(self, settings: Settings):
        if not settings.auth_configured:
            raise SettingsError(
                "AUTH_ISSUER and AUTH_JWKS_URL are not set: point them at the OIDC issuer"
            )
        self.issuer: str = settings.auth_issuer  # type: ignore[assignment]
        self.audience = settings.auth_audience
        self.algorithms = settings.auth_algorithms.split(",")
        self.leeway = settings.auth_leeway_seconds
        self.role_paths = [p.strip() for p in settings.auth_role_claims.split(",") if p.strip()]
        self.keys = JwksCache(settings.auth_jwks_url, settings.auth_jwks_cache_seconds)  # type: ignore[arg-type]

    def verify(self, token: str) -> Principal:
        """The token's principal, or AuthError. Blocking: may fetch the JWKS."""
        if not token or len(token) > MAX_TOKEN_BYTES:
            raise AuthError(401, "token empty or oversized")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError as exc:
            raise AuthError(401, f"malformed token: {exc}") from None
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in self.algorithms:
            raise AuthError(401, f"algorithm {alg!r} not accepted")
        if not isinstance(kid, str) or not kid:
            raise AuthError(401, "token names no key id")
        try:
            key = self.keys.key(kid)
        except JwksUnavailable as exc:
            raise AuthError(503, f"cannot check tokens: {exc}") from None
        if key is None:
            raise AuthError(401, f"unknown key id {kid!r}")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=self.algorithms,
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.InvalidTokenError as exc:
            raise AuthError(401, f"{type(exc).__name__}: {exc}") from None
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise AuthError(401, "token has no subject")
        return Principal(subject, roles_at(claims, self.role_paths), claims)

    def authorize(self, token: str | None, *roles: str) -> Principal:
        """The principal if the token is good and holds every one of `roles`."""
        if token is None:
            raise AuthError(401, "no bearer token")
        principal = self.verify(token)
        missing = [r for r in roles if r not in principal.roles]
        if missing:
            raise AuthError(403, f"{principal.subject} lacks {', '.join(missing)}")
        return principal


async def authenticate(
    verifier: TokenVerifier, request: Request, *roles: str, token: str | None = None
) -> Principal:
    """A function's check of one request: its bearer token (or `token`) holding `roles`.

    Verification may fetch the JWKS, so it runs off the event loop. A refusal is
    logged with its real reason and raised as AuthError for `refusal` to answer.
    """
    if token is None:
        token = bearer_token(request.headers.get("authorization"))
    try:
        return await asyncio.to_thread(verifier.authorize, token, *roles)
    except AuthError as exc:
        log.info(
            "refused %s %s: %s", request.method, request.url.path, exc.reason,
            extra={"status": exc.status},
        )  # fmt: skip
        raise


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def refusal(exc: AuthError) -> Response:
    """The answer to a refused request: the same few words whatever failed.

    401 carries `WWW-Authenticate` as RFC 6750 asks, with `invalid_token` when
    a token was sent (that much the caller knows anyway).
    """
    if exc.status == 403:
        body: dict[str, str] = {
            "error": "forbidden",
            "message": "the token does not grant access to this resource",
        }
        headers: dict[str, str] = {}
    elif exc.status == 503:
        body = {
            "error": "unavailable",
            "cause": "issuer_unavailable",
            "message": "tokens cannot be checked right now",
        }
        headers = {"Retry-After": "5"}
    else:
        body = {"error": "unauthorized", "message": "a valid bearer token is required"}
        challenge = f'Bearer realm="{REALM}"'
        if exc.reason != "no bearer token":
            challenge += ', error="invalid_token"'
        headers = {"WWW-Authenticate": challenge}
    return Response(json.dumps(body), exc.status, headers, media_type="application/json")
