"""The bulk path: read a range of the events topic straight from Kafka into the store.

For replay and backfill (a restored database, a writer bug, a new deployment
seeded from the topic's retention). It reads the range in large batches and
stores them with the same `store.insert_events` as the HTTP writer, so a
record that is already in the table is skipped, never doubled: replaying a
range twice, or a range the KafkaSource is also delivering, is harmless.

It reads with no consumer group and commits no offsets, so it never moves the
KafkaSource's position. The range is fixed when it starts (the end defaults
to the partitions' current end), so it always finishes.

Only ingest's own records are stored, as the writer takes them: each one's
attestation must verify (attestation.py), and it is decoded and checked by the
writer's decoder (`writer.event_from_attributes`). Records that can never be
stored (a record another producer wrote to the topic, a contract violation)
are reported (partition, offset, reason) and skipped; the KafkaSource sent the
same records to the dead-letter topic when it first met them.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from multiprocessing import get_context
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from pydantic import ValidationError

from . import store
from .attestation import Verifier
from .contract import AuditEvent
from .kafka_binding import NotBinary, decode_record
from .settings import Settings
from .writer import Rejection, event_from_attributes

log = logging.getLogger(__name__)

# Transient database failures are retried this many times (with backoff) before giving up.
_RETRIES = 5


class ReplayError(RuntimeError):
    """The replay stopped early; `resume` holds the offsets to restart from."""

    def __init__(self, message: str, resume: dict[int, int]):
        super().__init__(message, resume)  # both in args: it crosses process boundaries
        self.message = message
        self.resume = resume

    def __str__(self) -> str:
        return self.message


@dataclass
class ReplaySummary:
    records: int = 0
    inserted: int = 0
    duplicates: int = 0
    rejected: int = 0
    batches: int = 0
    seconds: float = 0.0
    ranges: dict[int, tuple[int, int]] = field(default_factory=dict)  # partition -> [start, end)

    @property
    def rows_per_second(self) -> float:
        return self.records / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class RejectedRecord:
    partition: int
    offset: int
    reason: str
    message: str


def event_from_record(
    headers: list[tuple[str, bytes]], value: bytes | None, verifier: Verifier
) -> AuditEvent:
    """A record as the writer would take it from a KafkaSource; Rejection if never storable."""
    try:
        attrs = decode_record(headers)
    except NotBinary as exc:
        raise Rejection(400, "not_binary", str(exc)) from None
    except ValueError as exc:
        raise Rejection(400, "not_a_cloudevent", f"unreadable headers: {exc}") from None
    return event_from_attributes(attrs, value, verifier)


def _to_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def plan_ranges(
    consumer: KafkaConsumer,
    topic: str,
    *,
    from_offset: int | None,
    from_time: datetime | None,
    to_offset: int | None,
    to_time: datetime | None,
    partitions: list[int] | None,
) -> dict[TopicPartition, tuple[int, int]]:
    """[start, end) offsets per partition, fixed before reading starts."""
    available = consumer.partitions_for_topic(topic)
    if not available:
        raise ReplayError(f"topic {topic!r} does not exist or has no partitions", {})
    wanted = sorted(available if partitions is None else set(partitions) & available)
    tps = [TopicPartition(topic, p) for p in wanted]
    first = consumer.beginning_offsets(tps)
    last = consumer.end_offsets(tps)
    starts = dict(first)
    if from_offset is not None:
        starts = {tp: max(from_offset, first[tp]) for tp in tps}
    if from_time is not None:
        found = consumer.offsets_for_times({tp: _to_ms(from_time) for tp in tps})
        starts = {tp: (found[tp].offset if found[tp] else last[tp]) for tp in tps}
    ends = dict(last)
    if to_offset is not None:
        ends = {tp: min(to_offset, last[tp]) for tp in tps}
    if to_time is not None:
        found = consumer.offsets_for_times({tp: _to_ms(to_time) for tp in tps})
        ends = {tp: min(ends[tp], found[tp].offset if found[tp] else last[tp]) for tp in tps}
    return {tp: (starts[tp], ends[tp]) for tp in tps}


class _Inserter:
    """Stores batches on a thread of its own, so decoding the next batch overlaps the commit."""

    def __init__(
        self,
        settings: Settings,
        on_reject: Callable[[RejectedRecord], None],
        committed: dict[int, int],
    ):
        self.settings = settings
        self.on_reject = on_reject
        self.committed = committed
        self.conn = store.connect(settings, application_name="openg2p-audit-replay")
        store.ensure_schema(self.conn)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="replay-insert")
        self.pending: Future | None = None

    def submit(self, rows: list[store.Row], where: list[tuple[int, int]], summary: ReplaySummary):
        self.wait()
        self.pending = self.pool.submit(self._store, rows, where, summary)

    def wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.pool.shutdown(wait=True)
            self.conn.close()

    def _store(self, rows: list[store.Row], where: list[tuple[int, int]], summary: ReplaySummary):
        result = self._insert_retrying(rows, where)
        summary.inserted += result.inserted
        summary.duplicates += result.duplicates
        summary.batches += 1
        _advance(self.committed, where)

    def _insert_retrying(self, rows: list[store.Row], where: list[tuple[int, int]]):
        delay = 0.5
        for attempt in range(_RETRIES + 1):
            try:
                return store.insert_events(self.conn, rows)
            except Exception as exc:
                if store.is_permanent(exc):
                    return self._isolate(rows, where)
                if attempt == _RETRIES:
                    raise
                log.warning("database unavailable (%s); retrying in %.1fs", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 10)
                self._reconnect()
        raise AssertionError("unreachable")

    def _reconnect(self) -> None:
        try:
            self.conn.close()
        except Exception:
            log.debug("closing a broken connection failed", exc_info=True)
        try:
            self.conn = store.connect(self.settings, application_name="openg2p-audit-replay")
        except Exception:
            log.debug("reconnect failed", exc_info=True)

    def _isolate(self, rows: list[store.Row], where: list[tuple[int, int]]) -> store.InsertResult:
        """One row PostgreSQL refuses must not stop the others: store them one by one."""
        inserted = duplicates = 0
        for row, (partition, offset) in zip(rows, where, strict=True):
            try:
                result = store.insert_events(self.conn, [row])
            except Exception as exc:
                if not store.is_permanent(exc):
                    raise
                self.on_reject(RejectedRecord(partition, offset, "database_refused", str(exc)))
                continue
            inserted += result.inserted
            duplicates += result.duplicates
        return store.InsertResult(inserted, duplicates)


def _consumer(settings: Settings, batch_size: int) -> KafkaConsumer:
    return KafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        max_poll_records=batch_size,
        fetch_max_bytes=64 * 1024 * 1024,
        max_partition_fetch_bytes=16 * 1024 * 1024,
        request_timeout_ms=30000,
    )


def replay(
    settings: Settings,
    *,
    from_offset: int | None = None,
    from_time: datetime | None = None,
    to_offset: int | None = None,
    to_time: datetime | None = None,
    partitions: list[int] | None = None,
    batch_size: int | None = None,
    workers: int = 1,
    on_reject: Callable[[RejectedRecord], None] | None = None,
) -> ReplaySummary:
    """Store every record of the range; return what happened. Raises ReplayError to resume.

    With workers > 1 the partitions are shared out among that many processes:
    decoding and validating is CPU work that one Python process does on one core.
    """
    Verifier.from_settings(settings)  # without the keys nothing could be stored: say so now
    batch_size = batch_size or settings.replay_batch_size
    started = time.perf_counter()
    consumer = _consumer(settings, batch_size)
    try:
        ranges = plan_ranges(
            consumer, settings.kafka_events_topic, from_offset=from_offset, from_time=from_time,
            to_offset=to_offset, to_time=to_time, partitions=partitions,
        )  # fmt: skip
    finally:
        consumer.close()
    busy = sorted((tp for tp, (start, end) in ranges.items() if start < end), key=lambda t: t[1])
    groups = [busy[i::workers] for i in range(max(1, min(workers, len(busy))))]

    if len(groups) <= 1:
        summary, rejects, error = _replay_ranges(settings, ranges, batch_size)
    else:
        summary, rejects, error = ReplaySummary(), [], None
        with ProcessPoolExecutor(len(groups), mp_context=get_context("spawn")) as pool:
            parts = pool.map(
                _replay_ranges,
                [settings] * len(groups),
                [{tp: ranges[tp] for tp in group} for group in groups],
                [batch_size] * len(groups),
            )
            for part, part_rejects, part_error in parts:
                for name in ("records", "inserted", "duplicates", "rejected", "batches"):
                    setattr(summary, name, getattr(summary, name) + getattr(part, name))
                rejects.extend(part_rejects)
                if part_error is not None:
                    error = error or part_error
                    error.resume.update(part_error.resume)
    summary.ranges = {tp.partition: r for tp, r in ranges.items()}
    summary.seconds = time.perf_counter() - started
    for rec in rejects:
        log.warning(
            "skipped record %d@%d: %s", rec.offset, rec.partition, rec.message,
            extra={"partition": rec.partition, "offset": rec.offset, "reason": rec.reason},
        )  # fmt: skip
        if on_reject is not None:
            on_reject(rec)
    if error is not None:
        raise error
    return summary


def _replay_ranges(
    settings: Settings, ranges: dict[TopicPartition, tuple[int, int]], batch_size: int
) -> tuple[ReplaySummary, list[RejectedRecord], ReplayError | None]:
    """One process's share: read these ranges, store them. Errors are returned, not raised,
    so that every process's progress is known."""
    summary = ReplaySummary()
    rejects: list[RejectedRecord] = []
    lock = threading.Lock()

    def rejected(rec: RejectedRecord) -> None:
        with lock:
            summary.rejected += 1
            rejects.append(rec)

    committed = {tp.partition: start for tp, (start, _) in ranges.items()}
    todo = {tp: end for tp, (start, end) in ranges.items() if start < end}
    if not todo:
        return summary, rejects, None
    consumer = _consumer(settings, batch_size)
    inserter: _Inserter | None = None
    try:
        consumer.assign(list(todo))
        for tp in todo:
            consumer.seek(tp, ranges[tp][0])
        inserter = _Inserter(settings, rejected, committed)
        _drain(
            Verifier.from_settings(settings), consumer, todo, batch_size, inserter, summary,
            rejected, committed,
        )  # fmt: skip
        inserter.close()
        inserter = None
        return summary, rejects, None
    except Exception as exc:  # noqa: BLE001 - handed back with the offsets to resume from
        if inserter is not None:
            with contextlib.suppress(Exception):
                inserter.close()
        message = str(exc) if isinstance(exc, ReplayError) else f"replay stopped: {exc}"
        return summary, rejects, ReplayError(message, dict(committed))
    finally:
        consumer.close()


def _drain(
    verifier: Verifier,
    consumer: KafkaConsumer,
    todo: dict[TopicPartition, int],
    batch_size: int,
    inserter: _Inserter,
    summary: ReplaySummary,
    rejected: Callable[[RejectedRecord], None],
    committed: dict[int, int],
) -> None:
    rows: list[store.Row] = []
    where: list[tuple[int, int]] = []
    idle_since = time.monotonic()
    while todo:
        polled = consumer.poll(timeout_ms=500, max_records=batch_size)
        for tp, records in polled.items():
            end = todo.get(tp)
            if end is None:
                continue
            for record in records:
                if record.offset >= end:
                    break
                summary.records += 1
                try:
                    event = event_from_record(record.headers or [], record.value, verifier)
                    rows.append(store.event_to_row(event))
                    where.append((tp.partition, record.offset))
                except Rejection as rej:
                    rejected(RejectedRecord(tp.partition, record.offset, rej.reason, rej.message))
                except (store.UnstorableEvent, ValidationError) as exc:
                    rejected(RejectedRecord(tp.partition, record.offset, "unstorable", str(exc)))
        for tp in list(todo):
            # position() also steps over offsets that hold no record (transaction markers).
            if consumer.position(tp) >= todo[tp]:
                del todo[tp]
                consumer.pause(tp)
        if polled:
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since > 60:
            raise ReplayError("no records arrived for 60s before the range end", committed)
        if len(rows) >= batch_size or (not todo and rows):
            inserter.submit(rows, where, summary)
            rows, where = [], []


def _advance(committed: dict[int, int], where: list[tuple[int, int]]) -> None:
    """Offsets a resumed replay may start from: everything before them is committed.

    Batches hold records of several partitions, so a resume may re-read some
    records; that is harmless (duplicates are skipped).
    """
    for partition, offset in where:
        committed[partition] = max(committed.get(partition, 0), offset + 1)


def describe(summary: ReplaySummary) -> dict[str, Any]:
    return {
        "records": summary.records,
        "inserted": summary.inserted,
        "duplicates": summary.duplicates,
        "rejected": summary.rejected,
        "batches": summary.batches,
        "seconds": round(summary.seconds, 3),
        "rows_per_second": round(summary.rows_per_second),
        "ranges": {str(p): list(r) for p, r in sorted(summary.ranges.items())},
    }
