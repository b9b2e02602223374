"""Every size limit the table's indexes enforce, found in the real PostgreSQL and checked at ingest.

PostgreSQL refuses an index entry over 2704 bytes (btree version 4, 8 kB pages). The store
reckons each entry's size (`store.index_entry_bytes`) so that ingest can refuse, naming the
field, what the table would refuse. Here the real boundary of each index is searched for by
inserting incompressible values into the real table, one byte at a time around it, and the
store's reckoning must give exactly that boundary: not below it (an event PostgreSQL would
take is refused), and never above it (an event answered 202 is dead-lettered).
"""

from __future__ import annotations

import dataclasses
import secrets
import string
import uuid
from datetime import UTC, datetime

import pytest
from pg8000.exceptions import DatabaseError

from openg2p_audit import store
from openg2p_audit.contract import Limits, check_event
from pipeline_support import audit_event

ALPHABET = string.ascii_letters + string.digits


def noise(n: int) -> str:
    """n bytes that neither pglz nor lz4 can compress, so the entry holds them as they are."""
    return "".join(secrets.choice(ALPHABET) for _ in range(n))


def _event(**columns: str | None) -> store.Row:
    values = {
        "id": f"limit-{uuid.uuid4()}",
        "occurred_at": store.month_bounds(store.month_of(datetime.now(UTC)))[0],
        "source": "/openg2p/limits",
        "type": "org.openg2p.limits.probe",
        "subject": None,
        "actor_type": "user",
        "actor_id": "officer-1",
        "resource_type": "beneficiary",
        "resource_id": "BEN-1",
        "action": "view",
        "outcome": "success",
        "reason": None,
        "trace_id": None,
        "details": None,
    }
    values.update(columns)
    return store.Row(**values)


def _fits(pg, row: store.Row) -> bool:
    """Whether the real table takes the row, and its conflict log a changed re-send of it."""
    changed = dataclasses.replace(row, action="edited")
    try:
        store.insert_events(pg, [row])
        assert store.insert_events(pg, [changed]).conflicts
    except DatabaseError as exc:
        assert store.sqlstate(exc) == "54000", exc  # program_limit_exceeded: index row size
        return False
    return True


def _real_boundary(pg, make, low: int, high: int) -> int:
    """The largest n for which the table takes make(n), by bisection between low and high."""
    assert _fits(pg, make(low)) and not _fits(pg, make(high))
    while high - low > 1:
        mid = (low + high) // 2
        if _fits(pg, make(mid)):
            low = mid
        else:
            high = mid
    return low


CASES = {
    # column (its event field) -> how the other values of the same index are set
    "actor_id": {},
    "type": {},
    "resource_type, no resource_id (a NULL in the entry)": {"resource_id": None},
    "resource_id": {},
    "id": {},
    "source": {},
}


@pytest.fixture(scope="module")
def schema(settings):
    conn = store.connect(settings)
    store.ensure_schema(conn, 1)
    yield conn
    conn.close()


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_stores_reckoning_is_postgresqls_boundary(schema, case):
    column = case.split(",")[0]
    others = CASES[case]

    def make(n: int) -> store.Row:
        return _event(**others, **{column: noise(n)})

    real = _real_boundary(schema, make, 100, 3000)
    sizes = {c: None if (v := getattr(make(1), c)) is None else len(v) for c in store.EVENT_FIELDS}
    # The strictest index holding the column decides (the key also keys the conflict log).
    reckoned = min(
        allowed
        for _index, col, allowed in store.oversized_indexes({**sizes, column: 3000})
        if col == column
    )
    assert reckoned == real, (case, reckoned, real)
    assert not store.oversized_indexes({**sizes, column: real})
    assert store.oversized_indexes({**sizes, column: real + 1})


def test_the_indexes_the_store_reckons_are_the_tables(schema):
    """INDEX_ENTRIES names every btree index on event values, with its key columns in order."""
    rows = schema.run(
        "SELECT i.relname, array_agg(a.attname::text ORDER BY k.ord)"
        " FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid"
        " CROSS JOIN LATERAL unnest(x.indkey) WITH ORDINALITY AS k(attnum, ord)"
        " JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum"
        " WHERE x.indrelid IN (to_regclass('audit_events'), to_regclass('audit_conflicts'))"
        " GROUP BY i.relname"
    )
    actual = {name: cols for name, cols in rows}
    reckoned = {name: [c for c, _ in layout] for name, layout in store.INDEX_ENTRIES.items()}
    text_columns = set(store.EVENT_FIELDS)
    holding_event_text = {name: cols for name, cols in actual.items() if text_columns & set(cols)}
    assert holding_event_text == reckoned


def test_ingest_checks_the_same_limits_naming_the_field():
    """The contract check plus the table's limits, as ingest runs them (no server needed)."""
    at_limit = audit_event(data={**audit_event()["data"], "actor": {"id": noise(2684)}})
    event, problems = check_event(at_limit, Limits())
    assert problems == [] and store.index_problems(event) == []
    over = audit_event(data={**audit_event()["data"], "actor": {"id": noise(2685)}})
    event, _ = check_event(over, Limits())
    [(field, message)] = store.index_problems(event)
    assert field == "data.actor.id"
    assert "at most 2684 bytes" in message
    # Multi-byte characters count as their UTF-8 bytes.
    wide = audit_event(data={**audit_event()["data"], "actor": {"id": "é" * 1343}})
    event, _ = check_event(wide, Limits())
    assert [f for f, _ in store.index_problems(event)] == ["data.actor.id"]
