"""The writer function: KafkaSource deliveries → committed rows in PostgreSQL.

A Knative KafkaSource POSTs each Kafka record as one binary-mode CloudEvent
and reads nothing but the status code:

- 2xx: the row is committed (201) or was already there (200; a re-send whose
  content differs from the stored row is recorded in `audit_conflicts`, counted
  and logged, and the stored row stays as it is). Never earlier:
  the KafkaSource commits the record's offset on 2xx, so an answer before the
  commit could lose the event.
- 503: a transient failure (database down, timeout). The KafkaSource retries.
- 400/422: the event can never be stored. The KafkaSource sends it to the
  dead-letter sink; retrying would block its partition forever.

Many deliveries are in flight per instance. Committing each alone would cap
the writer at roughly one fsync per event, so the requests of one process
share transactions (group commit): each delivery, waiting on the event loop
without holding a thread, hands its row to one committer thread; the
committer puts everything pending into one INSERT, commits, and wakes each
delivery with its own outcome. Under light load a batch is a single row and
nothing waits for company.

State here is only a cache (the connection, the partitions known to exist);
every answer reflects what PostgreSQL committed, so the function can scale to
zero and back at any time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pg8000.native
from prometheus_client import Counter, Histogram
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from . import store
from .attestation import EXTENSION as ATTESTATION
from .attestation import NotAttested, Verifier, is_delivery_metadata
from .auth import WorkloadGate
from .contract import AuditEvent, is_cloudevents_media
from .http_binding import binary_attributes, media_type
from .observability import configure_logging, metrics_response, prepare_multiprocess_metrics
from .serving import bound_request_headers
from .settings import Settings, load_settings

log = logging.getLogger("openg2p_audit.writer")

# What a KafkaSource delivers for a record without `ce_` headers (its value becomes `data`):
# never an event of ingest's, so never stored.
WRAPPED_TYPE = "dev.knative.kafka.event"

prepare_multiprocess_metrics()
ROWS_INSERTED = Counter("audit_writer_rows_inserted_total", "Rows committed to audit_events")
DUPLICATES = Counter(
    "audit_writer_duplicates_total", "Deliveries whose row already existed (answered 2xx)"
)
REJECTIONS = Counter(
    "audit_writer_rejections_total", "Deliveries answered 4xx, by reason", ["reason"]
)
UNAVAILABLE = Counter(
    "audit_writer_unavailable_total", "Deliveries answered 503 (transient failures)", ["reason"]
)
CONFLICTS = Counter(
    "audit_writer_conflicts_total",
    "Re-sends whose content differs from the stored row (answered 200, kept in audit_conflicts)",
)
BATCH_SIZE = Histogram(
    "audit_writer_batch_size",
    "Deliveries committed in one transaction",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
)
COMMIT_SECONDS = Histogram(
    "audit_writer_commit_seconds",
    "Time to insert and commit one batch",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


class Rejection(Exception):
    """An event that can never be stored: answered 4xx with a reason."""

    def __init__(self, status: int, reason: str, message: str, **extra: Any):
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": self.reason, "message": self.message, **self.extra}


# --------------------------------------------------------------------------- parsing


def _validation_errors(exc: ValidationError) -> list[dict[str, str]]:
    return [
        {"field": ".".join(str(p) for p in err["loc"]) or "event", "problem": err["msg"]}
        for err in exc.errors(include_url=False, include_input=False)
    ]


def validate_attributes(candidate: dict[str, Any]) -> AuditEvent:
    """The event from CloudEvent attributes plus `data`; Rejection if it can never be stored."""
    if not candidate.get("time"):
        # Without a time the contract would default it to "now": each redelivery
        # would then get another primary key and another row.
        raise Rejection(
            422,
            "missing_time",
            "the event has no time attribute; it is required so that a redelivery is "
            "recognised as a duplicate",
            id=candidate.get("id"),
        )
    try:
        return AuditEvent.model_validate(candidate)
    except ValidationError as exc:
        raise Rejection(
            422,
            "invalid_event",
            "the event violates the audit event contract",
            id=candidate.get("id"),
            errors=_validation_errors(exc),
        ) from None


def event_from_attributes(
    attrs: dict[str, str], data: bytes | None, verifier: Verifier
) -> AuditEvent:
    """The one decoder of the writer, the dead-letter redrive and the replay.

    `attrs` are a binary-mode event's own attributes, decoded (from the delivery's
    `ce-*` headers, or a record's `ce_*` headers); `data` its body bytes. The event
    is taken only when ingest's attestation verifies (attestation.py): anything else
    is a Rejection, for good. Nothing inside `data` is ever read as an envelope: a
    record that reached the topic without CloudEvents headers, which the KafkaSource
    delivers wrapped as `dev.knative.kafka.event`, is not one of ingest's events
    and carries no attestation of its own. Knative's delivery metadata
    (`knativekafka*`, and a dead letter's `knativeerror*`) and the attestation
    itself are left out of the event; every other attribute reaches the row.
    """
    event_id = attrs.get("id")
    try:
        verifier.verify(attrs, data)
    except NotAttested as exc:
        wrapped = attrs.get("type") == WRAPPED_TYPE
        raise Rejection(
            422,
            "not_attested",
            (
                "the Kafka record had no CloudEvents headers (the KafkaSource delivered it "
                "wrapped as dev.knative.kafka.event): it was not produced by ingest"
                if wrapped
                else f"not stored: {exc}; only events that passed ingest's checks are stored"
            ),
            id=event_id,
        ) from None
    candidate: dict[str, Any] = {
        k: v for k, v in attrs.items() if k != ATTESTATION and not is_delivery_metadata(k)
    }
    try:
        candidate["data"] = json.loads(data) if data else None
    except (ValueError, UnicodeDecodeError):
        raise Rejection(
            400, "data_not_json", "the event's data is not valid JSON", id=event_id
        ) from None
    return validate_attributes(candidate)


def _not_a_cloudevent(detail: str) -> Rejection:
    return Rejection(
        400, "not_a_cloudevent", f"the request is not a binary-mode CloudEvent: {detail}"
    )


def parse_delivery(headers: Any, body: bytes, verifier: Verifier) -> AuditEvent:
    """Parse and validate one delivery; raises Rejection for anything that cannot be stored.

    Only binary mode is read, as a KafkaSource delivers the events topic's records
    (ingest writes nothing else): a structured-mode body is never parsed as an event.
    Every attribute that arrives is kept, so extensions reach the row; a `time` is
    never filled in (see `validate_attributes`).
    """
    items = [(k.lower(), v) for k, v in headers.items()]
    content_type = next((v for k, v in items if k == "content-type"), None)
    if is_cloudevents_media(content_type or ""):
        raise _not_a_cloudevent(
            f"Content-Type {media_type(content_type)} is a structured or batched CloudEvent; "
            "the writer takes the binary-mode deliveries of its KafkaSource only"
        )
    if not any(k == "ce-specversion" for k, _ in items):
        raise _not_a_cloudevent("no ce-specversion header")
    return event_from_attributes(binary_attributes(items, content_type), body, verifier)


# --------------------------------------------------------------------------- group commit


@dataclass(eq=False)
class _Pending:
    """One delivery waiting for its transaction.

    A waiter on the event loop awaits `future`; any other (tools, tests) waits
    on a held lock, the cheapest one-shot signal between threads.
    """

    row: store.Row
    future: asyncio.Future[None] | None = None
    status: str = ""  # stored | duplicate | rejected | unavailable
    detail: str = ""
    _signal: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self._signal.acquire()

    def wait(self, timeout: float) -> bool:
        return self._signal.acquire(timeout=timeout)

    def done(self) -> None:
        if self._signal.locked():
            self._signal.release()


def _resolve(items: list[_Pending]) -> None:
    """On the event loop: wake every delivery of one committed batch."""
    for item in items:
        if item.future is not None and not item.future.done():
            item.future.set_result(None)


def _wake(batch: list[_Pending]) -> None:
    """From the committer thread: one call into each waiting event loop per batch."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Pending]] = {}
    for item in batch:
        item.done()
        if item.future is not None:
            by_loop.setdefault(item.future.get_loop(), []).append(item)
    for loop, items in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
            loop.call_soon_threadsafe(_resolve, items)


class GroupCommitter:
    """One committer thread and one connection per process; deliveries await it."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._queue: queue.SimpleQueue[_Pending] = queue.SimpleQueue()
        self._conn: pg8000.native.Connection | None = None
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.schema_ready = threading.Event()

    # Delivery side (the event loop).

    async def submit(self, row: store.Row) -> _Pending:
        """Queue the row for the next transaction; return once it is committed (or not)."""
        self._ensure_thread()
        item = _Pending(row, asyncio.get_running_loop().create_future())
        self._queue.put(item)
        try:
            async with asyncio.timeout(self.settings.writer_wait_seconds):
                await asyncio.shield(item.future)
        except TimeoutError:
            item.status = "unavailable"
            item.detail = f"the commit did not finish within {self.settings.writer_wait_seconds}s"
        return item

    def alive(self) -> bool:
        return self._thread is None or self._thread.is_alive()

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="audit-group-commit", daemon=True
                )
                self._thread.start()

    # Committer side.

    def _loop(self) -> None:
        limit = self.settings.writer_batch_max
        while True:
            batch = [self._queue.get()]
            while len(batch) < limit:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._commit(batch)
            except BaseException as exc:  # no handler may wait forever
                log.exception("group commit failed unexpectedly")
                for item in batch:
                    self._finish(item, "unavailable", f"internal error: {exc}")
            finally:
                _wake(batch)

    def _connection(self) -> tuple[pg8000.native.Connection, bool]:
        """The open connection, or a new one (schema ensured); the flag says it is new."""
        if self._conn is not None:
            return self._conn, False
        conn = store.connect(self.settings, application_name="openg2p-audit-writer")
        try:
            store.ensure_schema(conn, self.settings.partitions_ahead_months)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self.schema_ready.set()
        return conn, True

    def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # it is broken already
                self._conn.close()
            self._conn = None

    def _insert(self, rows: list[store.Row]) -> store.InsertResult:
        """Insert on the open connection; if that connection turns out stale, once on a new one."""
        conn, fresh = self._connection()
        try:
            return store.insert_events(conn, rows)
        except Exception as exc:
            if store.is_permanent(exc):
                raise
            self._drop_connection()
            if fresh:
                raise
            log.warning("database connection lost (%s); reconnecting", exc)
        conn, _ = self._connection()
        try:
            return store.insert_events(conn, rows)
        except Exception as exc:
            if not store.is_permanent(exc):
                self._drop_connection()
            raise

    def _commit(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        try:
            result = self._insert([item.row for item in batch])
        except Exception as exc:  # noqa: BLE001 - classified below: permanent or transient
            if store.is_permanent(exc) and len(batch) > 1:
                # One event PostgreSQL refuses must not fail the others: retry one by one.
                for item in batch:
                    self._commit([item])
                return
            if store.is_permanent(exc):
                self._finish(batch[0], "rejected", _db_message(exc))
                return
            log.warning("batch of %d not stored: %s", len(batch), exc)
            for item in batch:
                self._finish(item, "unavailable", f"database unavailable: {_db_message(exc)}")
            return
        COMMIT_SECONDS.observe(time.perf_counter() - started)
        BATCH_SIZE.observe(len(batch))
        ROWS_INSERTED.inc(result.inserted)
        DUPLICATES.inc(result.duplicates)
        CONFLICTS.inc(len(result.conflicts))
        for item, new in zip(batch, result.new, strict=True):
            self._finish(item, "stored" if new else "duplicate", "")

    @staticmethod
    def _finish(item: _Pending, status: str, detail: str) -> None:
        item.status = status
        item.detail = detail

    def probe(self) -> None:
        """Raise unless the database answers, on a connection of its own (thread safety)."""
        conn = store.connect(
            self.settings.model_copy(update={"db_socket_timeout": 3.0}),
            application_name="openg2p-audit-writer-probe",
        )
        try:
            if not self.schema_ready.is_set():
                store.ensure_schema(conn, self.settings.partitions_ahead_months)
                self.schema_ready.set()
            conn.run("SELECT 1")
        finally:
            conn.close()


def _db_message(exc: BaseException) -> str:
    if exc.args and isinstance(exc.args[0], dict):
        err = exc.args[0]
        return f"{err.get('M', 'error')} (SQLSTATE {err.get('C', '?')})"
    return str(exc) or type(exc).__name__


# --------------------------------------------------------------------------- the function

_committer: GroupCommitter | None = None
_committer_pid: int | None = None
_committer_lock = threading.Lock()


def committer() -> GroupCommitter:
    """This process's committer. Created lazily: gunicorn forks after importing the module,
    and a thread started before the fork would not exist in the worker."""
    global _committer, _committer_pid
    pid = os.getpid()
    if _committer is None or _committer_pid != pid:
        with _committer_lock:
            if _committer is None or _committer_pid != pid:
                configure_logging()
                _committer = GroupCommitter(load_settings())
                _committer_pid = pid
    return _committer


_gate: tuple[WorkloadGate | None, Verifier] | None = None


def startup() -> None:
    """Check the delivery settings when the server starts (functions/writer/main.py).

    A writer that boots without a usable issuer, without its KafkaSource's identity or
    without the attestation keys would refuse every delivery and send the whole stream
    to the dead-letter topic; it must not boot.
    """
    bound_request_headers(load_settings())
    gate()


def gate() -> tuple[WorkloadGate | None, Verifier]:
    """Who may deliver (the KafkaSource's OIDC identity; None when WRITER_AUTH=disabled),
    and the check of ingest's attestation, which nothing turns off."""
    global _gate
    if _gate is None:
        settings = load_settings()
        origin = Verifier.from_settings(settings)
        if settings.writer_auth == "required":
            _gate = (WorkloadGate(
                settings, prefix="WRITER_AUTH", issuer=settings.writer_auth_issuer,
                audience=settings.writer_auth_audience, subjects=settings.writer_auth_subjects,
            ), origin)  # fmt: skip
        else:
            configure_logging()
            log.warning(
                "WRITER_AUTH=disabled: the writer takes deliveries from anyone, not only its "
                "KafkaSource (it still stores only events ingest attested); never run a "
                "deployment like this"
            )
            _gate = (None, origin)
    return _gate


async def _refused_delivery(request: Request) -> Response | None:
    """None when the delivery comes from the KafkaSource; else the 401 or 403."""
    workloads = gate()[0]
    if workloads is None:
        return None
    refused = await workloads.refusal(request)
    if refused is not None:
        REJECTIONS.labels({401: "unauthorized", 403: "forbidden"}.get(
            refused.status_code, "auth_unavailable")).inc()  # fmt: skip
    return refused


def _json(status: int, body: dict[str, Any], **headers: str) -> Response:
    # No `default=`: that would build a new encoder for every answer.
    return Response(json.dumps(body), status, headers, media_type="application/json")


def _unavailable(reason: str, message: str) -> Response:
    UNAVAILABLE.labels(reason).inc()
    return _json(503, {"error": reason, "message": message}, **{"Retry-After": "1"})


async def _ensure_started(c: GroupCommitter) -> Response | None:
    """The schema must exist before the first answer; None when it does."""
    if c.schema_ready.is_set():
        return None
    try:
        await asyncio.to_thread(c.probe)
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
        return _unavailable("database_unavailable", f"database unavailable: {_db_message(exc)}")
    return None


async def write(request: Request) -> Response:
    """functions-framework aio HTTP target (served with `--asgi`): every path lands here."""
    c = committer()
    path = request.scope["path"].rstrip("/") or "/"  # request.url would parse the whole URL
    if request.method == "GET":
        if path == "/healthz":
            ok = c.alive()
            return _json(200 if ok else 503, {"status": "ok" if ok else "committer stopped"})
        if path == "/metrics":
            return metrics_response()
        if path == "/readyz":
            try:
                await asyncio.to_thread(c.probe)
            except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
                return _json(503, {"status": "unavailable", "reason": _db_message(exc)})
            return _json(200, {"status": "ready"})
        return _json(404, {"error": "not_found", "message": f"no GET {path}"})
    if request.method != "POST":
        return _json(405, {"error": "method_not_allowed", "message": "deliveries are POSTed"})

    refused = await _refused_delivery(request)
    if refused is not None:
        return refused
    not_ready = await _ensure_started(c)
    if not_ready is not None:
        return not_ready
    body = await request.body()
    try:
        event = parse_delivery(request.headers, body, gate()[1])
        row = store.event_to_row(event)
    except Rejection as rej:
        REJECTIONS.labels(rej.reason).inc()
        log.warning("rejected delivery: %s", rej.message, extra={"reason": rej.reason})
        return _json(rej.status, rej.body())
    except store.UnstorableEvent as exc:
        REJECTIONS.labels("unstorable").inc()
        return _json(422, {"error": "unstorable", "message": str(exc), "id": event.id})

    item = await c.submit(row)
    if item.status == "stored":
        return _json(201, {"status": "stored", "id": row.id})
    if item.status == "duplicate":
        return _json(200, {"status": "duplicate", "id": row.id})
    if item.status == "rejected":
        REJECTIONS.labels("database_refused").inc()
        return _json(422, {"error": "database_refused", "message": item.detail, "id": row.id})
    return _unavailable("database_unavailable", item.detail or "not stored")
