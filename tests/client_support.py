"""What the emitter client's tests against the real stack need besides the pipeline.

`TokenEndpoint` is a Keycloak-style OAuth2 token endpoint (client credentials,
HTTP Basic) that mints its tokens with the pipeline's local issuer, so ingest
verifies them as it verifies Keycloak's. `EMITTER` is a service process that
emits through an outbox and prints each id once `emit` has returned, so a test
can SIGKILL it mid-stream and know which events were promised.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote

from openg2p_audit.devservices.issuer import LocalIssuer

REGISTRY = "openg2p-registry"  # a client the ConfigMap's source policy names
SECRET = "registry-secret"


class TokenEndpoint:
    """POST …/protocol/openid-connect/token with grant_type=client_credentials."""

    def __init__(self, issuer: LocalIssuer, lifetime: int = 300):
        self.issuer = issuer
        self.lifetime = lifetime
        self.issued: list[str] = []
        # Audiences of the next tokens, first in first out (a wrong one: ingest answers 401).
        self.audiences: list[str] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                pass

            def do_POST(self) -> None:
                form = parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
                status, doc = endpoint.answer(self.headers.get("Authorization", ""), form)
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{port}/realms/openg2p/protocol/openid-connect/token"

    def answer(self, authorization: str, form: dict[str, list[str]]) -> tuple[int, dict]:
        if form.get("grant_type") != ["client_credentials"]:
            return 400, {"error": "unsupported_grant_type"}
        try:
            pair = base64.b64decode(authorization.removeprefix("Basic ")).decode()
            client_id, secret = (unquote(p) for p in pair.split(":", 1))
        except ValueError:
            return 401, {"error": "invalid_client"}
        if (client_id, secret) != (REGISTRY, SECRET):
            return 401, {"error": "invalid_client", "error_description": "bad credentials"}
        audience = self.audiences.pop(0) if self.audiences else self.issuer.audience
        token = self.issuer.mint(
            f"service-account-{client_id}", (), lifetime=self.lifetime, azp=client_id,
            aud=audience,
        )  # fmt: skip
        self.issued.append(token)
        return 200, {"access_token": token, "expires_in": self.lifetime, "token_type": "Bearer"}

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# argv: URL TOKEN OUTBOX COUNT PREFIX. Emits COUNT events (none: only resumes), printing each
# id after emit returned, then flushes for up to 120 s and prints "flushed" or "left N".
EMITTER = r"""
import sys
from openg2p_audit_client import AuditClient

url, token, outbox, count, prefix = sys.argv[1:6]
client = AuditClient(url, token, outbox, backoff_max=1.0)
for i in range(int(count)):
    event_id = client.emit(
        "org.openg2p.registry.beneficiary.viewed", "/openg2p/registry", actor="officer-17",
        action="view", outcome="success", resource={"type": "beneficiary", "id": f"BEN-{i}"},
        subject=f"beneficiary/BEN-{i}", id=f"{prefix}-{i:05d}",
    )
    print(event_id, flush=True)
print("flushed" if client.flush(120) else f"left {client.metrics()['outbox_events']}", flush=True)
client.close()
"""
