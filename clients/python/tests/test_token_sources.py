"""Token sources: a Keycloak-style token endpoint over real HTTP, files, callables."""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

import pytest

from openg2p_audit_client import (
    CallableToken,
    ClientCredentials,
    StaticToken,
    TokenError,
    TokenFile,
)
from openg2p_audit_client.tokens import token_source


class TokenEndpoint:
    """POST /token: client credentials in, `access_token` + `expires_in` out."""

    def __init__(self, expires_in: int | None = 300, status: int = 200):
        self.expires_in = expires_in
        self.status = status
        self.seen: list[tuple[dict, dict]] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"])).decode()
                endpoint.seen.append((dict(self.headers), parse_qs(body)))
                doc = {"access_token": f"tok-{len(endpoint.seen)}", "token_type": "Bearer"}
                if endpoint.status != 200:
                    doc = {"error": "unauthorized_client", "error_description": "bad secret"}
                elif endpoint.expires_in is not None:
                    doc["expires_in"] = endpoint.expires_in
                out = json.dumps(doc).encode()
                self.send_response(endpoint.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/token"

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint():
    ep = TokenEndpoint()
    yield ep
    ep.stop()


def test_client_credentials_grant_as_keycloak_takes_it(endpoint):
    source = ClientCredentials(endpoint.url, "openg2p-registry", "s3cr:et&", scope="audit")
    assert source.token() == "tok-1"
    headers, form = endpoint.seen[0]
    assert form == {"grant_type": ["client_credentials"], "scope": ["audit"]}
    basic = base64.b64decode(headers["Authorization"].removeprefix("Basic ")).decode()
    assert basic == "openg2p-registry:s3cr%3Aet%26"  # RFC 6749 2.3.1: form-encoded first
    assert "s3cr" not in repr(source)


def test_client_secret_post_puts_the_credentials_in_the_form(endpoint):
    source = ClientCredentials(endpoint.url, "c", "s", auth_method="client_secret_post")
    source.token()
    headers, form = endpoint.seen[0]
    assert "Authorization" not in headers
    assert form["client_id"] == ["c"] and form["client_secret"] == ["s"]


def test_the_token_is_cached_until_shortly_before_expiry(endpoint):
    endpoint.expires_in = 2  # margin: a tenth of the lifetime, 0.2 s
    source = ClientCredentials(endpoint.url, "c", "s")
    assert source.token() == source.token() == "tok-1"
    time.sleep(1.5)
    assert source.token() == "tok-1"
    time.sleep(0.45)
    assert source.token() == "tok-2"
    assert source.fetches == 2


def test_invalidate_fetches_a_new_token(endpoint):
    source = ClientCredentials(endpoint.url, "c", "s")
    assert source.token() == "tok-1"
    source.invalidate()
    assert source.token() == "tok-2"


def test_without_expires_in_the_jwts_exp_decides(endpoint):
    endpoint.expires_in = None
    exp = int(time.time()) + 100
    payload = base64.urlsafe_b64encode(json.dumps({"exp": exp}).encode()).rstrip(b"=").decode()
    from openg2p_audit_client.tokens import _jwt_lifetime

    assert 98 <= _jwt_lifetime(f"e30.{payload}.sig") <= 100
    assert _jwt_lifetime("opaque") == 60.0


def test_a_refusing_token_endpoint_is_a_token_error_with_its_body(endpoint):
    endpoint.status = 401
    with pytest.raises(TokenError, match="answered 401") as err:
        ClientCredentials(endpoint.url, "c", "wrong").token()
    assert json.loads(err.value.body)["error"] == "unauthorized_client"
    with pytest.raises(TokenError, match="unreachable"):
        ClientCredentials("http://127.0.0.1:9/token", "c", "s", timeout=1).token()


def test_a_token_file_is_reread_when_it_changes(tmp_path):
    # The kubelet writes a new file and swaps it in: a new inode under the same name.
    path = tmp_path / "token"
    path.write_text("first\n")
    source = TokenFile(path)
    assert source.token() == source.token() == "first"
    assert source.reads == 1
    fresh = tmp_path / "token.new"
    fresh.write_text("second")
    os.replace(fresh, path)
    assert source.token() == "second" and source.reads == 2
    source.invalidate()
    assert source.token() == "second" and source.reads == 3
    path.unlink()
    with pytest.raises(TokenError, match="token file"):
        source.token()


def test_what_token_source_accepts():
    assert isinstance(token_source("t"), StaticToken)
    assert isinstance(token_source(lambda: "t"), CallableToken)
    assert token_source(None) is None
    with pytest.raises(TypeError):
        token_source(42)
    with pytest.raises(TokenError):
        CallableToken(lambda: "").token()
