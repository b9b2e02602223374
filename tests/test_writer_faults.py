"""The writer when PostgreSQL goes away, and when several writers start on an empty database."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import pg8000.native
import pytest

from attestation_support import record as encode
from conftest import _new_database
from function_server import request, settings_env
from kafkasource import binary_delivery
from openg2p_audit import store
from openg2p_audit.devservices import LocalFunction, LocalPostgres
from test_writer import make_event

pytestmark = pytest.mark.faults


def deliver(server, event):
    headers, body = binary_delivery(encode(event))
    return request(server.url, "POST", "/", body, headers)


def stored_ids(url: str) -> set[str]:
    conn = pg8000.native.Connection(**_kwargs(url))
    try:
        return {r[0] for r in conn.run("SELECT id FROM audit_events")}
    finally:
        conn.close()


def _kwargs(url: str) -> dict:
    from openg2p_audit.settings import Settings

    return Settings(database_url=url).pg_connect_kwargs


@pytest.fixture
def own_postgres(tmp_path):
    """A PostgreSQL of this test's own, so stopping it leaves the session's server alone."""
    server = LocalPostgres(tmp_path / "pg").start()
    yield server
    server.stop()


def test_postgres_down_gives_503_and_restart_loses_nothing(settings, own_postgres, tmp_path):
    url = own_postgres.create_database("audit")
    env = settings_env(settings.model_copy(update={"database_url": url, "writer_wait_seconds": 20}))
    with LocalFunction("writer", "write", None, tmp_path, env=env) as writer:
        before = make_event()
        assert deliver(writer, before)[0] == 201

        own_postgres.stop()
        during = [make_event() for _ in range(3)]
        for event in during:
            status, body, headers = deliver(writer, event)
            assert status == 503, body
            assert body["error"] == "database_unavailable"
            assert headers.get("Retry-After") == "1"
        assert request(writer.url, "GET", "/readyz")[0] == 503
        assert request(writer.url, "GET", "/healthz")[0] == 200  # alive, just not ready

        own_postgres.start()
        # The KafkaSource redelivers what got 503: the very next delivery succeeds.
        assert deliver(writer, during[0])[0] == 201
        for event in during[1:]:
            assert deliver(writer, event)[0] == 201
        after = make_event()
        assert deliver(writer, after)[0] == 201
        assert request(writer.url, "GET", "/readyz")[0] == 200

    assert stored_ids(url) == {e.id for e in [before, *during, after]}


def test_postgres_down_at_start_gives_503_until_it_is_up(settings, own_postgres, tmp_path):
    url = own_postgres.create_database("audit")
    own_postgres.stop()
    env = settings_env(settings.model_copy(update={"database_url": url}))
    with LocalFunction("writer", "write", None, tmp_path, env=env) as writer:
        event = make_event()
        assert deliver(writer, event)[0] == 503
        assert request(writer.url, "GET", "/readyz")[0] == 503
        own_postgres.start()
        assert deliver(writer, event)[0] == 201
    assert stored_ids(url) == {event.id}


def test_two_writers_starting_together_on_an_empty_database(
    settings, base_settings, postgres_server, tmp_path
):
    url = _new_database(base_settings, postgres_server, f"empty_{uuid.uuid4().hex[:8]}")
    env = settings_env(settings.model_copy(update={"database_url": url}))
    servers = [
        LocalFunction("writer", "write", None, tmp_path, env=env, log_path=tmp_path / f"w{i}.log")
        for i in range(2)
    ]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda s: s.start(), servers))
    try:
        events = [make_event() for _ in range(8)]
        # Both writers' first requests (which create the schema) arrive at the same moment.
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda i: deliver(servers[i % 2], events[i])[0], range(8)))
        assert statuses == [201] * 8
    finally:
        for s in servers:
            s.stop()
    assert stored_ids(url) == {e.id for e in events}
    conn = pg8000.native.Connection(**_kwargs(url))
    try:
        indexes = {r[0] for r in conn.run("SELECT indexname FROM pg_indexes WHERE tablename = :t",
                                          t=store.TABLE)}  # fmt: skip
    finally:
        conn.close()
    assert indexes == {"audit_events_pkey", *store.PARENT_INDEXES}
