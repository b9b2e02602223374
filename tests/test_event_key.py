"""The table's key is (id, source, occurred_at): CloudEvents identifies an event by source + id.

Against the real PostgreSQL: a table made with the seed's key (id, occurred_at) is migrated
in place by the schema step, keeping its rows and its conflict log; afterwards two sources
that happen to use the same id and time are two rows, and each source's re-sends are still
duplicates of its own row.
"""

from __future__ import annotations

import json

from openg2p_audit import store
from test_writer import make_event

# The schema as it was before `source` joined the key: the seed's (id, occurred_at).
_OLD_TABLE = """
CREATE TABLE audit_events (
    id text NOT NULL, occurred_at timestamptz NOT NULL, source text NOT NULL,
    type text NOT NULL, subject text, actor_type text NOT NULL, actor_id text NOT NULL,
    resource_type text, resource_id text, action text NOT NULL, outcome text NOT NULL,
    reason text, trace_id text, details jsonb,
    ingested_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (id, occurred_at)
) PARTITION BY RANGE (occurred_at)
"""
_OLD_CONFLICTS = """
CREATE TABLE audit_conflicts (
    id text NOT NULL, occurred_at timestamptz NOT NULL, incoming_hash bytea NOT NULL,
    stored_hash bytea NOT NULL, incoming jsonb NOT NULL,
    first_seen timestamptz NOT NULL DEFAULT now(), last_seen timestamptz NOT NULL DEFAULT now(),
    count bigint NOT NULL DEFAULT 1,
    PRIMARY KEY (id, occurred_at, incoming_hash)
)
"""


def _key(pg, table: str) -> list[str]:
    return pg.run(store._KEY_COLUMNS, table=table)[0][0]


def _fresh(pg) -> None:
    pg.run("DROP TABLE IF EXISTS audit_events CASCADE")
    pg.run("DROP TABLE IF EXISTS audit_conflicts")
    store.forget_partitions(pg)


def test_a_table_with_the_seeds_key_is_migrated_in_place(pg):
    _fresh(pg)
    pg.run(_OLD_TABLE)
    pg.run(_OLD_CONFLICTS)
    kept = make_event(source="/openg2p/registry")
    store.ensure_partition(pg, store.month_of(kept.time))
    row = store.event_to_row(kept)
    pg.run(
        f"INSERT INTO audit_events ({', '.join(store.COLUMNS)})"
        f" VALUES ({', '.join(':' + c for c in store.COLUMNS)})",
        **{c: getattr(row, c) for c in store.COLUMNS},
    )
    incoming = {"id": kept.id, "source": kept.source, "action": "other"}
    pg.run(
        "INSERT INTO audit_conflicts (id, occurred_at, incoming_hash, stored_hash, incoming)"
        " VALUES (:i, :o, :h, :h, :inc::jsonb)",
        i=kept.id, o=kept.time, h=b"\x01" * 32, inc=json.dumps(incoming),
    )  # fmt: skip
    assert _key(pg, "audit_events") == ["id", "occurred_at"]

    store.ensure_schema(pg)

    assert _key(pg, "audit_events") == ["id", "source", "occurred_at"]
    assert _key(pg, "audit_conflicts") == ["id", "source", "occurred_at", "incoming_hash"]
    assert pg.run("SELECT id, source FROM audit_events") == [[kept.id, kept.source]]
    # The conflict log learnt each entry's source from the incoming row it kept.
    assert pg.run("SELECT id, source FROM audit_conflicts") == [[kept.id, kept.source]]
    # The partition's own index follows the parent's key.
    (partition,) = store.list_partitions(pg).values()
    assert _key(pg, partition) == ["id", "source", "occurred_at"]

    # Idempotent: a second schema step finds nothing to migrate.
    store.ensure_schema(pg)
    assert _key(pg, "audit_events") == ["id", "source", "occurred_at"]

    # After the migration the same id and time from another source is another event.
    other = make_event(id=kept.id, time=kept.time_rfc3339, source="/openg2p/payments")
    result = store.insert_events(pg, [other, kept])
    assert (result.inserted, result.duplicates, result.new) == (1, 1, (True, False))
    assert pg.run("SELECT source FROM audit_events ORDER BY source") == [
        ["/openg2p/payments"],
        ["/openg2p/registry"],
    ]


def test_the_same_id_and_time_from_two_sources_are_two_rows(pg):
    _fresh(pg)
    store.ensure_schema(pg)
    first = make_event(source="/openg2p/registry")
    second = make_event(id=first.id, time=first.time_rfc3339, source="/openg2p/auth")
    assert store.insert_events(pg, [first]).new == (True,)
    assert store.insert_events(pg, [second]).new == (True,)
    # Each source's own re-send is a duplicate of its own row; a changed one is a conflict
    # recorded under its own source.
    changed = make_event(
        id=first.id, time=first.time_rfc3339, source="/openg2p/auth",
        data={"actor": {"id": "user-9"}, "action": "login", "outcome": "failure"},
    )  # fmt: skip
    again = store.insert_events(pg, [first, second, changed])
    assert (again.inserted, again.duplicates) == (0, 3)
    assert [(c.id, c.source) for c in again.conflicts] == [(first.id, "/openg2p/auth")]
    assert pg.run("SELECT count(*) FROM audit_events WHERE id = :i", i=first.id) == [[2]]
    assert pg.run("SELECT source FROM audit_conflicts") == [["/openg2p/auth"]]
