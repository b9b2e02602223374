"""Denial of service against the query service, each bound tried over a real socket.

The query service runs as served (functions-framework `--asgi`), on the read-only role,
auditing through Kafka, with its bounds set low so that each is reached in seconds:

- the sign-in form: a huge declared body, or a chunked one that never ends, is answered
  413 at once, without the body being read;
- exports: a reader that stops reading, or one that reads slowly for too long, is cut
  off, and the REPEATABLE READ transaction it held is gone (pg_stat_activity);
- the pool: exports holding every connection make the next read a 503, never one more
  connection;
- the issuer's keys: stale, with the issuer hanging, new tokens are answered from the
  cache at once, with one fetch in flight, instead of each waiting 3 s behind one lock.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pg8000.native
import pytest

from ingest_support import end_offsets, request
from openg2p_audit import store
from openg2p_audit.auth import JwksCache, JwksUnavailable
from openg2p_audit.devservices import LocalFunction
from query_support import months_back, reader_role, url_with

APP = "openg2p-audit-query"
ROWS = 10_000  # 4 KiB of details each: an export of ~45 MB, far more than socket buffers hold
IDLE, LONGEST = 1.5, 5.0


@pytest.fixture(scope="module")
def reader(settings, topics, issuer):
    """The read-only role on a table holding ROWS large rows, trusting the module's issuer."""
    at = months_back(0) + timedelta(days=1)
    filler = "x" * 4096
    rows = [
        store.Row(
            id=f"big-{i:05d}", occurred_at=at + timedelta(seconds=i), source="/openg2p/registry",
            type="org.openg2p.registry.beneficiary.viewed", subject=None, actor_type="user",
            actor_id=f"officer-{i % 7}", resource_type="beneficiary", resource_id=f"B{i}",
            action="view", outcome="success", reason=None, trace_id=None,
            details=json.dumps({"context": {"blob": filler}}),
        )
        for i in range(ROWS)
    ]  # fmt: skip
    conn = pg8000.native.Connection(**settings.pg_connect_kwargs)
    try:
        store.ensure_schema(conn, 2)
        for start in range(0, ROWS, 2000):
            store.insert_events(conn, rows[start : start + 2000])
    finally:
        conn.close()
    role = reader_role(settings, f"audit_limits_{uuid.uuid4().hex[:8]}")
    return role.model_copy(update={"auth_issuer": issuer.url, "auth_jwks_url": issuer.jwks_url})


def _serve(reader, workdir, **env: Any) -> LocalFunction:
    settings = reader.model_copy(update=env)
    return LocalFunction("query", "query", settings, workdir).start()


@pytest.fixture(scope="module")
def service(reader, tmp_path_factory):
    fn = _serve(reader, tmp_path_factory.mktemp("query-limits"), query_export_idle_seconds=IDLE,
                query_export_max_seconds=LONGEST)  # fmt: skip
    yield fn
    fn.stop()


def _range() -> dict[str, str]:
    start = months_back(0)
    return {"from": start.isoformat(), "to": (start + timedelta(days=40)).isoformat()}


def _bearer(issuer, *roles: str) -> str:
    return f"Bearer {issuer.mint(f'inv-{uuid.uuid4().hex[:6]}', roles or ('audit.read',))}"


def _connect(url: str, rcvbuf: int | None = None) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect((host, int(port)))
    sock.settimeout(10)
    return sock


def _head(sock: socket.socket) -> bytes:
    """Read up to the end of the response's headers (and whatever came with them)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def _open_export(service, issuer, rcvbuf: int = 4096) -> socket.socket:
    sock = _connect(service.url, rcvbuf)
    path = url_with(service.url, "/v1/audit/export", _range()).removeprefix(service.url)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: "
                 f"{_bearer(issuer, 'audit.read', 'audit.export')}\r\n\r\n".encode())  # fmt: skip
    head = _head(sock)
    assert head.startswith(b"HTTP/1.1 200"), head[:300]
    return sock


def _drain(sock: socket.socket, pace: float = 0.0, piece: int = 65536) -> tuple[bytes, float]:
    """Read until the server closes the connection; the tail of what came, and how long."""
    started, tail = time.monotonic(), b""
    sock.settimeout(30)
    while True:
        chunk = sock.recv(piece)
        if not chunk:
            return tail, time.monotonic() - started
        tail = (tail + chunk)[-64:]
        if pace:
            time.sleep(pace)


def _in_transaction(settings) -> list:
    """The query service's sessions holding a transaction (an export's snapshot)."""
    conn = pg8000.native.Connection(**settings.pg_connect_kwargs)
    try:
        return conn.run(
            "SELECT pid, state, now() - xact_start FROM pg_stat_activity WHERE application_name"
            " = :a AND datname = current_database() AND xact_start IS NOT NULL", a=APP,
        )  # fmt: skip
    finally:
        conn.close()


def _sessions(settings) -> int:
    conn = pg8000.native.Connection(**settings.pg_connect_kwargs)
    try:
        return conn.run(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = :a"
            " AND datname = current_database()", a=APP,
        )[0][0]  # fmt: skip
    finally:
        conn.close()


def _until(predicate, timeout: float, step: float = 0.1) -> float:
    """Seconds until `predicate()` held; AssertionError after `timeout`."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"still not so after {timeout} s")
        time.sleep(step)
    return time.monotonic() - started


# ------------------------------------------------------------------ the sign-in form

FORM_HEAD = (
    b"POST /ui/token HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
)


def test_a_huge_declared_sign_in_body_is_refused_before_it_is_read(service):
    sock = _connect(service.url)
    started = time.monotonic()
    sock.sendall(FORM_HEAD + b"Content-Length: 100663296\r\n\r\n")
    sock.settimeout(5)
    head = _head(sock)  # not a byte of the 96 MiB was sent
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    assert b"connection: close" in head.lower()
    assert time.monotonic() - started < 3
    sock.close()


def test_a_chunked_sign_in_body_is_read_only_up_to_the_bound(service):
    sock = _connect(service.url)
    sock.sendall(FORM_HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
    piece = b"token=" + b"a" * 8186
    for _ in range(5):  # 40 KiB of an endless body, then nothing more
        sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
    sock.settimeout(5)
    head = _head(sock)
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    sock.close()


def test_a_small_sign_in_form_is_still_read(service, issuer):
    from urllib.parse import urlencode

    form = {"Content-Type": "application/x-www-form-urlencoded"}
    good = urlencode({"token": issuer.mint("reader", ("audit.read",))})
    assert request(service.url, "/ui/token", good, form).status == 303
    assert request(service.url, "/ui/token", "token=nonsense", form).status == 401


# ------------------------------------------------------------------ exports


def test_a_reader_that_stops_reading_loses_its_snapshot(service, settings, issuer):
    sock = _open_export(service, issuer)
    assert _in_transaction(settings), "the export holds its REPEATABLE READ snapshot"
    # Nothing more is read: within the idle bound (plus the batch being fetched) it is let go.
    took = _until(lambda: not _in_transaction(settings), IDLE + 8)
    assert took < IDLE + 8
    tail, _ = _drain(sock)
    assert not tail.endswith(b"0\r\n\r\n")  # cut mid-body: no last chunk, not a short "whole"
    sock.close()
    assert "export ended before its last row" in service.log_text()


def test_a_slow_steady_reader_is_cut_at_the_longest_export(service, settings, issuer):
    sock = _open_export(service, issuer, rcvbuf=65536)
    started = time.monotonic()
    tail, _ = _drain(sock, pace=0.02)  # ~3 MB/s: well inside the idle bound, too slow overall
    took = time.monotonic() - started
    assert not tail.endswith(b"0\r\n\r\n")
    assert LONGEST - 1 < took < LONGEST + 5, took
    _until(lambda: not _in_transaction(settings), 5)
    sock.close()


def test_a_reader_that_keeps_up_gets_every_row(service, issuer):
    conn = http.client.HTTPConnection(service.url.removeprefix("http://").split(":")[0],
                                      int(service.url.rsplit(":", 1)[1]), timeout=60)  # fmt: skip
    params = {**_range(), "actor_id": "officer-3"}
    path = url_with(service.url, "/v1/audit/export", params).removeprefix(service.url)
    conn.request("GET", path, headers={"Authorization": _bearer(issuer, "audit.read",
                                                                "audit.export")})  # fmt: skip
    resp = conn.getresponse()
    body = resp.read()  # raises IncompleteRead if the export were cut
    conn.close()
    assert resp.status == 200
    assert (
        len(body.splitlines())
        == int(resp.getheader("X-Audit-Export-Rows"))
        == len(range(3, ROWS, 7))
    )


# ------------------------------------------------------------------ the pool


@pytest.fixture(scope="module")
def patient(reader, tmp_path_factory):
    """Exports that wait long for their readers, and a pool of three."""
    fn = _serve(reader, tmp_path_factory.mktemp("query-pool"), query_export_idle_seconds=60,
                query_export_max_seconds=120, query_db_pool_size=3)  # fmt: skip
    yield fn
    fn.stop()


def test_exports_holding_the_pool_make_the_next_read_a_503(patient, settings, issuer):
    service = patient
    others = _sessions(settings)  # the other query service's connections (same database)
    held = [_open_export(service, issuer) for _ in range(3)]  # the pool's 3 connections
    try:
        assert len(_in_transaction(settings)) == 3
        before = end_offsets(settings.kafka_bootstrap_servers, settings.kafka_events_topic)
        started = time.monotonic()
        reply = request(service.url, url_with(service.url, "/v1/audit/events", _range())
                        .removeprefix(service.url), method="GET",
                        headers={"Authorization": _bearer(issuer)})  # fmt: skip
        assert reply.status == 503, reply.body
        assert reply.json["cause"] == "database_busy" and reply.headers["retry-after"]
        assert time.monotonic() - started < 3
        assert _sessions(settings) - others == 3  # never a fourth connection
        # Refused before the read: nothing read, nothing audited.
        assert end_offsets(settings.kafka_bootstrap_servers, settings.kafka_events_topic) == before
    finally:
        for sock in held:
            sock.close()
    # The exports' clients went away: their connections come back, and reads are answered.
    ok = url_with(service.url, "/v1/audit/events", {**_range(), "limit": "1"})
    ok = ok.removeprefix(service.url)

    def answered() -> bool:
        reply = request(service.url, ok, method="GET", headers={"Authorization": _bearer(issuer)})
        return reply.status == 200

    _until(answered, 15, 0.3)


# ------------------------------------------------------------------ the issuer's keys


class _Jwks:
    """The issuer's JWKS endpoint, which can be made to hang (accept, then never answer)."""

    def __init__(self, issuer):
        self.issuer, self.hang = issuer, threading.Event()
        self.requests = self.active = self.most_active = 0
        self._lock = threading.Lock()
        jwks = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                pass

            def do_GET(self) -> None:
                with jwks._lock:
                    jwks.requests += 1
                    jwks.active += 1
                    jwks.most_active = max(jwks.most_active, jwks.active)
                try:
                    if jwks.hang.is_set():
                        time.sleep(8)  # longer than any fetch waits
                        return
                    body = json.dumps(jwks.issuer.jwks()).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                finally:
                    with jwks._lock:
                        jwks.active -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_stale_keys_with_the_issuer_down_answer_new_tokens_at_once(reader, issuer, tmp_path):
    jwks = _Jwks(issuer)
    fn = _serve(reader, tmp_path, auth_jwks_url=jwks.url, auth_jwks_cache_seconds=10)
    try:
        path = url_with(fn.url, "/v1/audit/events", {**_range(), "limit": "1"})
        path = path.removeprefix(fn.url)

        def read() -> tuple[int, float]:
            started = time.monotonic()
            reply = request(fn.url, path, method="GET", headers={"Authorization": _bearer(issuer)},
                            timeout=30)  # fmt: skip
            return reply.status, time.monotonic() - started

        assert read()[0] == 200 and jwks.requests == 1
        jwks.hang.set()
        time.sleep(10.5)  # the keys are stale now, and the issuer does not answer
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: read(), range(8)))  # eight new tokens at once
        assert [status for status, _ in answers] == [200] * 8
        assert max(took for _, took in answers) < 2.0, answers  # not 3 s each, one after another
        assert jwks.most_active == 1 and jwks.requests == 2  # one fetch in flight, for all
        time.sleep(3.5)  # that fetch gave up; the next is not tried before the refresh interval
        status, took = read()
        assert status == 200 and took < 1.0 and jwks.requests == 2
    finally:
        fn.stop()
        jwks.stop()


def test_stale_keys_are_trusted_only_so_long(issuer):
    """Past AUTH_JWKS_MAX_STALE_SECONDS a known key is no longer used: 503, and at once while
    the issuer is known to be down."""
    jwks = _Jwks(issuer)
    try:
        cache = JwksCache(jwks.url, cache_seconds=0.3, max_stale_seconds=1.0)
        cache.min_refresh_seconds = 30
        assert cache.key(issuer.kid) is not None
        jwks.hang.set()
        time.sleep(0.5)
        started = time.monotonic()
        assert cache.key(issuer.kid) is not None  # stale, within the bound: at once
        assert time.monotonic() - started < 0.2
        time.sleep(1.0)  # past the bound; the background fetch is still hanging
        with pytest.raises(JwksUnavailable):
            cache.key(issuer.kid)
        started = time.monotonic()
        with pytest.raises(JwksUnavailable):  # the fetch failed: fail fast until retry time
            cache.key(issuer.kid)
        assert time.monotonic() - started < 0.2
        assert jwks.most_active == 1
    finally:
        jwks.stop()
