"""Seeded rows, a read-only role and a reference model for the query service's tests.

The rows are written with the store's own insert path, over three monthly
partitions, with ties on `occurred_at` at month boundaries so that keyset
pages have to break them by id. `expected()` is the query semantics written
plainly in Python; every answer of the service is compared with it.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from datetime import UTC, datetime, timedelta
from urllib.parse import urlencode, urlsplit, urlunsplit

import pg8000.native

from openg2p_audit import query, store
from openg2p_audit.settings import Settings

ACTORS = [f"officer-{i}" for i in range(1, 6)]
BENEFICIARIES = [f"BEN-{i:03d}" for i in range(1, 11)]
TYPES = [
    "org.openg2p.registry.beneficiary.viewed",
    "org.openg2p.registry.beneficiary.updated",
    "org.openg2p.payment.approved",
]
SOURCES = ["/openg2p/registry", "/openg2p/payments"]
OUTCOMES = ["success", "failure", "denied"]
TRACES = [uuid.UUID(int=i + 1).hex for i in range(6)]
TENANTS = ["district-north", "district-south"]


def months_back(count: int, now: datetime | None = None) -> datetime:
    """The first instant of the month `count` months before this one (UTC)."""
    first = store.add_months(store.month_of(now or datetime.now(UTC)), -count)
    return datetime(first.year, first.month, 1, tzinfo=UTC)


def seed_rows(count: int = 200, seed: int = 13) -> list[store.Row]:
    """Rows over the three months before this one; the last five of each month's first
    instant share one `occurred_at`."""
    rng = random.Random(seed)
    start, end = months_back(3), months_back(0)
    span = (end - start).total_seconds()
    rows = []
    for i in range(count):
        if i < 10:  # ties exactly on the month boundaries
            at = months_back(2 - i % 2)
        else:
            at = start + timedelta(seconds=rng.uniform(0, span - 1))
            at = at.replace(microsecond=rng.randrange(0, 1_000_000))
        kind = rng.choice(TYPES)
        ben = rng.choice(BENEFICIARIES)
        details = {"extensions": {"tenantid": rng.choice(TENANTS)}}
        if i % 7 == 0:
            details["context"] = {"note": f"row {i}", "nested": {"n": i}}
        rows.append(
            store.Row(
                id=f"evt-{i:04d}-{rng.randrange(16**6):06x}",
                occurred_at=at,
                source=SOURCES[0] if "registry" in kind else SOURCES[1],
                type=kind,
                subject=f"beneficiary/{ben}",
                actor_type="user",
                actor_id=rng.choice(ACTORS),
                resource_type="beneficiary",
                resource_id=ben,
                action=kind.rsplit(".", 1)[1],
                outcome=rng.choice(OUTCOMES),
                reason=None if i % 3 else "checked",
                trace_id=rng.choice(TRACES) if i % 4 == 0 else None,
                details=json.dumps(details),
            )
        )
    return rows


def seed(settings: Settings, rows: list[store.Row]) -> None:
    """Store `rows` in the module's database through the one insert path."""
    conn = pg8000.native.Connection(**settings.pg_connect_kwargs)
    try:
        store.ensure_schema(conn, 1)
        store.insert_events(conn, rows)
    finally:
        conn.close()


def _ts(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def as_event(row: store.Row) -> dict:
    """A row as the service answers it (minus ingested_at, which the database set)."""
    out = {c: getattr(row, c) for c in store.COLUMNS}
    out["occurred_at"] = _ts(row.occurred_at)
    out["details"] = json.loads(row.details) if row.details else None
    return out


def matches(row: store.Row, params: dict[str, str]) -> bool:
    start = datetime.fromisoformat(params["from"].replace("Z", "+00:00"))
    end = datetime.fromisoformat(params["to"].replace("Z", "+00:00"))
    if not start <= row.occurred_at < end:
        return False
    for name in ("actor_id", "resource_type", "resource_id", "outcome", "source", "subject"):
        if name in params and getattr(row, name) != params[name]:
            return False
    if "trace_id" in params and row.trace_id != params["trace_id"]:
        return False
    if "type" in params:
        wanted = params["type"]
        ok = row.type.startswith(wanted[:-1]) if wanted.endswith("*") else row.type == wanted
        if not ok:
            return False
    if "tenant" in params:
        tenant = (json.loads(row.details or "{}").get("extensions") or {}).get("tenantid")
        if tenant != params["tenant"]:
            return False
    return True


def expected(rows: list[store.Row], params: dict[str, str]) -> list[str]:
    """The ids the filters select, newest first, ties broken by id (descending)."""
    chosen = [r for r in rows if matches(r, params)]
    chosen.sort(key=lambda r: (r.occurred_at, r.id), reverse=True)
    return [r.id for r in chosen]


def full_range() -> dict[str, str]:
    return {"from": _ts(months_back(3)), "to": _ts(months_back(0))}


def url_with(base: str, path: str, params: dict[str, str] | list[tuple[str, str]]) -> str:
    parts = urlsplit(base)
    return urlunsplit((parts.scheme, parts.netloc, path, urlencode(params), ""))


def reader_role(settings: Settings, role: str, password: str = "reader-pw") -> Settings:
    """Create the read-only role on the module's database; settings that connect as it."""
    conn = pg8000.native.Connection(**settings.pg_connect_kwargs)
    try:
        store.ensure_schema(conn, 1)
        query.ensure_reader_role(conn, role, password)
    finally:
        conn.close()
    kw = settings.pg_connect_kwargs
    url = f"postgresql://{role}:{password}@{kw['host']}:{kw['port']}/{kw['database']}"
    return settings.model_copy(update={"database_url": url, "db_host": None})


def wait_rows(settings: Settings, sql: str, timeout: float = 60.0, **params) -> list:
    """Poll until the query returns rows (the audit events of reads arrive via Kafka)."""
    deadline = time.monotonic() + timeout
    while True:
        conn = pg8000.native.Connection(**settings.pg_connect_kwargs)
        try:
            rows = conn.run(sql, **params)
        finally:
            conn.close()
        if rows or time.monotonic() > deadline:
            return rows
        time.sleep(0.25)
