"""Where the bearer token for ingest comes from.

A token source is anything with `token() -> str`; `invalidate()`, when it has
one, is called after ingest answered 401, so the next `token()` gets a fresh
one. `token_source()` turns what `AuditClient` is given into one:

- a `str`: a static token (`StaticToken`);
- a callable returning a token (`CallableToken`), e.g. a service's own token cache;
- `ClientCredentials`: the OAuth2 client-credentials grant against Keycloak's
  (or any OAuth2) token endpoint, cached until shortly before it expires;
- `TokenFile`: a Kubernetes projected service-account token, re-read whenever
  the kubelet replaces the file (it rotates the token long before expiry).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import quote, urlencode

import urllib3

from .errors import TokenError

log = logging.getLogger("openg2p_audit_client")


@runtime_checkable
class TokenSource(Protocol):
    def token(self) -> str: ...


class StaticToken:
    """One token for the life of the process (tests, scripts, `--token`)."""

    def __init__(self, token: str):
        if not token:
            raise ValueError("a static token must not be empty")
        self._token = token

    def token(self) -> str:
        return self._token

    def __repr__(self) -> str:
        return "StaticToken(***)"


class CallableToken:
    """A function that returns the current token; called before every request."""

    def __init__(self, fn: Callable[[], str]):
        self._fn = fn

    def token(self) -> str:
        value = self._fn()
        if not value:
            raise TokenError("the token callable returned no token")
        return value


class ClientCredentials:
    """OAuth2 client credentials (RFC 6749 4.4), as a Keycloak confidential client uses them.

    `token_url` is the realm's token endpoint, e.g.
    `https://keycloak.example.org/realms/openg2p/protocol/openid-connect/token`.
    The token is reused until `refresh_margin` seconds before `expires_in` runs out
    (at most a tenth of its lifetime, so short-lived tokens are still reused), and
    fetched anew after `invalidate()`. The client authenticates with HTTP Basic
    (`client_secret_basic`, the RFC's default) or in the form body
    (`auth_method="client_secret_post"`).
    """

    def __init__(
        self,
        token_url: str,
        client_id: str,
        client_secret: str,
        *,
        scope: str | None = None,
        refresh_margin: float = 30.0,
        auth_method: str = "client_secret_basic",
        timeout: float = 10.0,
        http: urllib3.PoolManager | None = None,
    ):
        if auth_method not in ("client_secret_basic", "client_secret_post"):
            raise ValueError("auth_method must be client_secret_basic or client_secret_post")
        self.token_url = token_url
        self.client_id = client_id
        self._secret = client_secret
        self.scope = scope
        self.refresh_margin = refresh_margin
        self.auth_method = auth_method
        self.timeout = timeout
        self._own_http = http is None
        self.http = http or urllib3.PoolManager()
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._token: str | None = None
        self._refresh_at = 0.0
        self.fetches = 0  # how many tokens were requested (metrics, tests)

    def token(self) -> str:
        with self._lock:
            if self._token is None or time.monotonic() >= self._refresh_at:
                self._token, lifetime = self._fetch()
                margin = min(self.refresh_margin, lifetime / 10)
                self._refresh_at = time.monotonic() + lifetime - margin
            return self._token

    def invalidate(self) -> None:
        with self._lock:
            self._token = None

    def _fetch(self) -> tuple[str, float]:
        form: dict[str, str] = {"grant_type": "client_credentials"}
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json",
        }
        if self.scope:
            form["scope"] = self.scope
        if self.auth_method == "client_secret_basic":
            # RFC 6749 2.3.1: both parts form-urlencoded before they are joined and encoded.
            pair = f"{quote(self.client_id, safe='')}:{quote(self._secret, safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        else:
            form.update(client_id=self.client_id, client_secret=self._secret)
        self.fetches += 1
        if self._own_http and self._pid != os.getpid():  # a forked worker: its own sockets
            self.http, self._pid = urllib3.PoolManager(), os.getpid()
        try:
            resp = self.http.request(
                "POST", self.token_url, body=urlencode(form), headers=headers,
                timeout=urllib3.Timeout(self.timeout), retries=False,
            )  # fmt: skip
        except urllib3.exceptions.HTTPError as exc:
            raise TokenError(f"token endpoint {self.token_url} unreachable: {exc}") from None
        text = resp.data.decode("utf-8", "replace")
        if resp.status != 200:
            raise TokenError(
                f"token endpoint {self.token_url} answered {resp.status}: {text[:300]}",
                resp.status, text,
            )  # fmt: skip
        try:
            doc = json.loads(text)
            token = doc["access_token"]
        except (ValueError, KeyError, TypeError):
            raise TokenError(f"token endpoint {self.token_url} sent no access_token") from None
        lifetime = doc.get("expires_in")
        if not isinstance(lifetime, int | float) or isinstance(lifetime, bool) or lifetime <= 0:
            lifetime = _jwt_lifetime(token)
        log.debug("fetched a token for %s, valid %.0f s", self.client_id, lifetime)
        return token, float(lifetime)

    def __repr__(self) -> str:
        return f"ClientCredentials({self.token_url!r}, {self.client_id!r}, ***)"


class TokenFile:
    """A token in a file, re-read when the file changes (a projected service-account token).

    The kubelet swaps the file atomically (a new inode behind the `..data`
    symlink), so a change of inode, size or modification time means a new token.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._seen: tuple[int, int, int] | None = None
        self._token = ""
        self.reads = 0

    def token(self) -> str:
        with self._lock:
            try:
                st = os.stat(self.path)
            except OSError as exc:
                raise TokenError(f"token file {self.path}: {exc.strerror}") from None
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            if stamp != self._seen:
                token = self.path.read_text().strip()
                if not token:
                    raise TokenError(f"token file {self.path} is empty")
                self._token, self._seen = token, stamp
                self.reads += 1
            return self._token

    def invalidate(self) -> None:
        with self._lock:
            self._seen = None

    def __repr__(self) -> str:
        return f"TokenFile({str(self.path)!r})"


def token_source(value: Any) -> Any:
    """What AuditClient's `token_source` may be, as an object with `token()` (None: no token)."""
    if value is None or isinstance(value, TokenSource):
        return value
    if isinstance(value, str):
        return StaticToken(value)
    if callable(value):
        return CallableToken(value)
    raise TypeError(
        "token_source must be a token string, a callable returning one, "
        "ClientCredentials(...), TokenFile(...) or an object with token()"
    )


def _jwt_lifetime(token: str) -> float:
    """Seconds until the JWT's `exp` (read without verifying: only to know when to renew)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return max(float(claims["exp"]) - time.time(), 1.0)
    except (IndexError, ValueError, KeyError, TypeError):
        return 60.0  # neither expires_in nor a readable exp: renew every minute
