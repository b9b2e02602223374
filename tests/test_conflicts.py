"""A re-send with a stored key but other content: recorded, counted, logged, never applied.

Through the real writer (functions-framework, group commit) and the one insert
path, against the real PostgreSQL.
"""

from __future__ import annotations

import logging

import pytest

from function_server import request
from openg2p_audit import integrity, query, store
from openg2p_audit.devservices import LocalFunction
from test_writer import deliver, make_event


@pytest.fixture(scope="module")
def writer(settings, tmp_path_factory):
    server = LocalFunction("writer", "write", settings, tmp_path_factory.mktemp("writer"))
    with server:
        yield server


def _conflicts(pg):
    return pg.run(
        "SELECT id, stored_hash, incoming, count, first_seen <= last_seen FROM audit_conflicts"
        " ORDER BY first_seen"
    )


def _metric(writer) -> float:
    _status, body, _ = request(writer.url, "GET", "/metrics")
    text = body if isinstance(body, str) else body.decode()
    for line in text.splitlines():
        if line.startswith("audit_writer_conflicts_total "):
            return float(line.split()[1])
    return 0.0


def test_a_different_payload_is_recorded_and_the_stored_row_is_untouched(writer, pg):
    original = make_event()
    assert deliver(writer, original)[0] == 201
    before = pg.run(f"SELECT {query._JSON_LINE} FROM audit_events WHERE id = :id", id=original.id)
    # Identical re-sends stay silent.
    assert deliver(writer, original)[0] == 200
    assert _conflicts(pg) == []
    assert _metric(writer) == 0

    data = {"actor": {"id": "user-2", "type": "user"}, "action": "login", "outcome": "success"}
    changed = make_event(id=original.id, data=data)
    for _ in range(2):
        status, body, _ = deliver(writer, changed)
        assert status == 200 and body["status"] == "duplicate"

    after = pg.run(f"SELECT {query._JSON_LINE} FROM audit_events WHERE id = :id", id=original.id)
    assert after == before  # the first version stays
    [(cid, stored_hash, incoming, count, ordered)] = _conflicts(pg)
    assert cid == original.id and count == 2 and ordered
    assert incoming["actor_id"] == "user-2"
    assert bytes(stored_hash) == integrity.leaf_hash(before[0][0])
    assert _metric(writer) == 2


def test_insert_events_reports_and_logs_the_conflict(settings, pg, caplog):
    conn = store.connect(settings)
    try:
        store.ensure_schema(conn)
        row = store.event_to_row(make_event())
        store.insert_events(conn, [row])
        same_details = store.insert_events(conn, [row])
        assert same_details.duplicates == 1 and same_details.conflicts == ()
        other = store.Row(**{**{c: getattr(row, c) for c in store.COLUMNS}, "reason": "edited"})
        with caplog.at_level(logging.WARNING, logger="openg2p_audit.store"):
            # Within one call too: the first of two versions is stored, the second recorded.
            fresh = store.event_to_row(make_event())
            twin = store.Row(**{**{c: getattr(fresh, c) for c in store.COLUMNS},
                                "action": "logout"})  # fmt: skip
            result = store.insert_events(conn, [other, fresh, twin])
    finally:
        conn.close()
    assert result.inserted == 1 and result.duplicates == 2
    assert sorted(c.id for c in result.conflicts) == sorted([row.id, fresh.id])
    assert sum("conflicting re-send" in r.getMessage() for r in caplog.records) == 2
