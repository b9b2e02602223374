"""Hourly maintenance: monthly partitions ahead, expired partitions dropped, the DLQ redriven.

A Knative PingSource fires `maintain` every hour with an event of type
`dev.knative.sources.ping`. A PingSource retries only a few times within about
a minute, so a run is quick and idempotent, and it answers only after its work
is committed: partitions are created and dropped in committed transactions,
and a dead-letter record's offset is committed only after its row is.

Every run, under one PostgreSQL advisory lock (overlapping runs wait briefly,
then report "skipped" with success rather than fail):

1. Partition upkeep: the current UTC month and the next N-1 months get their
   partitions (`PARTITIONS_AHEAD_MONTHS`); partitions whose whole range lies
   before the retention cutoff (start of the current UTC month minus
   `RETENTION_MONTHS`; 0 disables dropping) are removed with DROP TABLE. Only
   tables named like a monthly partition (`store.partition_month`) and
   attached to `audit_events` are ever dropped.
2. Sealing (`sealing.seal`): every closed hour of `ingested_at` older than
   `INTEGRITY_GRACE_SECONDS` gets its signed digest, late rows their
   supplement, and the digests go to their Kafka topic. A partition dropped
   by retention first gets its signed `retired` digest. Without a signing key
   (`INTEGRITY_SIGNING_KEY_FILE`) this step is skipped and the summary says so.
3. Dead-letter redrive, by one rule: **a dead letter is stored only if it is an
   event ingest produced, as ingest produced it**, which its attestation proves
   (attestation.py), and only through the writer's own decoder and checks
   (`writer.event_from_attributes`) and the one insert path, `store.insert_events`
   (a row already stored stays single). The `knativeerror*` extensions say why
   the writer did not take it (a 5xx, a 401 from a misconfigured token, no answer
   at all when Knative's OIDC feature is off and the dispatcher could not even
   get a token), and decide nothing: anyone who can write to the dead-letter
   topic can write them too. Everything else (no attestation or a wrong one, a
   structured-mode or wrapped record, an event the contract refuses) stays in
   the topic, counted by reason in `audit_maintenance_dlq_permanent_total` and
   listed by `openg2p-audit dead-letters`. The Trigger's dead-letter topic
   (`KAFKA_BROKER_DLQ_TOPIC`) holds Broker events that ingest refused or never
   saw: they never passed ingest's checks, so they are never stored from there;
   they are counted (reason `broker_dead_letter`) and listed for an operator,
   who has their sender send them again. The consumer group
   `KAFKA_REDRIVE_GROUP` remembers how far redrive has read each topic, so each
   record is handled once.

The clock is the process's UTC clock, not the ping's `time` attribute (a
delayed or retried ping carries an old time); `upkeep` takes `now` for tests.
Nothing is kept in memory between runs, so the function can scale to zero.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from typing import Any

import pg8000.native
from cloudevents import exceptions as cloudevents_exceptions
from cloudevents.http import from_http
from pg8000.exceptions import InterfaceError
from prometheus_client import Counter
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from . import sealing, store
from .attestation import Verifier
from .auth import WorkloadGate
from .kafka_binding import STRUCTURED_CONTENT_TYPE, NotBinary, decode_record, is_binary
from .observability import configure_logging, metrics_response, prepare_multiprocess_metrics
from .serving import bound_request_headers
from .settings import Settings, SettingsError, load_settings

log = logging.getLogger("openg2p_audit.maintenance")

PING_TYPE = "dev.knative.sources.ping"

# Session advisory lock held for a whole run, in the store's namespace (the store's own
# keys are 0 and up).
RUN_LOCK = -1
# How long a run waits for an overlapping one before reporting itself skipped.
LOCK_WAIT_SECONDS = 5.0

# How many permanent dead-letter records a summary names (all are counted).
PERMANENT_SAMPLES = 10

prepare_multiprocess_metrics()
RUNS = Counter("audit_maintenance_runs_total", "Maintenance runs, by outcome", ["status"])
PARTITIONS_CREATED = Counter(
    "audit_maintenance_partitions_created_total", "Monthly partitions created ahead"
)
PARTITIONS_DROPPED = Counter(
    "audit_maintenance_partitions_dropped_total", "Monthly partitions dropped after retention"
)
DLQ_REDRIVEN = Counter(
    "audit_maintenance_dlq_redriven_total",
    "Dead-letter records stored again (new rows or rows already present)",
)
DLQ_PERMANENT = Counter(
    "audit_maintenance_dlq_permanent_total",
    "Dead-letter records left in the dead-letter topic as permanent failures, by reason",
    ["reason"],
)


HOURS_SEALED = Counter("audit_maintenance_hours_sealed_total", "Hours sealed with a digest")
SUPPLEMENTS = Counter(
    "audit_maintenance_supplement_digests_total",
    "Supplement digests for rows that committed into an already sealed hour",
)


class MaintenanceError(RuntimeError):
    """A run did not finish its work; the PingSource should retry."""


# --------------------------------------------------------------------------- summaries


@dataclass
class RedriveSummary:
    """One redrive pass over the dead-letter topic."""

    topic: str
    group: str
    dry_run: bool = False
    dlq_seen: int = 0  # records read this run
    redriven: int = 0  # transient failures stored (or, in a dry run, that would be)
    inserted: int = 0
    duplicates: int = 0
    dlq_permanent_seen: int = 0  # records left in the DLQ, first met by this run
    permanent: list[dict[str, Any]] = field(default_factory=list)  # a few of them
    remaining: int = 0  # records before the end observed at start, left for the next run
    committed: dict[int, int] = field(default_factory=dict)  # partition -> next offset
    skipped: str | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["committed"] = {str(p): o for p, o in sorted(self.committed.items())}
        return out


@dataclass
class UpkeepSummary:
    """What one maintenance run did (or, dry, would do)."""

    now: str
    dry_run: bool = False
    status: str = "ok"  # ok | skipped | error
    cutoff: str | None = None  # partitions wholly before this are dropped
    created: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    redrive: RedriveSummary | None = None
    broker_dead_letters: RedriveSummary | None = None  # the Trigger's: counted, never stored
    seal: dict[str, Any] | None = None
    retired: list[int] = field(default_factory=list)  # seq of the retired digests written
    skipped: str | None = None
    error: str | None = None
    duration_ms: int = 0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["redrive"] = self.redrive.as_dict() if self.redrive else None
        out["broker_dead_letters"] = (
            self.broker_dead_letters.as_dict() if self.broker_dead_letters else None
        )
        return out


# --------------------------------------------------------------------------- partitions


def _month_start(month: date) -> datetime:
    return datetime(month.year, month.month, 1, tzinfo=UTC)


def retention_cutoff(now: datetime, retention_months: int) -> datetime | None:
    """Start of the current UTC month minus the retention; None when dropping is disabled."""
    if retention_months <= 0:
        return None
    return _month_start(store.add_months(store.month_of(now), -retention_months))


def expired(month: date, cutoff: datetime | None) -> bool:
    """Whether a partition's whole range [start, end) lies before the cutoff."""
    return cutoff is not None and store.month_bounds(month)[1] <= cutoff


def upkeep(
    settings: Settings,
    conn: pg8000.native.Connection,
    now: datetime | None = None,
    dry_run: bool = False,
) -> UpkeepSummary:
    """Create the partitions ahead and drop the expired ones; return after both are committed.

    Idempotent: a second run at the same time creates and drops nothing. The
    caller serialises runs (see `run_maintenance`); correctness against the
    writer, which may create a month at the same moment, comes from the store's
    per-month advisory locks.
    """
    now = now or datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now must carry a time zone")
    cutoff = retention_cutoff(now, settings.retention_months)
    summary = UpkeepSummary(
        now=now.astimezone(UTC).isoformat(),
        dry_run=dry_run,
        cutoff=cutoff.isoformat() if cutoff else None,
    )
    if not dry_run:
        store.ensure_schema(conn)
    existing = store.list_partitions(conn)  # the catalog, not this process's cache

    for month in store.months_ahead(now, settings.partitions_ahead_months):
        if month in existing:
            continue
        name = store.partition_name(month)
        if dry_run:
            summary.created.append(name)
            continue
        store.forget_partitions(conn, [month])  # the catalog says it is missing: recheck
        if store.ensure_partition(conn, month):
            summary.created.append(name)
            PARTITIONS_CREATED.inc()

    kept = set(summary.created)
    for month, name in sorted(existing.items()):
        if not expired(month, cutoff):
            kept.add(name)
        elif dry_run:
            summary.dropped.append(name)
        else:
            signed = sealing.retire(settings, conn, month)
            if signed is not None:
                summary.retired.append(signed.digest.seq)
            if store.drop_partition(conn, month):  # False: another session dropped it first
                summary.dropped.append(name)
                PARTITIONS_DROPPED.inc()
    summary.kept = sorted(kept)
    return summary


# --------------------------------------------------------------------------- dead letters


def _header(headers: list[tuple[str, bytes]], name: str) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("utf-8", "replace") if value is not None else None
    return None


_ERROR_ATTRIBUTES = ("id", "knativeerrorcode", "knativeerrordata")


def error_attributes(
    headers: list[tuple[str, bytes]], value: bytes | None
) -> dict[str, str | None]:
    """The event id and the knativeerror* attributes of a dead letter, binary or structured mode
    (for the report only: they decide nothing)."""
    if is_binary(headers):
        return {name: _header(headers, f"ce_{name}") for name in _ERROR_ATTRIBUTES}
    found: dict[str, str | None] = dict.fromkeys(_ERROR_ATTRIBUTES)
    if (_header(headers, "content-type") or "").startswith(STRUCTURED_CONTENT_TYPE):
        try:
            envelope = json.loads(value or b"")
        except ValueError:
            envelope = None
        if isinstance(envelope, dict):
            for name in _ERROR_ATTRIBUTES:
                if envelope.get(name) is not None:
                    found[name] = str(envelope[name])
    return found


def _refusal_reason(code: str | None, data: str | None) -> str:
    """The reason a subscriber gave (the writer's JSON `error`), else `http_<code>`."""
    if data:
        with contextlib.suppress(binascii.Error, ValueError, TypeError, AttributeError):
            body = json.loads(base64.b64decode(data, validate=False))
            reason = body.get("error")
            if isinstance(reason, str) and 0 < len(reason) <= 64:
                return reason
    return f"http_{(code or '').strip() or 'none'}"


def event_from_dead_letter(
    headers: list[tuple[str, bytes]], value: bytes | None, verifier: Verifier
):
    """The audit event of a dead letter, decoded and checked as the writer does it.

    The dead-letter KafkaSink writes the delivery in binary mode, so the record holds
    the event's attributes as the writer received them, plus the `knativeerror*`
    extensions (delivery metadata, left out of the event). Raises writer.Rejection,
    store.UnstorableEvent or pydantic.ValidationError for what may not be stored.
    """
    from .writer import Rejection, event_from_attributes

    try:
        attrs = decode_record(headers)
    except NotBinary as exc:
        raise Rejection(400, "not_binary", str(exc)) from None
    except ValueError as exc:
        raise Rejection(400, "not_a_cloudevent", f"unreadable headers: {exc}") from None
    return event_from_attributes(attrs, value, verifier)


def redrive(
    settings: Settings,
    conn: pg8000.native.Connection,
    *,
    dry_run: bool = False,
    max_records: int | None = None,
    max_seconds: float | None = None,
    broker: bool = False,
) -> RedriveSummary:
    """Store the attested events of the DLQ (see the module's rule), up to the end offsets
    seen at start; with `broker`, read the Trigger's dead-letter topic, storing nothing.

    Offsets are committed to the redrive group only after the rows they stand
    for are committed in PostgreSQL, batch by batch. A database failure stops
    the pass with `error` set and that batch's offsets uncommitted, so the next
    run handles the same records again (the insert is idempotent). A dry run
    reads and classifies but stores nothing and commits nothing.
    """
    from kafka import KafkaConsumer, TopicPartition
    from kafka.structs import OffsetAndMetadata

    limit = settings.redrive_max_records if max_records is None else max_records
    seconds = settings.redrive_max_seconds if max_seconds is None else max_seconds
    topic = settings.kafka_broker_dlq_topic if broker else settings.kafka_dlq_topic
    summary = RedriveSummary(topic=topic, group=settings.kafka_redrive_group, dry_run=dry_run)
    if not settings.kafka_configured:
        summary.skipped = "KAFKA_BOOTSTRAP_SERVERS is not set"
        return summary
    if limit <= 0:
        summary.skipped = "REDRIVE_MAX_RECORDS is 0"
        return summary
    verifier: Verifier | None = None
    if not broker:
        try:
            verifier = Verifier.from_settings(settings)
        except SettingsError as exc:
            summary.error = str(exc)
            return summary
    deadline = time.monotonic() + seconds

    consumer = KafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        group_id=settings.kafka_redrive_group,
        client_id="openg2p-audit-redrive",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=500,
        request_timeout_ms=30000,
        bootstrap_timeout_ms=10000,  # an unreachable broker fails the pass, not the whole ping
    )
    try:
        available = consumer.partitions_for_topic(topic)
        if not available:
            summary.skipped = f"topic {topic!r} does not exist"
            return summary
        tps = [TopicPartition(topic, p) for p in sorted(available)]
        first = consumer.beginning_offsets(tps)
        ends = consumer.end_offsets(tps)
        starts: dict[TopicPartition, int] = {}
        for tp in tps:
            done = consumer.committed(tp)
            starts[tp] = max(done if done is not None else 0, first[tp])
        summary.committed = {tp.partition: starts[tp] for tp in tps}
        todo = {tp: ends[tp] for tp in tps if starts[tp] < ends[tp]}
        if todo:
            consumer.assign(list(todo))
            for tp in todo:
                consumer.seek(tp, starts[tp])

        def commit(offsets: dict[TopicPartition, int]) -> None:
            if not offsets:
                return
            if not dry_run:
                consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()})
            for tp, o in offsets.items():
                summary.committed[tp.partition] = o

        while todo and summary.dlq_seen < limit and time.monotonic() < deadline:
            wait_ms = max(1, min(500, int((deadline - time.monotonic()) * 1000)))
            polled = consumer.poll(timeout_ms=wait_ms, max_records=500)
            batch = _Batch()
            advanced: dict[TopicPartition, int] = {}
            for tp, records in polled.items():
                end = todo.get(tp)
                if end is None:
                    continue
                for record in records:
                    if record.offset >= end or summary.dlq_seen >= limit:
                        break
                    summary.dlq_seen += 1
                    _classify(record, tp.partition, batch, verifier)
                    advanced[tp] = record.offset + 1
            if batch.rows and not dry_run:
                if not _store_rows(conn, batch, summary):
                    return summary  # nothing of this batch committed: the next run redoes it
            elif batch.rows:
                summary.redriven += len(batch.rows)
            commit(advanced)
            _settle(summary, batch)  # counted once their offsets are committed
            if summary.dlq_seen >= limit:
                break
            for tp in list(todo):
                # position() also steps over offsets that hold no record (transaction markers).
                if consumer.position(tp) >= todo[tp]:
                    if summary.committed[tp.partition] < todo[tp]:
                        commit({tp: todo[tp]})
                    del todo[tp]
                    consumer.pause(tp)
        summary.remaining = sum(max(0, ends[tp] - summary.committed[tp.partition]) for tp in tps)
        return summary
    finally:
        consumer.close(autocommit=False)


@dataclass
class _Batch:
    """One poll's dead letters: rows to store, and permanent failures with their reasons."""

    rows: list[tuple[store.Row, dict[str, Any]]] = field(default_factory=list)
    permanent: list[tuple[dict[str, Any], str, str | None]] = field(default_factory=list)


def _classify(record, partition: int, batch: _Batch, verifier: Verifier | None) -> None:
    """A row to store for an attested event ingest produced; a record to leave otherwise.

    Without a verifier (the Trigger's dead letters) nothing is stored: those events never
    passed ingest's checks.
    """
    from .writer import Rejection

    headers = list(record.headers or [])
    attrs = error_attributes(headers, record.value)
    code = attrs["knativeerrorcode"]
    where = {"id": attrs["id"], "code": code, "partition": partition, "offset": record.offset}
    if verifier is None:
        why = _refusal_reason(code, attrs["knativeerrordata"])
        batch.permanent.append((
            where, "broker_dead_letter",
            f"a Broker event that never passed ingest ({why}); its sender must send it again",
        ))  # fmt: skip
        return
    try:
        event = event_from_dead_letter(headers, record.value, verifier)
        batch.rows.append((store.event_to_row(event), where))
    except Rejection as rej:
        batch.permanent.append((where, rej.reason, rej.message))
    except store.UnstorableEvent as exc:
        batch.permanent.append((where, "unstorable", str(exc)))
    except ValidationError as exc:
        batch.permanent.append((where, "invalid_event", str(exc).splitlines()[0]))


def dead_letters(
    settings: Settings, *, broker: bool = False, limit: int | None = None
) -> Iterator[dict[str, Any]]:
    """Every record of a dead-letter topic (the Trigger's with `broker`), oldest first, with
    what the redrive makes of it: `redriven` (stored, now or by its next run) or `left` (and
    why). Reads without a consumer group and stores nothing: `openg2p-audit dead-letters`."""
    from kafka import KafkaConsumer, TopicPartition

    topic = settings.kafka_broker_dlq_topic if broker else settings.kafka_dlq_topic
    verifier = None if broker else Verifier.from_settings(settings)
    consumer = KafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers, group_id=None, enable_auto_commit=False,
        client_id="openg2p-audit-dead-letters", request_timeout_ms=30000,
    )  # fmt: skip
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        if not tps:
            return
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        todo = {tp for tp in tps if consumer.position(tp) < ends[tp]}
        shown = 0
        while todo:
            for tp, records in consumer.poll(timeout_ms=1000, max_records=500).items():
                for record in records:
                    if record.offset >= ends[tp]:
                        continue
                    batch = _Batch()
                    _classify(record, tp.partition, batch, verifier)
                    headers = list(record.headers or [])
                    entry: dict[str, Any] = {
                        "topic": topic, "partition": tp.partition, "offset": record.offset,
                        "id": _header(headers, "ce_id"), "source": _header(headers, "ce_source"),
                        "type": _header(headers, "ce_type"),
                        "code": _header(headers, "ce_knativeerrorcode"),
                    }  # fmt: skip
                    if batch.rows:
                        entry["disposition"] = "redriven"
                    else:
                        _where, reason, message = batch.permanent[0]
                        entry.update(disposition="left", reason=reason, message=message)
                    yield entry
                    shown += 1
                    if limit is not None and shown >= limit:
                        return
            todo = {tp for tp in todo if consumer.position(tp) < ends[tp]}
    finally:
        consumer.close(autocommit=False)


def _settle(summary: RedriveSummary, batch: _Batch) -> None:
    """Count, report and log a batch's permanent failures."""
    for where, reason, message in batch.permanent:
        summary.dlq_permanent_seen += 1
        if not summary.dry_run:
            DLQ_PERMANENT.labels(reason).inc()
        if len(summary.permanent) < PERMANENT_SAMPLES:
            summary.permanent.append(
                {**where, "reason": reason, **({"message": message} if message else {})}
            )
        log.warning(
            "dead-letter record %s stays in the DLQ: %s", where["id"], reason,
            extra={**where, "reason": reason},
        )  # fmt: skip


def _store_rows(conn: pg8000.native.Connection, batch: _Batch, summary: RedriveSummary) -> bool:
    """Insert one batch; False (with `error` set) when the database is unavailable."""
    rows = batch.rows
    try:
        try:
            result = store.insert_events(conn, [row for row, _ in rows])
            summary.inserted += result.inserted
            summary.duplicates += result.duplicates
            summary.redriven += len(rows)
            DLQ_REDRIVEN.inc(len(rows))
            return True
        except Exception as exc:
            if not store.is_permanent(exc):
                raise
        # One row PostgreSQL refuses must not hold back the others: one by one.
        for row, where in rows:
            try:
                result = store.insert_events(conn, [row])
            except Exception as exc:
                if not store.is_permanent(exc):
                    raise
                batch.permanent.append((where, "database_refused", str(exc)))
                continue
            summary.inserted += result.inserted
            summary.duplicates += result.duplicates
            summary.redriven += 1
            DLQ_REDRIVEN.inc()
        return True
    except Exception as exc:  # noqa: BLE001 - reported; offsets stay uncommitted
        summary.error = f"database unavailable during redrive: {exc}"
        log.error("redrive stopped, offsets not committed: %s", exc)
        return False


# --------------------------------------------------------------------------- a whole run


def _redrive_pass(
    settings: Settings, conn: pg8000.native.Connection, dry_run: bool, *, broker: bool
) -> RedriveSummary:
    """One dead-letter topic's pass; Kafka trouble is reported in the summary, not raised."""
    try:
        return redrive(settings, conn, dry_run=dry_run, broker=broker)
    except Exception as exc:  # noqa: BLE001 - Kafka trouble is reported
        return RedriveSummary(
            topic=settings.kafka_broker_dlq_topic if broker else settings.kafka_dlq_topic,
            group=settings.kafka_redrive_group,
            dry_run=dry_run,
            error=f"dead-letter topic unavailable: {exc}",
        )


def _try_lock(conn: pg8000.native.Connection, wait: float) -> bool:
    deadline = time.monotonic() + wait
    while True:
        got = store.try_advisory_lock(conn, RUN_LOCK)
        if got or time.monotonic() >= deadline:
            return got
        time.sleep(0.1)


def _unlock(conn: pg8000.native.Connection) -> None:
    # A lost connection has released the session lock already.
    with contextlib.suppress(Exception):
        store.advisory_unlock(conn, RUN_LOCK)


def _seal(settings: Settings, conn: pg8000.native.Connection, summary: UpkeepSummary) -> None:
    """Seal the closed hours; a failure is the run's error, after the partitions are done."""
    if settings.integrity_signing_key_file is None:
        summary.seal = {"skipped": "INTEGRITY_SIGNING_KEY_FILE is not set"}
        return
    try:
        result = sealing.seal(settings, conn)
    except sealing.SealingError as exc:
        summary.seal = {"error": str(exc)}
        summary.status, summary.error = "error", str(exc)
        return
    summary.seal = result.as_dict()
    HOURS_SEALED.inc(len(result.sealed))
    SUPPLEMENTS.inc(len(result.supplements))
    if result.missing:
        summary.status = "error"
        summary.error = f"rows missing from sealed hours: {result.missing}"
    elif result.publish_error:
        summary.status = "error"
        summary.error = f"digests not published to Kafka: {result.publish_error}"


def run_maintenance(
    settings: Settings,
    *,
    now: datetime | None = None,
    dry_run: bool = False,
    redrive_dlq: bool = True,
    seal_hours: bool = True,
    lock_wait: float = LOCK_WAIT_SECONDS,
) -> UpkeepSummary:
    """One run: lock, partition upkeep, sealing, dead-letter redrive.

    Raises when the partition work fails (database unreachable, a lock timeout);
    a redrive failure is returned with status "error" after the partitions are done.
    """
    started = time.perf_counter()
    conn = store.connect(settings, application_name="openg2p-audit-maintenance")
    try:
        if not _try_lock(conn, lock_wait):
            summary = UpkeepSummary(
                now=(now or datetime.now(UTC)).astimezone(UTC).isoformat(),
                dry_run=dry_run,
                status="skipped",
                skipped="another run holds the lock",
            )
        else:
            try:
                summary = upkeep(settings, conn, now=now, dry_run=dry_run)
                if seal_hours and not dry_run:
                    _seal(settings, conn, summary)
                if redrive_dlq:
                    summary.redrive = _redrive_pass(settings, conn, dry_run, broker=False)
                    summary.broker_dead_letters = _redrive_pass(
                        settings, conn, dry_run, broker=True
                    )
                    for part in (summary.redrive, summary.broker_dead_letters):
                        if part.error and summary.status != "error":
                            summary.status = "error"
                            summary.error = part.error
            finally:
                _unlock(conn)
    finally:
        conn.close()
    summary.duration_ms = round((time.perf_counter() - started) * 1000)
    return summary


# --------------------------------------------------------------------------- the function


def handle_ping(cloud_event) -> dict[str, Any]:
    """One maintenance run for one ping (any CloudEvent), blocking until it is done.

    Returns (and logs) the JSON summary once the work is committed; raises
    MaintenanceError when it is not, so the function answers 500 and the
    PingSource retries.
    """
    configure_logging()
    event_type = cloud_event["type"] if cloud_event is not None else None
    if event_type != PING_TYPE:
        log.info("maintenance triggered by an event of type %s", event_type)
    settings = load_settings()
    if not settings.database_configured:
        RUNS.labels("error").inc()
        log.error("maintenance failed: DATABASE_URL (or DB_HOST) is not set")
        raise MaintenanceError("DATABASE_URL (or DB_HOST) is not set")
    try:
        summary = run_maintenance(settings)
    except Exception as exc:
        RUNS.labels("error").inc()
        what = "database unavailable" if _unreachable(exc) else "maintenance failed"
        log.error(
            "%s (%s): %s; nothing reported done, the ping should be retried",
            what, settings.database_dsn, exc, extra={"status": "error"},
        )  # fmt: skip
        raise MaintenanceError(f"{what}: {exc}") from exc
    report = summary.as_dict()
    RUNS.labels(summary.status).inc()
    if summary.status == "error":
        log.error("maintenance incomplete: %s", summary.error, extra={"summary": report})
        raise MaintenanceError(summary.error or "maintenance incomplete")
    log.info("maintenance %s", summary.status, extra={"summary": report})
    return report


def _unreachable(exc: BaseException) -> bool:
    """A lost or refused connection, as opposed to an error PostgreSQL reported."""
    return isinstance(exc, InterfaceError | OSError) or store.sqlstate(exc) in (
        "57P01",  # admin_shutdown
        "57P03",  # cannot_connect_now
    )


def _json(status: int, body: dict[str, Any]) -> Response:
    return Response(json.dumps(body, default=str), status, media_type="application/json")


_gate: tuple[WorkloadGate | None] | None = None


def startup() -> None:
    """Check who may trigger a run when the server starts (functions/maintenance/main.py)."""
    bound_request_headers(load_settings())
    gate()


def gate() -> WorkloadGate | None:
    """Only the PingSource's OIDC identity may start a run (None when MAINTENANCE_AUTH=disabled).

    A run drops expired partitions, seals hours and redrives dead letters: not something
    for anyone who can reach the Service to set off.
    """
    global _gate
    if _gate is None:
        settings = load_settings()
        if settings.maintenance_auth == "required":
            _gate = (WorkloadGate(
                settings, prefix="MAINTENANCE_AUTH", issuer=settings.maintenance_auth_issuer,
                audience=settings.maintenance_auth_audience,
                subjects=settings.maintenance_auth_subjects,
            ),)  # fmt: skip
        else:
            configure_logging()
            log.warning(
                "MAINTENANCE_AUTH=disabled: anyone who reaches maintenance can start a run; "
                "never run a deployment like this"
            )
            _gate = (None,)
    return _gate[0]


async def maintain(request: Request) -> Response:
    """functions-framework aio HTTP target (served with `--asgi`), fired hourly by a PingSource.

    It reads the ping CloudEvent itself rather than being declared a
    `cloudevent` function: functions-framework's ASGI app routes only POST to
    those, and the probes and `/metrics` are GETs on the same port. The run
    blocks on PostgreSQL and Kafka, so it goes to a thread; the answer (200
    with the summary, or 500 so the PingSource retries) comes once it is done.
    """
    path = request.scope["path"].rstrip("/") or "/"  # request.url would parse the whole URL
    if request.method in ("GET", "HEAD"):
        if path == "/metrics":
            return metrics_response()
        # Readiness is liveness here: a run checks PostgreSQL and Kafka itself and fails
        # (so the PingSource retries) when they are away; an idle pod needs neither.
        if path in ("/healthz", "/readyz"):
            return _json(200, {"status": "ok"})
        return _json(404, {"error": "not_found", "message": f"no GET {path}"})
    if request.method != "POST":
        return _json(405, {"error": "method_not_allowed", "message": "pings are POSTed"})
    workloads = gate()
    if workloads is not None:
        refused = await workloads.refusal(request)
        if refused is not None:
            return refused
    body = await request.body()
    try:
        event = from_http(dict(request.headers), body)
    except cloudevents_exceptions.GenericException as exc:
        return _json(400, {"error": "not_a_cloudevent", "message": str(exc)})
    try:
        report = await asyncio.to_thread(handle_ping, event)
    except MaintenanceError as exc:
        return _json(500, {"error": "maintenance_failed", "message": str(exc)})
    return _json(200, report)
