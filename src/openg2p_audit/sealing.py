"""Sealing: the hourly digests of `audit_events`, kept in `audit_digests` and on Kafka.

Run by the hourly maintenance under its advisory lock (and by `openg2p-audit
seal`). Each closed hour of `ingested_at` older than `INTEGRITY_GRACE_SECONDS`
gets one `sealed` digest, empty hours included, in order, each in its own
REPEATABLE READ transaction: the rows read, the snapshot recorded and the
digest inserted belong to one snapshot, and a long backlog commits hour by hour.

Late rows. `ingested_at` is the inserting transaction's start, so a
transaction slower than the grace period commits rows into an hour that is
sealed already. Each digest records the PostgreSQL snapshot it was computed
in; every run compares, for the hours sealed in the last day, the rows
present with the rows covered, and the rows that the hour's latest snapshot
could not see (their inserting transaction had not committed) get a
`supplement` digest listing their leaf hashes. Fewer rows than covered is
reported as an error: only a deletion explains it.

Kafka. Digests are produced to `KAFKA_DIGESTS_TOPIC` after they commit, in
order, and marked published once the broker acknowledged them (acks=all); a
run that cannot reach Kafka leaves them for the next run. The topic is
compacted, keyed by sequence number, with infinite retention: nothing is ever
removed, and a re-publish after a crash replaces a record with itself.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pg8000.native

from . import integrity, query, store
from .integrity import HOUR, Digest, SignedDigest, Signer
from .settings import Settings, SettingsError

log = logging.getLogger("openg2p_audit.sealing")

DIGESTS = "audit_digests"
# Sealed hours re-examined for late rows: far longer than any transaction may stay open.
SUPPLEMENT_LOOKBACK = timedelta(days=1)
FETCH_ROWS = 10_000
SORT_MEMORY = "64MB"

_DDL = [
    f"""CREATE TABLE IF NOT EXISTS {DIGESTS} (
        seq          bigint      PRIMARY KEY,
        kind         text        NOT NULL CHECK (kind IN ('sealed', 'supplement', 'retired')),
        hour         timestamptz NOT NULL,
        row_count    bigint      NOT NULL,
        root         bytea       NOT NULL,
        key_id       text        NOT NULL,
        note         text        NOT NULL,
        snapshot     text,
        month        date,
        created_at   timestamptz NOT NULL DEFAULT now(),
        published_at timestamptz
    )""",
    f"CREATE UNIQUE INDEX IF NOT EXISTS {DIGESTS}_sealed_hour ON {DIGESTS} (hour)"
    " WHERE kind = 'sealed'",
]

# The leaf order, with codepoint order for text ("C" collation), as the verifier sorts.
# `source` is last: before it joined the table's key, (id, occurred_at) was unique, so
# hours sealed then keep their order.
_ORDER = 'ORDER BY ingested_at, id COLLATE "C", occurred_at, source COLLATE "C"'
_HOUR_ROWS = (
    f"SELECT {query._JSON_LINE} FROM {store.TABLE}"
    " WHERE ingested_at >= :start AND ingested_at < :end"
)
# xmin is a 32-bit transaction id; pg_visible_in_snapshot wants the 64-bit one. The epoch
# comes from the current snapshot, one less when the low half has wrapped since the row.
_XID8 = (
    "((((pg_snapshot_xmax(pg_current_snapshot())::text::bigint >> 32)"
    " - CASE WHEN xmin::text::bigint > (pg_snapshot_xmax(pg_current_snapshot())::text::bigint"
    " & 4294967295) THEN 1 ELSE 0 END) << 32) | xmin::text::bigint)::text::xid8"
)
_LATE_ROWS = f"{_HOUR_ROWS} AND NOT pg_visible_in_snapshot({_XID8}, :snapshot::pg_snapshot)"


class SealingError(RuntimeError):
    """Sealing cannot run as configured (no key, a bad key)."""


def signer(settings: Settings) -> Signer:
    """The sealing key named in the settings; SealingError says what is missing or wrong."""
    path = settings.integrity_signing_key_file
    if path is None:
        raise SealingError("INTEGRITY_SIGNING_KEY_FILE is not set: sealing needs its Ed25519 key")
    try:
        return Signer.from_file(settings.integrity_origin, path)
    except ValueError as exc:
        raise SealingError(f"INTEGRITY_SIGNING_KEY_FILE: {exc}") from None


def ensure_schema(conn: pg8000.native.Connection) -> None:
    """The digests table (and the events table on a new database).

    The events table's DDL is skipped when the table exists: it locks the
    table, and sealing must not wait behind the slow transaction whose late
    rows it is about to find.
    """
    if not conn.run("SELECT to_regclass(:t) IS NOT NULL", t=store.TABLE)[0][0]:
        store.ensure_schema(conn)
    conn.run("BEGIN")
    try:
        conn.run(f"SELECT pg_advisory_xact_lock({store._LOCK_NAMESPACE}, -2)")
        for sql in _DDL:
            conn.run(sql)
        conn.run("COMMIT")
    except BaseException:
        store._rollback_quietly(conn)
        raise


@dataclass
class SealSummary:
    """What one sealing pass did; hours are `YYYY-MM-DDTHH:00:00Z`."""

    through: str | None = None
    sealed: list[str] = field(default_factory=list)
    rows: int = 0
    supplements: list[dict[str, Any]] = field(default_factory=list)
    missing: list[dict[str, Any]] = field(default_factory=list)  # fewer rows than sealed
    published: int = 0
    unpublished: int = 0
    backlog: int = 0  # closed hours left for the next run
    publish_error: str | None = None
    skipped: str | None = None
    key_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        if self.skipped:
            return f"sealing skipped: {self.skipped}"
        if self.sealed:
            hours = self.sealed[0] if len(self.sealed) == 1 else (
                f"{self.sealed[0]} .. {self.sealed[-1]}")  # fmt: skip
            text = f"sealed {len(self.sealed)} hour(s) {hours} ({self.rows} row(s))"
        else:
            text = "no hour to seal"
        text += f", through {self.through}"
        for s in self.supplements:
            text += f"; supplement for {s['hour']}: {s['rows']} late row(s)"
        for m in self.missing:
            text += f"; ROWS MISSING in {m['hour']}: {m['present']} present, {m['sealed']} sealed"
        if self.backlog:
            text += f"; {self.backlog} hour(s) left for the next run"
        return text


def _floor_hour(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def _last(conn: pg8000.native.Connection) -> tuple[int, str] | None:
    rows = conn.run(f"SELECT seq, note FROM {DIGESTS} ORDER BY seq DESC LIMIT 1")
    return (rows[0][0], rows[0][1]) if rows else None


def _append(
    conn: pg8000.native.Connection,
    signer_: Signer,
    settings: Settings,
    *,
    kind: str,
    hour: datetime,
    builder: integrity.TreeBuilder,
    snapshot: str | None,
    leaves: tuple[bytes, ...] = (),
    month: date | None = None,
    last: int | None = None,
    through: str | None = None,
) -> SignedDigest:
    """Sign and insert the next digest; inside the caller's transaction."""
    previous = _last(conn)
    digest = Digest(
        origin=settings.integrity_origin,
        seq=0 if previous is None else previous[0] + 1,
        kind=kind,
        hour=integrity.hour_text(hour),
        count=builder.count,
        root=builder.root(),
        previous=integrity.NO_PREVIOUS if previous is None else integrity.note_hash(previous[1]),
        key_id=signer_.verifier.key_id,
        leaves=leaves,
        month=None if month is None else month.strftime("%Y-%m"),
        last=last,
        through=through,
    )
    note = signer_.sign(digest.body())
    conn.run(
        f"INSERT INTO {DIGESTS} (seq, kind, hour, row_count, root, key_id, note, snapshot, month)"
        " VALUES (:seq, :kind, :hour, :count, :root, :key, :note, :snapshot, :month)",
        seq=digest.seq, kind=kind, hour=hour, count=digest.count, root=digest.root,
        key=digest.key_id, note=note, snapshot=snapshot, month=month,
    )  # fmt: skip
    return SignedDigest(digest, note)


def _stream_leaves(conn, sql: str, params: dict[str, Any], on_leaf) -> None:
    """Hash the rows of a query one FETCH at a time, so an hour never sits in memory.

    The hour's rows are sorted by PostgreSQL; with the default work_mem a busy
    hour's sort spills to disk, so this transaction allows the sort more memory.
    """
    conn.run(f"SET LOCAL work_mem = '{SORT_MEMORY}'")
    conn.run(f"DECLARE seal_rows NO SCROLL CURSOR FOR {sql} {_ORDER}", **params)
    leaf_hash = integrity.leaf_hash
    # One batch ahead: PostgreSQL builds the next batch's lines (on its own core) while
    # this thread hashes the current one.
    batches: queue.Queue = queue.Queue(maxsize=1)

    def fetch() -> None:
        try:
            while True:
                rows = conn.run(f"FETCH {FETCH_ROWS} FROM seal_rows")
                batches.put(rows)
                if len(rows) < FETCH_ROWS:
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the hashing thread, raised there
            batches.put(exc)

    fetcher = threading.Thread(target=fetch, name="seal-fetch", daemon=True)
    fetcher.start()
    try:
        while True:
            rows = batches.get()
            if isinstance(rows, BaseException):
                raise rows
            for (line,) in rows:
                on_leaf(leaf_hash(line))
            if len(rows) < FETCH_ROWS:
                break
    finally:
        while fetcher.is_alive():  # never leave the thread using the connection
            with contextlib.suppress(queue.Empty):
                batches.get(timeout=0.1)
        fetcher.join()
    conn.run("CLOSE seal_rows")


def _seal_hour(conn, signer_: Signer, settings: Settings, hour: datetime) -> SignedDigest:
    conn.run("BEGIN ISOLATION LEVEL REPEATABLE READ")
    try:
        snapshot = conn.run("SELECT pg_current_snapshot()::text")[0][0]
        builder = integrity.TreeBuilder()
        _stream_leaves(conn, _HOUR_ROWS, {"start": hour, "end": hour + HOUR}, builder.add)
        signed = _append(conn, signer_, settings, kind="sealed", hour=hour, builder=builder,
                         snapshot=snapshot)  # fmt: skip
        conn.run("COMMIT")
        return signed
    except BaseException:
        store._rollback_quietly(conn)
        raise


def _supplement(conn, signer_: Signer, settings: Settings, hour: datetime, old_snapshot: str):
    """A supplement for the rows of `hour` the hour's latest snapshot could not see, if any."""
    conn.run("BEGIN ISOLATION LEVEL REPEATABLE READ")
    try:
        snapshot = conn.run("SELECT pg_current_snapshot()::text")[0][0]
        leaves: list[bytes] = []
        params = {"start": hour, "end": hour + HOUR, "snapshot": old_snapshot}
        _stream_leaves(conn, _LATE_ROWS, params, leaves.append)
        if not leaves:
            conn.run("ROLLBACK")
            return None
        builder = integrity.TreeBuilder()
        for leaf in leaves:
            builder.add(leaf)
        signed = _append(conn, signer_, settings, kind="supplement", hour=hour, builder=builder,
                         snapshot=snapshot, leaves=tuple(leaves))  # fmt: skip
        conn.run("COMMIT")
        return signed
    except BaseException:
        store._rollback_quietly(conn)
        raise


def _check_late(conn, signer_: Signer, settings: Settings, summary: SealSummary) -> None:
    """Compare recently sealed hours' row counts with what their digests cover."""
    recent = conn.run(
        f"SELECT d.hour, sum(d.row_count)::bigint, (array_agg(d.snapshot ORDER BY d.seq DESC))[1]"
        f" FROM {DIGESTS} d WHERE d.kind IN ('sealed', 'supplement') AND d.hour IN"
        f" (SELECT hour FROM {DIGESTS} WHERE kind = 'sealed'"
        f" AND created_at > now() - interval '{int(SUPPLEMENT_LOOKBACK.total_seconds())} seconds')"
        " GROUP BY d.hour ORDER BY d.hour"
    )
    spans = integrity.retired_spans(
        Digest.parse(note.rpartition("\n\n")[0] + "\n")
        for (note,) in conn.run(f"SELECT note FROM {DIGESTS} WHERE kind = 'retired'")
    )
    for hour, covered, snapshot in recent:
        when = integrity.hour_text(hour)
        if any(start <= when <= end for _, start, end in spans):
            continue  # rows left with a partition dropped by retention: said by its digest
        present = conn.run(
            f"SELECT count(*) FROM {store.TABLE} WHERE ingested_at >= :s AND ingested_at < :e",
            s=hour, e=hour + HOUR,
        )[0][0]  # fmt: skip
        if present > covered:
            signed = _supplement(conn, signer_, settings, hour, snapshot)
            if signed is not None:
                summary.supplements.append(
                    {"hour": signed.digest.hour, "rows": signed.digest.count,
                     "seq": signed.digest.seq}
                )  # fmt: skip
                log.warning("late rows in sealed hour %s: supplement digest %d covers %d row(s)",
                            signed.digest.hour, signed.digest.seq, signed.digest.count)  # fmt: skip
        elif present < covered:
            summary.missing.append({"hour": when, "present": present, "sealed": covered})
            log.error("hour %s has %d row(s) but its digests cover %d: rows were deleted",
                      when, present, covered)  # fmt: skip


def seal(
    settings: Settings,
    conn: pg8000.native.Connection,
    *,
    through: datetime | None = None,
    grace: float | None = None,
    max_hours: int | None = None,
    publish_digests: bool = True,
) -> SealSummary:
    """Seal every closed hour not sealed yet, check recent hours for late rows, publish.

    Idempotent: a second pass seals nothing and publishes nothing new. The
    caller holds the maintenance lock (`maintenance.run_maintenance`, or the
    CLI, which takes the same lock).
    """
    signer_ = signer(settings)
    grace = settings.integrity_grace_seconds if grace is None else grace
    limit_hours = settings.integrity_max_hours_per_run if max_hours is None else max_hours
    ensure_schema(conn)
    now = conn.run("SELECT now()")[0][0]
    end = _floor_hour(now - timedelta(seconds=grace))
    if through is not None:
        end = min(end, _floor_hour(through))
    summary = SealSummary(through=integrity.hour_text(end), key_id=signer_.verifier.key_id)

    _check_late(conn, signer_, settings, summary)

    last_sealed = conn.run(f"SELECT max(hour) FROM {DIGESTS} WHERE kind = 'sealed'")[0][0]
    if last_sealed is not None:
        start = last_sealed + HOUR
    else:
        first_row = conn.run(f"SELECT min(ingested_at) FROM {store.TABLE}")[0][0]
        start = _floor_hour(first_row) if first_row is not None else end - HOUR
    hour = start
    while hour < end and len(summary.sealed) < limit_hours:
        signed = _seal_hour(conn, signer_, settings, hour)
        summary.sealed.append(signed.digest.hour)
        summary.rows += signed.digest.count
        hour += HOUR
    summary.backlog = max(0, int((end - hour) / HOUR))
    if publish_digests:
        publish(settings, conn, summary)
    return summary


# --------------------------------------------------------------------------- retention


def retire(settings: Settings, conn: pg8000.native.Connection, month: date) -> SignedDigest | None:
    """The signed `retired` digest for a partition about to be dropped; None without a key.

    It names the month, the span of hours whose trees held the partition's rows
    (min and max `ingested_at`, read through the partition's index) and the last
    digest so far, so a verifier knows why those hours can no longer be recomputed.
    Committed before the DROP: a crash in between leaves a chain that says more
    than happened, never less.
    """
    if settings.integrity_signing_key_file is None:
        return None
    signer_ = signer(settings)
    ensure_schema(conn)
    name = store.partition_name(month)
    conn.run("BEGIN")
    try:
        first, last_row, count = conn.run(
            f"SELECT min(ingested_at), max(ingested_at), count(*)"
            f" FROM {pg8000.native.identifier(name)}"
        )[0]
        previous = _last(conn)
        builder = integrity.TreeBuilder()  # a retired digest covers no rows itself
        span_end = None if last_row is None else integrity.hour_text(last_row)
        signed = _append(
            conn, signer_, settings, kind="retired",
            hour=_floor_hour(first) if first is not None else store.month_bounds(month)[0],
            builder=builder, snapshot=None, month=month,
            last=None if previous is None else previous[0], through=span_end,
        )  # fmt: skip
        conn.run("COMMIT")
    except BaseException:
        store._rollback_quietly(conn)
        raise
    log.info("retired digest %d for %s (%d row(s))", signed.digest.seq, name, count)
    return signed


# --------------------------------------------------------------------------- reading


def digests(
    conn: pg8000.native.Connection, start: datetime | None = None, end: datetime | None = None
) -> list[str]:
    """The notes of the digests whose hour lies in [start, end), in chain order.

    Retired digests are always included: they explain gaps whatever the range.
    """
    clauses, params = [], {}
    if start is not None:
        clauses.append("hour >= :start")
        params["start"] = start
    if end is not None:
        clauses.append("hour < :end")
        params["end"] = end
    where = " AND ".join(clauses)
    where = f" WHERE kind = 'retired' OR ({where})" if clauses else ""
    return [r[0] for r in conn.run(f"SELECT note FROM {DIGESTS}{where} ORDER BY seq", **params)]


def digest_lines(notes: list[str]) -> list[str]:
    lines = []
    for note in notes:
        body = note.rpartition("\n\n")[0] + "\n"
        d = Digest.parse(body)
        lines.append(json.dumps(SignedDigest(d, note).as_json(), ensure_ascii=False))
    return lines


def event_lines(
    conn: pg8000.native.Connection, start: datetime | None = None, end: datetime | None = None
):
    """The rows ingested in [start, end), in the export's JSON lines format, batch by batch."""
    clauses, params = [], {}
    if start is not None:
        clauses.append("ingested_at >= :start")
        params["start"] = start
    if end is not None:
        clauses.append("ingested_at < :end")
        params["end"] = end
    where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
    conn.run("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    try:
        conn.run(
            f"DECLARE export_rows NO SCROLL CURSOR FOR SELECT {query._JSON_LINE}"
            f" FROM {store.TABLE}{where} {_ORDER}",
            **params,
        )
        while True:
            rows = conn.run(f"FETCH {FETCH_ROWS} FROM export_rows")
            yield from (r[0] for r in rows)
            if len(rows) < FETCH_ROWS:
                break
        conn.run("COMMIT")
    except BaseException:
        store._rollback_quietly(conn)
        raise


# --------------------------------------------------------------------------- Kafka


def publish(settings: Settings, conn: pg8000.native.Connection, summary: SealSummary) -> None:
    """Produce the unpublished digests in order; mark them once the broker has them all."""
    pending = conn.run(
        f"SELECT seq, kind, hour, row_count, note FROM {DIGESTS}"
        " WHERE published_at IS NULL ORDER BY seq"
    )
    summary.unpublished = len(pending)
    if not pending:
        return
    if not settings.kafka_configured:
        return  # no broker in this setup: the digests wait in the table (`unpublished`)
    from kafka import KafkaProducer

    try:
        producer = KafkaProducer(
            bootstrap_servers=settings.bootstrap_servers,
            client_id="openg2p-audit-sealing",
            acks="all",
            max_in_flight_requests_per_connection=1,  # keeps the chain's order on retries
            retries=5,
            request_timeout_ms=10_000,
            bootstrap_timeout_ms=10_000,
        )
    except Exception as exc:  # noqa: BLE001 - the digests wait for the next run
        summary.publish_error = f"Kafka unavailable: {exc}"
        log.warning("digests not published: %s", exc)
        return
    try:
        futures = []
        for seq, kind, hour, count, note in pending:
            record = {"seq": seq, "kind": kind, "hour": integrity.hour_text(hour),
                      "count": count, "note": note}  # fmt: skip
            value = json.dumps(record, ensure_ascii=False).encode()
            futures.append(
                producer.send(settings.kafka_digests_topic, key=str(seq).encode(), value=value)
            )
        producer.flush(timeout=20)
        for future in futures:
            future.get(timeout=1)
    except Exception as exc:  # noqa: BLE001 - unmarked digests are produced again next run
        summary.publish_error = f"Kafka unavailable: {exc}"
        log.warning("digests not published: %s", exc)
        return
    finally:
        producer.close(timeout=5)
    conn.run(
        f"UPDATE {DIGESTS} SET published_at = now() WHERE published_at IS NULL AND seq <= :last",
        last=pending[-1][0],
    )
    summary.published = len(pending)
    summary.unpublished = 0


def public_key(settings: Settings) -> str:
    try:
        return str(signer(settings).verifier)
    except SealingError as exc:
        raise SettingsError(str(exc)) from None
