"""A local token issuer for `dev up` and the tests: a generated key and its JWKS.

Development tooling only. In a deployment the issuer is the OIDC provider
(Keycloak); here a person must still be able to try the query service with one
command, and the tests must be able to forge every kind of bad token. Tokens
are minted with PyJWT and look like Keycloak's: roles under `realm_access.roles`.

`dev up` serves the JWKS from the eventing runner's endpoint and writes the
issuer's state (URL, audience, key file) to the cache folder, from where
`openg2p-audit token` mints tokens. Nothing else can use the key: the state
names a 127.0.0.1 issuer, and the query service of a real deployment trusts
only its own issuer's keys.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ._process import cache_dir

JWKS_PATH = "/jwks.json"
STATE_FILE = "dev-issuer.json"


def state_path() -> Path:
    """Where `dev up` leaves the running issuer's state for `openg2p-audit token`."""
    return cache_dir() / STATE_FILE


class LocalIssuer:
    """An RSA key, its JWKS, and tokens signed with it for one issuer URL and audience."""

    def __init__(
        self, url: str | None = None, audience: str = "openg2p-audit",
        key: rsa.RSAPrivateKey | None = None,
    ):  # fmt: skip
        self.url = url
        self.audience = audience
        self.key = key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = f"local-{uuid.uuid4().hex[:12]}"
        self._server: ThreadingHTTPServer | None = None
        self.jwks_requests = 0  # how often the JWKS was fetched (tests count refreshes)

    # -- keys --------------------------------------------------------------

    def jwks(self) -> dict[str, Any]:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        jwk.update({"kid": self.kid, "use": "sig", "alg": "RS256"})
        return {"keys": [jwk]}

    def rotate(self) -> None:
        """A new key under a new key id, as an issuer's key rotation does."""
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = f"local-{uuid.uuid4().hex[:12]}"

    def public_pem(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def private_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def jwks_url(self) -> str:
        assert self.url, "issuer has no URL yet"
        return self.url + JWKS_PATH

    # -- tokens ------------------------------------------------------------

    def claims(
        self, subject: str = "investigator", roles: tuple[str, ...] = ("audit.read",),
        lifetime: int = 3600, **extra: Any,
    ) -> dict[str, Any]:  # fmt: skip
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.url,
            "aud": self.audience,
            "sub": subject,
            "iat": now,
            "nbf": now,
            "exp": now + lifetime,
            "preferred_username": subject,
            "realm_access": {"roles": list(roles)},
        }
        claims.update(extra)
        return claims

    def sign(self, claims: dict[str, Any], headers: dict[str, Any] | None = None) -> str:
        return jwt.encode(
            claims, self.key, algorithm="RS256", headers={"kid": self.kid, **(headers or {})}
        )

    def mint(self, subject: str = "investigator", roles: tuple[str, ...] = ("audit.read",),
             lifetime: int = 3600, **extra: Any) -> str:  # fmt: skip
        return self.sign(self.claims(subject, roles, lifetime, **extra))

    def verify(self, token: str, audience: str) -> dict[str, Any]:
        """The claims of a token this issuer signed for `audience`; jwt.InvalidTokenError
        otherwise (the local runner's Broker and KafkaSink ingress check tokens with it)."""
        return jwt.decode(
            token, self.key.public_key(), algorithms=["RS256"], audience=audience,
            issuer=self.url, options={"require": ["exp", "iss", "aud", "sub"]},
        )  # fmt: skip

    # -- serving the JWKS on its own (tests); dev up serves it from the runner -----

    def serve(self) -> LocalIssuer:
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                pass

            def do_GET(self) -> None:
                status, body = issuer.answer(self.path)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/issuer"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def answer(self, path: str) -> tuple[int, bytes]:
        """The issuer's GET endpoints under its URL: the JWKS and a discovery document."""
        sub = path.split("?", 1)[0].removeprefix("/issuer")
        if sub == JWKS_PATH:
            self.jwks_requests += 1
            return 200, json.dumps(self.jwks()).encode()
        if sub == "/.well-known/openid-configuration":
            doc = {"issuer": self.url, "jwks_uri": self.jwks_url}
            return 200, json.dumps(doc).encode()
        return 404, b'{"error":"not found"}'

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- state for `openg2p-audit token` ------------------------------------------

    def save_state(self, path: Path | None = None) -> Path:
        path = path or state_path()
        key_path = path.with_suffix(".pem")
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.private_pem())
        state = {"issuer": self.url, "audience": self.audience, "kid": self.kid,
                 "key": str(key_path), "pid": os.getpid()}  # fmt: skip
        path.write_text(json.dumps(state, indent=2))
        return path

    @classmethod
    def from_state(cls, path: Path | None = None) -> LocalIssuer:
        """The issuer `dev up` is running; FileNotFoundError/ValueError when there is none."""
        path = path or state_path()
        state = json.loads(path.read_text())
        url = state["issuer"]
        if not url.startswith("http://127.0.0.1:"):
            raise ValueError(f"{path} names a non-local issuer {url!r}")
        key = serialization.load_pem_private_key(Path(state["key"]).read_bytes(), None)
        assert isinstance(key, rsa.RSAPrivateKey)
        issuer = cls(url, state["audience"], key)
        issuer.kid = state["kid"]
        return issuer

    @staticmethod
    def forget_state(path: Path | None = None) -> None:
        path = path or state_path()
        for p in (path, path.with_suffix(".pem")):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
