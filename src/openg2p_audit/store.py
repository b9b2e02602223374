"""The audit store: one monthly-partitioned PostgreSQL table, written idempotently.

The schema lives here as idempotent DDL run at start (the OpenG2P convention:
no migration tool). Common investigation queries need no JSON operators: the
CloudEvents envelope, actor, resource, action, outcome and reason are flat
columns; `details` holds only what an event type adds, and is NULL for plain
events so it costs nothing for the common case.

Every writer of rows (the HTTP writer, the bulk replay, the DLQ redrive) goes
through `insert_events`, so there is one definition of "stored": a row keyed
by (id, source, occurred_at), inserted with ON CONFLICT DO NOTHING, in a
committed transaction. Redelivery therefore never adds a second row. The key
holds `source` because CloudEvents identifies an event by source and id: two
emitters that happen to pick the same id are two events, and neither may
suppress the other (docs/decisions.md). `id` comes first so that a lookup by
id stays one index probe; `occurred_at`, the partition key, must be part of
any unique key of a partitioned table.

Partitions are monthly in UTC. The partition helpers are public because the
maintenance function reuses them to create partitions ahead and drop expired
ones; the writer creates a missing month on demand, so an event for a month
nobody prepared (a backfill, a missed maintenance run) is stored, not stuck.

All functions take a `pg8000.native.Connection` in autocommit mode (its
default) and manage their own transactions.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
import threading
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

import pg8000.native
from pg8000.exceptions import DatabaseError, InterfaceError

from .contract import AuditEvent, find_nul
from .settings import Settings

log = logging.getLogger("openg2p_audit.store")

TABLE = "audit_events"

# Advisory lock keys (pg_advisory_xact_lock(int, int)): the first int names
# this application, the second the object being created.
_LOCK_NAMESPACE = 0x0A0D17  # "audit"
_SCHEMA_LOCK = 0

# Columns in insert order; `ingested_at` is left to its default, now().
COLUMNS = (
    "id",
    "occurred_at",
    "source",
    "type",
    "subject",
    "actor_type",
    "actor_id",
    "resource_type",
    "resource_id",
    "action",
    "outcome",
    "reason",
    "trace_id",
    "details",
)

_DDL_TABLE = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    id            text        NOT NULL,
    occurred_at   timestamptz NOT NULL,
    source        text        NOT NULL,
    type          text        NOT NULL,
    subject       text,
    actor_type    text        NOT NULL,
    actor_id      text        NOT NULL,
    resource_type text,
    resource_id   text,
    action        text        NOT NULL,
    outcome       text        NOT NULL,
    reason        text,
    trace_id      text,
    details       jsonb,
    ingested_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (id, source, occurred_at)
) PARTITION BY RANGE (occurred_at)
"""

# The table's key, in index order; the insert's conflict target and every lookup of a row.
KEY = ("id", "source", "occurred_at")

# Re-sends with a stored key (id, source, occurred_at) but other content: the stored row
# stays as it is (first version wins), and each distinct other version is kept here with
# how often and since when it came. `stored_hash` is the stored row's leaf hash.
CONFLICTS = "audit_conflicts"
_DDL_CONFLICTS = f"""
CREATE TABLE IF NOT EXISTS {CONFLICTS} (
    id            text        NOT NULL,
    source        text        NOT NULL,
    occurred_at   timestamptz NOT NULL,
    incoming_hash bytea       NOT NULL,
    stored_hash   bytea       NOT NULL,
    incoming      jsonb       NOT NULL,
    first_seen    timestamptz NOT NULL DEFAULT now(),
    last_seen     timestamptz NOT NULL DEFAULT now(),
    count         bigint      NOT NULL DEFAULT 1,
    PRIMARY KEY (id, source, occurred_at, incoming_hash)
)
"""

# Tables made before `source` joined the key (the key was (id, occurred_at)) are brought to
# the current key in the schema step, once, under its advisory lock: the statements check
# the catalog themselves, so they do nothing on a table that already has it. Rebuilding the
# primary key reads every row under an exclusive lock, so this one step runs without the
# statement timeout (plan a quiet moment on a large trail: docs/deployment.md).
_KEY_COLUMNS = """
SELECT array_agg(a.attname::text ORDER BY k.ord)
FROM pg_constraint c
CROSS JOIN LATERAL unnest(c.conkey) WITH ORDINALITY AS k(attnum, ord)
JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum
WHERE c.conrelid = to_regclass(:table) AND c.contype = 'p'
GROUP BY c.conname
"""


def _migrations(conn: pg8000.native.Connection) -> list[str]:
    """The statements that bring an older table and conflict log to the current key."""
    statements: list[str] = []
    events_key = conn.run(_KEY_COLUMNS, table=TABLE)
    if events_key and events_key[0][0] == ["id", "occurred_at"]:
        log.warning("migrating %s to the key (id, source, occurred_at)", TABLE)
        statements += [
            "SET LOCAL statement_timeout = 0",
            f"ALTER TABLE {TABLE} DROP CONSTRAINT {TABLE}_pkey",
            f"ALTER TABLE {TABLE} ADD PRIMARY KEY (id, source, occurred_at)",
        ]
    conflicts_key = conn.run(_KEY_COLUMNS, table=CONFLICTS)
    if conflicts_key and conflicts_key[0][0] == ["id", "occurred_at", "incoming_hash"]:
        log.warning("migrating %s to the key (id, source, occurred_at, incoming_hash)", CONFLICTS)
        statements += [
            f"ALTER TABLE {CONFLICTS} ADD COLUMN IF NOT EXISTS source text",
            # Each conflict kept the whole incoming row, source included.
            f"UPDATE {CONFLICTS} SET source = incoming->>'source' WHERE source IS NULL",
            f"ALTER TABLE {CONFLICTS} ALTER COLUMN source SET NOT NULL",
            f"ALTER TABLE {CONFLICTS} DROP CONSTRAINT {CONFLICTS}_pkey",
            f"ALTER TABLE {CONFLICTS} ADD PRIMARY KEY (id, source, occurred_at, incoming_hash)",
        ]
    return statements


# Defined on the parent, so PostgreSQL propagates them to every partition.
PARENT_INDEXES = {
    f"{TABLE}_occurred_at_idx": "(occurred_at DESC)",
    f"{TABLE}_actor_idx": "(actor_id, occurred_at DESC)",
    f"{TABLE}_resource_idx": "(resource_type, resource_id, occurred_at DESC)",
    f"{TABLE}_type_idx": "(type, occurred_at DESC)",
    f"{TABLE}_trace_idx": "(trace_id) WHERE trace_id IS NOT NULL",
    # Sealing reads one hour of ingestion at a time (sealing.py), whatever the rows' months.
    f"{TABLE}_ingested_at_idx": "(ingested_at)",
}

# --- what one index entry may hold ---------------------------------------------------
#
# A btree entry must fit in a third of a page: with 8 kB pages PostgreSQL (btree version 4,
# PostgreSQL 12 and later) refuses an index row over 2704 bytes ("index row size N exceeds
# btree version 4 maximum 2704"). An entry is an 8-byte header (16 when a key column is
# NULL), then each key value: text with a 1-byte length when it is under 127 bytes, else a
# 4-byte length aligned to 4; timestamptz aligned to 8; and the whole rounded up to 8.
# PostgreSQL may compress a long value inside an entry, so real entries are never larger
# than this reckoning: an event that fits here fits in PostgreSQL. Ingest refuses (4xx,
# naming the field) every event whose entries would not fit, so the writer never meets one
# (tests/test_index_limits.py finds the real boundary in PostgreSQL and checks this one).
BTREE_MAX_ENTRY = 2704

# Each btree index whose entries hold event values: its key columns, in order, with their
# kinds. A test compares these with the indexes PostgreSQL reports for the schema.
INDEX_ENTRIES: dict[str, tuple[tuple[str, str], ...]] = {
    f"{TABLE}_pkey": (("id", "text"), ("source", "text"), ("occurred_at", "timestamptz")),
    f"{TABLE}_actor_idx": (("actor_id", "text"), ("occurred_at", "timestamptz")),
    f"{TABLE}_resource_idx": (
        ("resource_type", "text"), ("resource_id", "text"), ("occurred_at", "timestamptz"),
    ),
    f"{TABLE}_type_idx": (("type", "text"), ("occurred_at", "timestamptz")),
    f"{TABLE}_trace_idx": (("trace_id", "text"),),
    # A conflicting re-send is recorded under the same key, plus its 32-byte hash.
    f"{CONFLICTS}_pkey": (
        ("id", "text"), ("source", "text"), ("occurred_at", "timestamptz"),
        ("incoming_hash", "sha256"),
    ),
}  # fmt: skip

# Where each indexed column comes from in the event, for the emitter's error message.
EVENT_FIELDS = {
    "id": "id",
    "source": "source",
    "type": "type",
    "actor_id": "data.actor.id",
    "resource_type": "data.resource.type",
    "resource_id": "data.resource.id",
    "trace_id": "traceparent",
}

# No value longer than one whole entry can be in the table (the query's filters use it).
MAX_INDEXED_BYTES = BTREE_MAX_ENTRY


def _align(size: int, to: int) -> int:
    return (size + to - 1) // to * to


def index_entry_bytes(layout: tuple[tuple[str, str], ...], sizes: dict[str, int | None]) -> int:
    """The size of one entry of an index with `layout`, for values of these UTF-8 sizes.

    `sizes[column]` is None for NULL; fixed-width columns need no size.
    """
    nulls = any(sizes.get(c) is None for c, kind in layout if kind == "text")
    size = 16 if nulls else 8
    for column, kind in layout:
        if kind == "timestamptz":
            size = _align(size, 8) + 8
        elif kind == "sha256":
            size += 1 + 32  # bytea: a 1-byte length
        else:
            n = sizes.get(column)
            if n is None:
                continue
            size = size + 1 + n if n + 1 <= 127 else _align(size, 4) + 4 + n
    return _align(size, 8)


def oversized_indexes(sizes: dict[str, int | None]) -> list[tuple[str, str, int]]:
    """(index, column, most bytes that column may have) for each entry that would not fit.

    `sizes` maps the indexed text columns to their UTF-8 size (None: NULL). The column named
    is the longest of the index's values; the bound is for it, the others as they are.
    """
    found = []
    for index, layout in INDEX_ENTRIES.items():
        if index_entry_bytes(layout, sizes) <= BTREE_MAX_ENTRY:
            continue
        texts = [c for c, kind in layout if kind == "text" and sizes.get(c) is not None]
        longest = max(texts, key=lambda c: sizes[c] or 0)
        allowed = sizes[longest] or 0
        while allowed > 0 and index_entry_bytes(layout, {**sizes, longest: allowed}) > (
            BTREE_MAX_ENTRY
        ):
            allowed -= 1
        found.append((index, longest, allowed))
    return found


def indexed_sizes(event: AuditEvent) -> dict[str, int | None]:
    """The UTF-8 sizes of an event's indexed values (None: NULL), as its row will hold them."""
    resource = event.data.resource
    values = {
        "id": event.id,
        "source": event.source,
        "type": event.type,
        "actor_id": event.data.actor.id,
        "resource_type": resource.type if resource else None,
        "resource_id": resource.id if resource else None,
        "trace_id": event.trace_id,
    }
    return {c: None if v is None else _utf8_len(v) for c, v in values.items()}


# Below this many characters in all indexed values together, no entry can be too large
# (4 bytes per character at most): the common case skips the reckoning.
_SURELY_SMALL = (BTREE_MAX_ENTRY - 64) // 4 // 2


def index_problems(event: AuditEvent) -> list[tuple[str, str]]:
    """(field, message) for each indexed value of the event that PostgreSQL could not index."""
    resource = event.data.resource
    chars = len(event.id) + len(event.source) + len(event.type) + len(event.data.actor.id)
    if resource is not None:
        chars += len(resource.type) + len(resource.id or "")
    if chars <= _SURELY_SMALL:
        return []
    sizes = indexed_sizes(event)
    problems = []
    for index, column, allowed in oversized_indexes(sizes):
        others = [
            EVENT_FIELDS[c] for c, kind in INDEX_ENTRIES[index]
            if kind == "text" and c != column and sizes.get(c)
        ]  # fmt: skip
        beside = f" beside {' and '.join(others)}" if others else ""
        problems.append((
            EVENT_FIELDS[column],
            f"{EVENT_FIELDS[column]} is {sizes[column]} bytes (UTF-8); it is indexed, and"
            f" PostgreSQL holds at most {BTREE_MAX_ENTRY} bytes per index entry, which leaves"
            f" it at most {allowed} bytes{beside}",
        ))  # fmt: skip
    return problems


# Seconds DDL may wait for a lock on the parent table. Creating a partition
# needs a strong lock; queueing behind a long investigator query would stall
# every insert queued behind the DDL, so it gives up instead (a transient error).
DDL_LOCK_TIMEOUT = "5s"

_PARTITION_NAME = re.compile(rf"^{TABLE}_(\d{{4}})_(\d{{2}})$")


class UnstorableEvent(ValueError):
    """The event can never be stored as it is; retrying will not help."""


def connect(
    settings: Settings, application_name: str = "openg2p-audit"
) -> pg8000.native.Connection:
    """A connection with the project's timeouts, so no caller can hang on a stuck server."""
    conn = pg8000.native.Connection(
        **settings.pg_connect_kwargs,
        timeout=settings.db_socket_timeout,
        application_name=application_name,
    )
    try:
        _no_delay(conn)
        conn.run(f"SET statement_timeout = {int(settings.db_statement_timeout * 1000)}")
    except BaseException:
        conn.close()
        raise
    return conn


def _no_delay(conn: pg8000.native.Connection) -> None:
    """Send each message at once (TCP_NODELAY), as libpq does.

    pg8000 leaves Nagle's algorithm on. A batch's INSERT is larger than its
    8 KiB write buffer, so it leaves as several segments, and the last one
    waited for the server's delayed ACK: about 40 ms on every group commit.
    """
    sock = getattr(conn, "_usock", None)  # pg8000's socket; absent for a Unix socket path
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# --------------------------------------------------------------------------- months


def month_of(moment: datetime) -> date:
    """The first day of `moment`'s month, in UTC."""
    if moment.tzinfo is None:
        raise ValueError("timestamp without time zone")
    utc = moment.astimezone(UTC)
    return date(utc.year, utc.month, 1)


def add_months(month: date, count: int) -> date:
    """The first day of the month `count` months after (or before) `month`'s."""
    index = month.year * 12 + (month.month - 1) + count
    return date(index // 12, index % 12 + 1, 1)


def months_ahead(now: datetime, count: int) -> list[date]:
    """The current UTC month and the next count-1: the headroom kept ready."""
    current = month_of(now)
    return [add_months(current, i) for i in range(count)]


def month_bounds(month: date) -> tuple[datetime, datetime]:
    """[start, end) of the month as UTC instants: a partition's range."""
    start = date(month.year, month.month, 1)
    end = add_months(start, 1)
    return (
        datetime(start.year, start.month, 1, tzinfo=UTC),
        datetime(end.year, end.month, 1, tzinfo=UTC),
    )


def partition_name(month: date) -> str:
    """`audit_events_YYYY_MM`, the name investigators see."""
    return f"{TABLE}_{month.year:04d}_{month.month:02d}"


def partition_month(name: str) -> date | None:
    """The month a partition name stands for, or None for any other table."""
    m = _PARTITION_NAME.match(name)
    if not m or not 1 <= int(m.group(2)) <= 12:
        return None
    return date(int(m.group(1)), int(m.group(2)), 1)


# --------------------------------------------------------------------------- schema


def _rollback_quietly(conn: pg8000.native.Connection) -> None:
    # The connection may be gone; the original error is what gets reported.
    with contextlib.suppress(DatabaseError, InterfaceError, OSError):
        conn.run("ROLLBACK")


def ensure_schema(
    conn: pg8000.native.Connection, partitions_ahead: int = 0, now: datetime | None = None
) -> list[str]:
    """Create the partitioned table and its indexes if missing, and the months ahead.

    An older table is first brought to the current key (`_migrations`). The
    table DDL runs in one transaction under an advisory lock: writers that
    start at the same time on an empty database queue up instead of racing on
    the catalog (concurrent CREATE ... IF NOT EXISTS can still fail on a unique
    index). Then the current month and the next `partitions_ahead - 1` get
    their partitions, each under its own per-month lock, so a new deployment
    has its headroom before the first hourly maintenance run. Returns the
    partitions this call created.
    """
    conn.run("BEGIN")
    try:
        conn.run(f"SET LOCAL lock_timeout = '{DDL_LOCK_TIMEOUT}'")
        conn.run(f"SELECT pg_advisory_xact_lock({_LOCK_NAMESPACE}, {_SCHEMA_LOCK})")
        # Under the lock: a writer starting beside this one sees the migrated table.
        for sql in [*_migrations(conn), _DDL_TABLE, _DDL_CONFLICTS]:
            conn.run(sql)
        for name, spec in PARENT_INDEXES.items():
            conn.run(f"CREATE INDEX IF NOT EXISTS {name} ON {TABLE} {spec}")
        conn.run("COMMIT")
    except BaseException:
        _rollback_quietly(conn)
        raise
    months = months_ahead(now or datetime.now(UTC), partitions_ahead)
    return [partition_name(m) for m in months if ensure_partition(conn, m)]


class _PartitionCache:
    """Months known to have a partition, per database, for this process.

    Keyed by database identity rather than by connection, so a reconnect does
    not redo the work; a wrong entry (a partition dropped behind our back) is
    corrected by `insert_events`, which forgets it and recreates the partition.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._months: dict[str, set[date]] = {}
        self._db_of: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def database(self, conn: pg8000.native.Connection) -> str:
        key = self._db_of.get(conn)
        if key is None:
            row = conn.run(
                "SELECT current_database(), coalesce(inet_server_addr()::text, 'local'),"
                " coalesce(inet_server_port(), 0)"
            )[0]
            key = f"{row[1]}:{row[2]}/{row[0]}"
            self._db_of[conn] = key
        return key

    def known(self, conn: pg8000.native.Connection, month: date) -> bool:
        db = self.database(conn)
        with self._lock:
            return month in self._months.get(db, ())

    def add(self, conn: pg8000.native.Connection, month: date) -> None:
        db = self.database(conn)
        with self._lock:
            self._months.setdefault(db, set()).add(month)

    def forget(self, conn: pg8000.native.Connection, months: Iterable[date] | None) -> None:
        db = self.database(conn)
        with self._lock:
            if months is None:
                self._months.pop(db, None)
            else:
                self._months.get(db, set()).difference_update(months)


_partitions = _PartitionCache()


def _partition_lock_key(month: date) -> int:
    return 1 + month.year * 12 + (month.month - 1)


def ensure_partition(conn: pg8000.native.Connection, month: date) -> bool:
    """Make sure `month` has its partition; True if this call created it.

    Safe when several processes ask for the same month at once: creation is
    serialised by a per-month advisory lock and re-checked under it. Must not
    be called inside an open transaction that has written to the table
    (creating a partition locks the parent; two writers each holding row
    locks and waiting for that lock would deadlock), so it runs its own.
    """
    month = date(month.year, month.month, 1)
    if _partitions.known(conn, month):
        return False
    name = partition_name(month)
    start, end = month_bounds(month)
    created = False
    conn.run("BEGIN")
    try:
        conn.run(f"SET LOCAL lock_timeout = '{DDL_LOCK_TIMEOUT}'")
        conn.run(f"SELECT pg_advisory_xact_lock({_LOCK_NAMESPACE}, {_partition_lock_key(month)})")
        exists = conn.run("SELECT to_regclass(:name) IS NOT NULL", name=name)[0][0]
        if not exists:
            conn.run(
                f"CREATE TABLE IF NOT EXISTS {pg8000.native.identifier(name)} PARTITION OF {TABLE}"
                f" FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"
            )
            created = True
        conn.run("COMMIT")
    except BaseException:
        _rollback_quietly(conn)
        raise
    _partitions.add(conn, month)
    return created


def drop_partition(conn: pg8000.native.Connection, month: date) -> bool:
    """DROP TABLE `month`'s partition if it is attached to the table; True if this call dropped it.

    Serialised with `ensure_partition` by the same per-month advisory lock, and
    bounded by the DDL lock timeout: dropping a partition locks the parent, so
    behind a long query it gives up (a transient error) instead of stalling
    every insert queued behind it. Only the store's own `audit_events_YYYY_MM`
    partitions are ever dropped, never a default or otherwise named one.
    """
    month = date(month.year, month.month, 1)
    name = partition_name(month)
    dropped = False
    conn.run("BEGIN")
    try:
        conn.run(f"SET LOCAL lock_timeout = '{DDL_LOCK_TIMEOUT}'")
        conn.run(f"SELECT pg_advisory_xact_lock({_LOCK_NAMESPACE}, {_partition_lock_key(month)})")
        attached = conn.run(
            "SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = to_regclass(:table) AND c.relname = :name",
            table=TABLE,
            name=name,
        )[0][0]
        if attached:
            conn.run(f"DROP TABLE {pg8000.native.identifier(name)}")
            dropped = True
        conn.run("COMMIT")
    except BaseException:
        _rollback_quietly(conn)
        raise
    _partitions.forget(conn, [month])
    return dropped


def try_advisory_lock(conn: pg8000.native.Connection, key: int) -> bool:
    """Take a session-level advisory lock in the store's namespace without waiting.

    Keys 0 and up are the store's own (schema, months); callers use negative keys.
    Released by `advisory_unlock` or when the session ends.
    """
    return bool(conn.run(f"SELECT pg_try_advisory_lock({_LOCK_NAMESPACE}, {int(key)})")[0][0])


def advisory_unlock(conn: pg8000.native.Connection, key: int) -> None:
    conn.run(f"SELECT pg_advisory_unlock({_LOCK_NAMESPACE}, {int(key)})")


def forget_partitions(conn: pg8000.native.Connection, months: Iterable[date] | None = None) -> None:
    """Drop this process's memory of partitions (all, or some months) after dropping them."""
    _partitions.forget(conn, months)


def list_partitions(conn: pg8000.native.Connection) -> dict[date, str]:
    """The monthly partitions attached to the table, by month."""
    rows = conn.run(
        "SELECT c.relname FROM pg_inherits i"
        " JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = to_regclass(:table)",
        table=TABLE,
    )
    found: dict[date, str] = {}
    for (name,) in rows:
        month = partition_month(name)
        if month is not None:
            found[month] = name
    return found


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True, slots=True)
class Row:
    """One `audit_events` row, in `COLUMNS` order (details already JSON text or None)."""

    id: str
    occurred_at: datetime
    source: str
    type: str
    subject: str | None
    actor_type: str
    actor_id: str
    resource_type: str | None
    resource_id: str | None
    action: str
    outcome: str
    reason: str | None
    trace_id: str | None
    details: str | None

    @property
    def key(self) -> tuple[str, str, datetime]:
        """(id, source, occurred_at): the table's key, in its order."""
        return (self.id, self.source, self.occurred_at)

    @property
    def month(self) -> date:
        return month_of(self.occurred_at)

    def values(self) -> tuple:
        return tuple(getattr(self, c) for c in COLUMNS)


_DATA_COLUMNS = frozenset(
    {"actor", "action", "outcome", "resource", "reason", "changes", "context"}
)
_IDENTITY = ("id", "type")


def _present(value: object) -> bool:
    """Whether a value carries information: empty strings and containers do not."""
    return value is not None and value != "" and value != [] and value != {}


def _extras(obj: dict, skip: Iterable[str]) -> dict:
    return {k: v for k, v in obj.items() if k not in skip and _present(v)}


def details_of(event: AuditEvent) -> dict | None:
    """What the event carries beyond the flat columns, or None if there is nothing.

    That is the extras of `data`, and under `extensions` every CloudEvent
    extension attribute the emitter sent (name → value; `traceparent` is the
    `trace_id` column): Kafka keeps records for days, the row for years.
    """
    data = event.data_json()
    details: dict = {}
    actor = _extras(data.get("actor") or {}, _IDENTITY)
    if actor:
        details["actor"] = actor
    resource = _extras(data.get("resource") or {}, _IDENTITY)
    if resource:
        details["resource"] = resource
    for name in ("changes", "context"):
        if _present(data.get(name)):
            details[name] = data[name]
    details.update(_extras(data, _DATA_COLUMNS))
    extensions = {k: v for k, v in event.extensions.items() if v is not None}
    if extensions:
        details["extensions"] = extensions
    return details or None


def _utf8_len(value: str | None) -> int:
    return len(value.encode("utf-8", "surrogatepass")) if value else 0


def event_to_row(event: AuditEvent) -> Row:
    """Map a validated event to its row; UnstorableEvent if PostgreSQL could never take it."""
    data = event.data
    resource = data.resource
    details = details_of(event)
    row = Row(
        id=event.id,
        occurred_at=event.time,
        source=event.source,
        type=event.type,
        subject=event.subject,
        actor_type=data.actor.type.value,
        actor_id=data.actor.id,
        resource_type=resource.type if resource else None,
        resource_id=resource.id if resource else None,
        action=data.action,
        outcome=data.outcome.value,
        reason=data.reason,
        trace_id=event.trace_id,
        details=None if details is None else _details_json(details),
    )
    _check_storable(row, details)
    return row


# Built once: json.dumps with any non-default argument builds a new encoder on every call,
# which was a tenth of the writer's CPU per delivery.
_DETAILS_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _details_json(details: dict) -> str:
    try:
        return _DETAILS_ENCODER.encode(details)
    except ValueError:
        # Python's json reads NaN and Infinity, and would write them back as bare
        # tokens that are not JSON: jsonb refuses them, or worse, a reader does.
        raise UnstorableEvent(
            "details hold a non-finite number (NaN or Infinity), which JSON cannot carry"
        ) from None


_TEXT_COLUMNS = tuple(c for c in COLUMNS if c not in ("occurred_at", "details"))


def _check_storable(row: Row, details: dict | None) -> None:
    """Refuse, with the reason, what PostgreSQL would refuse inside a shared batch.

    Written for the common case (nothing wrong) to cost one pass over the text:
    the precise culprit is looked for only once something is found.
    """
    texts = [getattr(row, c) or "" for c in _TEXT_COLUMNS]
    everything = "\x1f".join(texts) + (row.details or "")
    # json.dumps writes NUL as \u0000, which jsonb refuses just like text refuses NUL.
    if "\x00" in everything:
        for name, value in zip(_TEXT_COLUMNS, texts, strict=True):
            if "\x00" in value:
                raise UnstorableEvent(
                    f"{name} contains a NUL character, which PostgreSQL cannot store"
                )
    if row.details and "\\u0000" in row.details:
        where = find_nul(details)  # None when it was only an escaped backslash before "u0000"
        if where:
            raise UnstorableEvent(
                f"data.{where} contains a NUL character, which PostgreSQL cannot store"
            )
    try:
        everything.encode("utf-8")
    except UnicodeEncodeError:
        raise UnstorableEvent("the event contains an unpaired UTF-16 surrogate") from None
    if sum(len(t) for t in texts) <= _SURELY_SMALL:
        return
    values = {c: getattr(row, c) for c in EVENT_FIELDS}
    sizes = {c: None if v is None else _utf8_len(v) for c, v in values.items()}
    for index, column, allowed in oversized_indexes(sizes):
        raise UnstorableEvent(
            f"{EVENT_FIELDS[column]} is {sizes[column]} bytes; the index {index} leaves it at"
            f" most {allowed} (PostgreSQL holds at most {BTREE_MAX_ENTRY} bytes per entry)"
        )


# --------------------------------------------------------------------------- inserting


def _array_literal(values: Sequence[str | None]) -> str:
    """A text[] literal; faster than letting the driver convert element by element."""
    return (
        "{"
        + ",".join(
            "NULL" if v is None else '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
            for v in values
        )
        + "}"
    )


_CASTS = {"occurred_at": "timestamptz", "details": "jsonb"}
_INSERT = (
    f"INSERT INTO {TABLE} ({', '.join(COLUMNS)})"
    f" SELECT {', '.join(f'{c}::{_CASTS[c]}' if c in _CASTS else c for c in COLUMNS)}"
    f" FROM unnest({', '.join(f':{c}::text[]' for c in COLUMNS)}) AS r({', '.join(COLUMNS)})"
    f" ON CONFLICT ({', '.join(KEY)}) DO NOTHING"
    " RETURNING id, source, (extract(epoch FROM occurred_at) * 1000000)::bigint"
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _micros(moment: datetime) -> int:
    """Exact microseconds since the epoch: how RETURNING names a row without parsing timestamps."""
    return (moment - _EPOCH) // _MICROSECOND


@dataclass(frozen=True)
class InsertResult:
    """What one committed insert did.

    `new[i]` tells whether rows[i] was stored by this call (False: it already
    existed, or an identical key came earlier in the same call).
    """

    inserted: int
    duplicates: int
    new: tuple[bool, ...] = field(default=(), repr=False)
    # Duplicates whose content differs from the stored row, recorded in audit_conflicts.
    conflicts: tuple[Conflict, ...] = ()


@dataclass(frozen=True)
class Conflict:
    id: str
    source: str
    occurred_at: str
    stored_hash: str  # hex
    incoming_hash: str  # hex


def _no_partition(exc: DatabaseError) -> bool:
    err = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
    return err.get("C") == "23514" and "no partition" in str(err.get("M", ""))


def insert_events(
    conn: pg8000.native.Connection, events: Sequence[AuditEvent | Row]
) -> InsertResult:
    """Store events (or prepared rows) in one transaction with one statement; return after COMMIT.

    Duplicates (same id, source and occurred_at, stored before or repeated
    within the call) are skipped, never an error. Months without a partition get one
    first. Any exception means nothing of this call was committed, except a
    lost connection during COMMIT, where the outcome is unknown: retrying is
    safe because the insert is idempotent.
    """
    rows = [e if isinstance(e, Row) else event_to_row(e) for e in events]
    if not rows:
        return InsertResult(0, 0, ())
    first_seen: dict[tuple[str, str, int], int] = {}
    keys = [(row.id, row.source, _micros(row.occurred_at)) for row in rows]
    for i, key in enumerate(keys):
        first_seen.setdefault(key, i)
    # Sorted by key: concurrent transactions then take row locks in one order and cannot
    # deadlock on keys they share (a redelivery racing its original).
    unique = [rows[first_seen[k]] for k in sorted(first_seen)]

    for month in sorted({r.month for r in unique}):
        ensure_partition(conn, month)
    params = _column_arrays(unique)
    try:
        stored = _insert_once(conn, params)
    except DatabaseError as exc:
        if not _no_partition(exc):
            raise
        # A partition this process believed in was dropped: relearn and retry once.
        months = {r.month for r in unique}
        forget_partitions(conn, months)
        for month in sorted(months):
            ensure_partition(conn, month)
        stored = _insert_once(conn, params)

    new = tuple(first_seen[key] == i and key in stored for i, key in enumerate(keys))
    inserted = len(stored)
    conflicts: tuple[Conflict, ...] = ()
    if inserted < len(rows):
        conflicts = _record_conflicts(conn, [r for r, n in zip(rows, new, strict=True) if not n])
    return InsertResult(
        inserted=inserted, duplicates=len(rows) - inserted, new=new, conflicts=conflicts
    )


_N = [f"n_{c}" for c in COLUMNS]
_NOT_KEY = [c for c in COLUMNS if c not in KEY]
# Stored rows whose content differs from a re-send with their key. `details` is compared
# as jsonb, so key order and spacing are not a difference; NULL equals NULL.
_CONFLICTING = (
    "SELECT r.i, {line} FROM unnest("
    + ", ".join(f":{c}::text[]" for c in COLUMNS)
    + f") WITH ORDINALITY AS r({', '.join(_N)}, i)"
    f" JOIN {TABLE} e ON e.id = r.n_id AND e.source = r.n_source"
    " AND e.occurred_at = r.n_occurred_at::timestamptz"
    f" WHERE ({', '.join('e.' + c for c in _NOT_KEY)}) IS DISTINCT FROM ("
    + ", ".join(f"r.n_{c}::jsonb" if c == "details" else f"r.n_{c}" for c in _NOT_KEY)
    + ")"
)


def _record_conflicts(conn: pg8000.native.Connection, rows: list[Row]) -> tuple[Conflict, ...]:
    """Compare re-sent rows with the stored ones; keep each differing version in audit_conflicts.

    Runs after the insert committed, and only when a call had duplicates, so
    the common path pays nothing. A failure here raises like a failed insert:
    the caller retries the whole (idempotent) call, and the conflict is
    recorded then.
    """
    import hashlib

    from . import integrity, query

    params = _column_arrays(rows)
    sql = _CONFLICTING.format(line=_qualified(query._JSON_LINE))
    found = conn.run(sql, **params)
    recorded = []
    for index, stored_line in found:
        row = rows[index - 1]
        incoming = {c: getattr(row, c) for c in COLUMNS}
        incoming["occurred_at"] = row.occurred_at.isoformat()
        incoming["details"] = None if row.details is None else json.loads(row.details)
        incoming_json = json.dumps(incoming, sort_keys=True, ensure_ascii=False)
        incoming_hash = hashlib.sha256(incoming_json.encode()).digest()
        stored_hash = integrity.leaf_hash(stored_line)
        conn.run(
            f"INSERT INTO {CONFLICTS}"
            " (id, source, occurred_at, incoming_hash, stored_hash, incoming)"
            " VALUES (:id, :src, :o::timestamptz, :ih, :sh, :inc::jsonb)"
            " ON CONFLICT (id, source, occurred_at, incoming_hash) DO UPDATE"
            f" SET count = {CONFLICTS}.count + 1, last_seen = now()",
            id=row.id, src=row.source, o=row.occurred_at.isoformat(), ih=incoming_hash,
            sh=stored_hash, inc=incoming_json,
        )  # fmt: skip
        recorded.append(
            Conflict(row.id, row.source, row.occurred_at.isoformat(), stored_hash.hex(),
                     incoming_hash.hex())
        )  # fmt: skip
        log.warning(
            "conflicting re-send of event %s from %s (occurred_at %s): its content differs "
            "from the stored row, which is kept; recorded in %s", row.id, row.source,
            row.occurred_at.isoformat(), CONFLICTS,
            extra={"id": row.id, "source": row.source, "stored_hash": stored_hash.hex()},
        )  # fmt: skip
    return tuple(recorded)


def _qualified(line: str) -> str:
    """The export line's expression over the stored row `e` (its columns, unambiguous)."""
    out = line
    for c in (*COLUMNS, "ingested_at"):
        out = re.sub(rf"(?<!['\w.]){c}(?![\w'])", f"e.{c}", out)
    return out


def _column_arrays(rows: Sequence[Row]) -> dict[str, str]:
    """One PostgreSQL array literal per column: the rows travel as a few parameters."""
    return {
        c: _array_literal(
            [r.occurred_at.isoformat() for r in rows]
            if c == "occurred_at"
            else [getattr(r, c) for r in rows]
        )
        for c in COLUMNS
    }


def _insert_once(
    conn: pg8000.native.Connection, params: dict[str, str]
) -> set[tuple[str, str, int]]:
    # One statement in autocommit mode is one transaction, and the driver returns only
    # after the server's ReadyForQuery, which follows the commit: one round trip, not three.
    statement = _prepared.get(conn)
    if statement is None:
        statement = _prepared[conn] = conn.prepare(_INSERT)
    returned = statement.run(**params)
    return {(r[0], r[1], r[2]) for r in returned}


# The insert parsed once per connection, by the driver and by the server.
_prepared: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------- errors


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a PostgreSQL error, if it is one."""
    if isinstance(exc, DatabaseError) and exc.args and isinstance(exc.args[0], dict):
        return exc.args[0].get("C")
    return None


# SQLSTATE classes that say "this data can never go in", as opposed to "not now".
_PERMANENT_CLASSES = ("22", "23", "54")


def is_permanent(exc: BaseException) -> bool:
    """Whether a failed insert would fail again with the same rows.

    Data and constraint errors are permanent; a missing partition is not (it
    is created on demand), and everything else (connection loss, shutdown,
    deadlock, lock timeout, out of resources) is worth retrying.
    """
    code = sqlstate(exc)
    if code is None or isinstance(exc, InterfaceError):
        return False
    if isinstance(exc, DatabaseError) and _no_partition(exc):
        return False
    return code[:2] in _PERMANENT_CLASSES
