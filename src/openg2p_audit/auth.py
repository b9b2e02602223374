"""Bearer tokens from the deployment's OIDC issuer: the one place tokens are checked.

The query service is the first function behind a token; ingest and the writer
are to follow with the same module, so nothing here knows about queries. The
JOSE work (signature, `exp`, `nbf`, `iss`, `aud`) is PyJWT's; this module only
decides which key and which algorithms PyJWT may use, and what a caller is told.

- Keys come from the issuer's JWKS URL and are cached. A token signed with a
  key id the cache does not know triggers one refresh (the issuer rotated its
  keys), but at most one per `_MIN_REFRESH_SECONDS`, so a stream of tokens with
  made-up key ids cannot turn this service into a flood of requests to Keycloak.
  One fetch at a time, outside any lock: known keys keep answering while the
  issuer is slow or away (`JwksCache`).
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
    """The issuer's signing keys by key id, fetched on demand and kept for a while.

    No request waits behind another's fetch, and none waits for a fetch it does
    not need. At most one fetch is in flight (in a thread of its own), and the
    lock guards only the cache's fields, never the network:

    - a known key is used at once, also while its keys are due for a refresh
      (the refresh runs in the background) and, when the issuer cannot be
      reached, for AUTH_JWKS_MAX_STALE_SECONDS past AUTH_JWKS_CACHE_SECONDS;
    - a token that needs a fetch (no keys yet, a new key id, keys too stale)
      waits for the one in flight, at most its timeout, alongside every other
      such token;
    - after a failed fetch none is tried for `min_refresh_seconds`, and tokens
      without a usable key fail at once (503) instead of each trying again.
    """

    def __init__(self, url: str, cache_seconds: float, max_stale_seconds: float = 3600.0):
        self.url = url
        self.cache_seconds = cache_seconds
        self.max_stale_seconds = max_stale_seconds
        self._http = urllib3.PoolManager(retries=False)
        self._lock = threading.Lock()
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = 0.0  # monotonic; 0 = never
        self._flight: threading.Event | None = None  # set when the fetch in flight is done
        self._failed: str | None = None  # why the last fetch failed, until one succeeds
        self._retry_at = 0.0  # no fetch before this after a failure
        self.min_refresh_seconds = _MIN_REFRESH_SECONDS

    def _state(self, kid: str) -> tuple[jwt.PyJWK | None, threading.Event | None]:
        """Under the lock: the usable key for `kid` (or None), and the fetch to wait for."""
        now = time.monotonic()
        age = now - self._fetched_at if self._fetched_at else float("inf")
        key = self._keys.get(kid)
        if key is not None and age > self.cache_seconds + self.max_stale_seconds:
            key = None  # too stale to trust any more
        due = age > self.cache_seconds or (kid not in self._keys and age > self.min_refresh_seconds)
        if due and self._flight is None and now >= self._retry_at:
            self._flight = threading.Event()
            threading.Thread(target=self._fetch, args=(self._flight,), name="jwks-fetch",
                             daemon=True).start()  # fmt: skip
        return key, (self._flight if due else None)

    def key(self, kid: str) -> jwt.PyJWK | None:
        """The key with this id, or None (unknown); JwksUnavailable when it cannot be known."""
        with self._lock:
            key, flight = self._state(kid)
        if key is not None:
            return key
        if flight is not None:
            if not flight.wait(_JWKS_TIMEOUT_SECONDS + 1):
                raise JwksUnavailable(f"{self.url} did not answer in time")
            with self._lock:
                key, _ = self._state(kid)
        if key is not None:
            return key
        with self._lock:
            failed = self._failed
        if failed is not None:
            raise JwksUnavailable(failed)
        return None

    def _fetch(self, flight: threading.Event) -> None:
        try:
            keys = self._download()
        except JwksUnavailable as exc:
            log.warning("JWKS fetch failed (cached keys, if any, stay usable a while): %s", exc)
            with self._lock:
                self._failed = str(exc)
                self._retry_at = time.monotonic() + self.min_refresh_seconds
        else:
            with self._lock:
                self._keys, self._fetched_at, self._failed = keys, time.monotonic(), None
            log.info("JWKS fetched", extra={"url": self.url, "kids": sorted(keys)})
        finally:
            with self._lock:
                self._flight = None
            flight.set()

    def _download(self) -> dict[str, jwt.PyJWK]:
        try:
            resp = self._http.request(
                "GET", self.url, timeout=urllib3.Timeout(total=_JWKS_TIMEOUT_SECONDS)
            )
        except urllib3.exceptions.HTTPError as exc:
            raise JwksUnavailable(f"cannot fetch {self.url}: {exc}") from exc
        if resp.status != 200:
            raise JwksUnavailable(f"{self.url} answered {resp.status}")
        try:
            keyset = jwt.PyJWKSet.from_dict(json.loads(resp.data))
        except (ValueError, jwt.PyJWKSetError) as exc:
            raise JwksUnavailable(f"{self.url} holds no usable keys: {exc}") from exc
        return {k.key_id: k for k in keyset.keys if k.key_id and k.public_key_use != "enc"}


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


@dataclass(frozen=True)
class Issuer:
    """One issuer a function trusts: its `iss`, where its keys are, and the audience required."""

    issuer: str
    jwks_url: str
    audience: str


class TokenVerifier:
    """Checks bearer tokens against the trusted issuers, each with its audience and keys.

    A token's `iss` (read before the signature is checked) only picks which
    issuer's keys and audience apply; PyJWT then checks `iss` again with the
    signature, so a forged `iss` gains nothing. Verified tokens are remembered
    until their `exp`: ingest sees the same service token on every request, and
    an RSA verification (about 50 µs) would otherwise be paid each time.
    """

    def __init__(
        self, settings: Settings, issuers: Iterable[Issuer] | None = None,
        audience: str | None = None,
    ):  # fmt: skip
        if issuers is None:
            if not settings.auth_configured:
                raise SettingsError(
                    "AUTH_ISSUER and AUTH_JWKS_URL are not set: point them at the OIDC issuer"
                )
            issuers = [Issuer(settings.auth_issuer, settings.auth_jwks_url, settings.auth_audience)]  # type: ignore[arg-type]
        # `audience` replaces every issuer's own: the writer takes only tokens minted for it.
        self.issuers = {
            i.issuer: Issuer(i.issuer, i.jwks_url, audience or i.audience) for i in issuers
        }
        if not self.issuers:
            raise SettingsError("no trusted token issuer: set AUTH_ISSUER and AUTH_JWKS_URL")
        first = next(iter(self.issuers.values()))
        self.issuer = first.issuer
        self.audience = first.audience
        self.algorithms = settings.auth_algorithms.split(",")
        self.leeway = settings.auth_leeway_seconds
        self.role_paths = [p.strip() for p in settings.auth_role_claims.split(",") if p.strip()]
        # Issuers sharing a JWKS URL share its cache (one fetch, one refresh budget).
        caches: dict[str, JwksCache] = {}
        for i in self.issuers.values():
            if i.jwks_url not in caches:
                caches[i.jwks_url] = JwksCache(
                    i.jwks_url, settings.auth_jwks_cache_seconds,
                    settings.auth_jwks_max_stale_seconds,
                )  # fmt: skip
        self._keys = {name: caches[i.jwks_url] for name, i in self.issuers.items()}
        self.keys = self._keys[first.issuer]
        self.cache_size = settings.auth_token_cache_size
        self._verified: dict[str, tuple[Principal, float]] = {}

    @classmethod
    def for_settings(cls, settings: Settings, audience: str | None = None) -> TokenVerifier:
        """A verifier trusting AUTH_ISSUER and every issuer of AUTH_TRUSTED_ISSUERS."""
        issuers = [Issuer(**entry) for entry in settings.trusted_issuers]
        if not issuers:
            raise SettingsError(
                "no trusted token issuer: set AUTH_ISSUER and AUTH_JWKS_URL "
                "(or AUTH_TRUSTED_ISSUERS)"
            )
        return cls(settings, issuers, audience)

    def cached(self, token: str) -> Principal | None:
        """The principal of a token verified before and not yet expired; never blocks."""
        hit = self._verified.get(token)
        if hit is None:
            return None
        if hit[1] <= time.time():
            self._verified.pop(token, None)
            return None
        return hit[0]

    def _remember(self, token: str, principal: Principal) -> None:
        if self.cache_size <= 0:
            return
        exp = principal.claims.get("exp")
        if not isinstance(exp, int | float):
            return
        if len(self._verified) >= self.cache_size:
            # Dicts keep insertion order: dropping the oldest tenth is a cheap LRU stand-in.
            for old in list(self._verified)[: max(1, self.cache_size // 10)]:
                self._verified.pop(old, None)
        self._verified[token] = (principal, float(exp))

    def verify(self, token: str) -> Principal:
        """The token's principal, or AuthError. Blocking: may fetch the JWKS."""
        hit = self.cached(token) if token else None
        if hit is not None:
            return hit
        if not token or len(token) > MAX_TOKEN_BYTES:
            raise AuthError(401, "token empty or oversized")
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.DecodeError as exc:
            raise AuthError(401, f"malformed token: {exc}") from None
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in self.algorithms:
            raise AuthError(401, f"algorithm {alg!r} not accepted")
        if not isinstance(kid, str) or not kid:
            raise AuthError(401, "token names no key id")
        iss = unverified.get("iss")
        issuer = self.issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise AuthError(401, f"issuer {iss!r} not trusted")
        try:
            key = self._keys[issuer.issuer].key(kid)
        except JwksUnavailable as exc:
            raise AuthError(503, f"cannot check tokens: {exc}") from None
        if key is None:
            raise AuthError(401, f"unknown key id {kid!r}")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=self.algorithms,
                audience=issuer.audience,
                issuer=issuer.issuer,
                leeway=self.leeway,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.InvalidTokenError as exc:
            raise AuthError(401, f"{type(exc).__name__}: {exc}") from None
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise AuthError(401, "token has no subject")
        principal = Principal(subject, roles_at(claims, self.role_paths), claims)
        self._remember(token, principal)
        return principal

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
    if token is not None and not roles:
        # A token seen before is answered here: a hop to a thread costs more than the check.
        hit = verifier.cached(token)
        if hit is not None:
            return hit
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


class WorkloadGate:
    """Only the named workloads' OIDC tokens: one issuer, one audience, a list of subjects.

    With Knative Eventing's `authentication-oidc` feature, a KafkaSource sends each
    delivery (and a PingSource each ping) with a token of the source's own OIDC service
    account, `system:serviceaccount:NS:<name>-oidc-<group>-<kind>` (knative_identity.py),
    signed by the cluster's service-account issuer, for the sink's `audience`. The audience
    alone proves nothing about the sender: any pod may ask the API server for a projected
    token with any audience it names, and a Keycloak client may be given any audience too.
    So the gate takes a token only from the configured issuer (one of the trusted issuers,
    for its keys) and only for a subject in the list: a missing or bad token is 401, a good
    token of anyone else 403; neither reads the body.
    """

    def __init__(self, settings: Settings, *, prefix: str, issuer: str | None,
                 audience: str, subjects: str | None):  # fmt: skip
        if not issuer or not subjects:
            missing = [n for n, v in ((f"{prefix}_ISSUER", issuer),
                                      (f"{prefix}_SUBJECTS", subjects)) if not v]  # fmt: skip
            raise SettingsError(
                f"{' and '.join(missing)} not set: {prefix}=required takes tokens of the named "
                "workloads only (the cluster's service-account issuer, and the Knative source's "
                "OIDC identity)"
            )
        known = {entry["issuer"]: entry for entry in settings.trusted_issuers}
        if issuer not in known:
            raise SettingsError(
                f"{prefix}_ISSUER={issuer!r} is not a trusted issuer (AUTH_ISSUER or "
                "AUTH_TRUSTED_ISSUERS): its signing keys are needed"
            )
        self.prefix = prefix
        self.subjects = frozenset(s.strip() for s in subjects.split(",") if s.strip())
        self.verifier = TokenVerifier(
            settings, [Issuer(issuer, known[issuer]["jwks_url"], audience)], audience
        )

    def check(self, token: str | None) -> Principal:
        """The caller if it is one of the workloads; AuthError otherwise (blocking)."""
        principal = self.verifier.authorize(token)
        if principal.subject not in self.subjects:
            raise AuthError(403, f"{principal.subject} is not among {self.prefix}_SUBJECTS")
        return principal

    async def refusal(self, request: Request) -> Response | None:
        """None when the request comes from one of the workloads; else the 401/403/503."""
        token = bearer_token(request.headers.get("authorization"))
        if token is not None:
            hit = self.verifier.cached(token)
            if hit is not None and hit.subject in self.subjects:
                return None
        try:
            await asyncio.to_thread(self.check, token)
        except AuthError as exc:
            log.warning("refused %s %s: %s", request.method, request.url.path, exc.reason,
                        extra={"status": exc.status})  # fmt: skip
            return refusal(exc)
        return None
