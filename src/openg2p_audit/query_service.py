"""The query service (`audit-query`): investigators read the trail, and every read is audited.

A separate deployable with its own auth boundary: it holds a read-only
database role and no write path except the one every other audit event
takes, ingest's producer to the events topic. So:

- every endpoint but the probes needs a bearer token (`auth`), `audit.read`
  for queries and `audit.export` as well for exports;
- every answered read first emits `org.openg2p.audit.query.performed` (or
  `.exported`) with the token's subject as actor and the filters and row count
  as context, and answers only once Kafka acknowledged it. If it cannot, the
  answer is 503 and no row leaves the service: an unaudited read is a hole.
- bad input is a 400 whose JSON names the parameter, decided before any SQL
  runs; a tampered cursor is bad input.

Exports stream in keyset batches inside one read-only REPEATABLE READ
transaction. Their row count (needed for the audit event, which must be
durable before the first row goes out) is taken in the same snapshot, so the
event says exactly what the investigator received, up to `QUERY_EXPORT_MAX_ROWS`.

The `/ui` pages (`query_ui`) are served by the same function and share all of
the above.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar

from pg8000.exceptions import DatabaseError, InterfaceError
from prometheus_client import Counter, Histogram
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from . import query as reads
from .attestation import Attestor
from .auth import AuthError, Principal, TokenVerifier, authenticate, refusal
from .contract import AuditEvent
from .kafka_binding import encode
from .observability import configure_logging, metrics_response, prepare_multiprocess_metrics
from .policy import QUERY_SOURCE, QUERY_TYPE_PREFIX
from .producer import Unavailable, producer_for
from .serving import bound_request_headers
from .settings import SettingsError, load_settings

SETTINGS = load_settings()
configure_logging(SETTINGS.log_level.upper())
bound_request_headers(SETTINGS)
log = logging.getLogger("openg2p_audit.query_service")
if not SETTINGS.kafka_configured:
    raise SettingsError("KAFKA_BOOTSTRAP_SERVERS is not set: every read is audited through Kafka")
if not SETTINGS.database_configured:
    raise SettingsError("DATABASE_URL (or DB_HOST and friends) is not set")
VERIFIER = TokenVerifier(SETTINGS)
if SETTINGS.query_cursor_secret is not None:
    _problem = reads.cursor_secret_problem(SETTINGS.query_cursor_secret)
    if _problem:
        raise SettingsError(
            f"QUERY_CURSOR_SECRET {_problem}: with it anyone can sign cursors; put a generated "
            "key in the Secret audit-query (openssl rand -hex 32)"
        )
CURSORS = reads.CursorCodec(SETTINGS.query_cursor_secret)
if SETTINGS.query_cursor_secret is None:
    log.warning(
        "QUERY_CURSOR_SECRET is not set: cursors are signed with a key of this process only"
    )

# Reads come one at a time, not in bursts that could share a batch: the audit event is
# sent at once instead of lingering for company (ingest's linger setting is for ingest).
AUDIT_PRODUCER_SETTINGS = SETTINGS.model_copy(update={"ingest_linger_ms": 0})
# The read events are attested with the query service's own key: the writer stores them as
# this service's own events only (attestation.py).
ATTESTOR = Attestor.from_keys(SETTINGS.attestation_query_keys, "ATTESTATION_QUERY_KEYS")

READ_ROLE = "audit.read"
EXPORT_ROLE = "audit.export"
# Ingest refuses this source and type family from every caller (policy.py): these events
# come only from here, produced straight to Kafka, and the query service's attestation key
# attests nothing else (attestation.py).
SOURCE = QUERY_SOURCE
PERFORMED = QUERY_TYPE_PREFIX + "performed"
EXPORTED = QUERY_TYPE_PREFIX + "exported"
JSON_MEDIA = "application/json"

prepare_multiprocess_metrics()
REQUESTS = Counter(
    "audit_query_requests_total",
    "Answered requests, by endpoint and status",
    ["endpoint", "status"],
)
ROWS = Counter("audit_query_rows_total", "Rows answered, by endpoint", ["endpoint"])
BUSY = Counter(
    "audit_query_pool_exhausted_total",
    "Reads answered 503 because every connection of the pool was in use",
)
EXPORTS_CUT = Counter(
    "audit_query_exports_cut_total",
    "Exports ended before their last row: QUERY_EXPORT_MAX_SECONDS or QUERY_EXPORT_IDLE_SECONDS",
    ["reason"],
)
LATENCY = Histogram(
    "audit_query_seconds",
    "From the request to the answer's headers (exports: before the first row)",
    ["endpoint"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

_database: reads.Database | None = None

T = TypeVar("T")


def database() -> reads.Database:
    """This process's connections, made after the fork (a socket does not survive one)."""
    global _database
    if _database is None:
        _database = reads.Database(SETTINGS)
    return _database


class ReadFailed(Exception):
    """The read cannot be answered now (database or Kafka): 503."""

    def __init__(self, cause: str, message: str):
        super().__init__(message)
        self.cause = cause


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(
        json.dumps(body, ensure_ascii=False, default=str), status, headers, media_type=JSON_MEDIA
    )


def unavailable(exc: ReadFailed) -> Response:
    return json_response(
        503,
        {"error": "unavailable", "cause": exc.cause, "message": str(exc)},
        {"Retry-After": str(SETTINGS.ingest_retry_after_seconds)},
    )


async def in_database(work: Callable[..., T], *args: Any) -> T:
    """Run blocking database work on a pooled connection, off the event loop."""

    def run() -> T:
        with database().connection() as conn:
            return work(conn, *args)

    try:
        return await asyncio.to_thread(run)
    except reads.PoolExhausted as exc:
        raise _busy(exc) from exc
    except (DatabaseError, InterfaceError, OSError) as exc:
        log.warning("database unavailable: %s", exc)
        raise ReadFailed("database_unavailable", "the database did not answer") from exc


def _busy(exc: reads.PoolExhausted) -> ReadFailed:
    log.warning("read refused, answering 503: %s", exc)
    BUSY.inc()
    return ReadFailed(
        "database_busy", "every database connection of this instance is in use; retry shortly"
    )


# --------------------------------------------------------------------------- auditing reads


def read_event(
    kind: str, principal: Principal, context: dict[str, Any], request: Request,
    resource_id: str | None = None,
) -> AuditEvent:  # fmt: skip
    """The audit event that says who read what: the trail records its own readers."""
    actor: dict[str, Any] = {"type": "user", "id": principal.subject}
    if principal.name:
        actor["name"] = principal.name
    resource: dict[str, Any] = {"type": "audit_events"}
    if resource_id is not None:
        resource["id"] = resource_id
    attrs: dict[str, Any] = {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": SOURCE,
        "type": kind,
        "time": datetime.now(UTC),
        "data": {
            "actor": actor,
            "action": "export" if kind == EXPORTED else "query",
            "outcome": "success",
            "resource": resource,
            "context": {"endpoint": request.url.path, **context},
        },
    }
    traceparent = request.headers.get("traceparent")
    if traceparent:
        attrs["traceparent"] = traceparent
    try:
        return AuditEvent.model_validate(attrs)
    except ValueError:
        attrs.pop("traceparent", None)  # a malformed header must not block the read
        return AuditEvent.model_validate(attrs)


async def audit_read(event: AuditEvent) -> None:
    """Return once Kafka holds the event; ReadFailed otherwise."""
    try:
        record = encode(event, ATTESTOR)
        await producer_for(AUDIT_PRODUCER_SETTINGS).publish([record], time.monotonic())
    except Unavailable as exc:
        log.warning("read not audited, answering 503: %s", exc, extra={"cause": exc.cause})
        raise ReadFailed(
            "audit_unavailable", "the read could not be recorded in the audit trail; retry later"
        ) from exc


# --------------------------------------------------------------------------- the reads


async def list_events(
    principal: Principal, items: list[tuple[str, str]], request: Request
) -> dict[str, Any]:
    """One page (BadParameter, ReadFailed); audited before it is returned."""
    page_request = reads.parse_page(items, SETTINGS, CURSORS)
    page = await in_database(reads.fetch_page, page_request, CURSORS)
    context = {
        "filters": page_request.filters.as_params(),
        "limit": page_request.limit,
        "page": "next" if page_request.after else "first",
        "rows": len(page.events),
    }
    await audit_read(read_event(PERFORMED, principal, context, request))
    return {"events": page.events, "next_cursor": page.next_cursor}


async def get_event(principal: Principal, event_id: str, request: Request) -> list[dict]:
    """The stored events with this id (BadParameter, ReadFailed); audited before returned."""
    event_id = reads.parse_event_id(event_id)
    events = await in_database(reads.fetch_event, event_id)
    context = {"filters": {"id": event_id}, "rows": len(events)}
    await audit_read(read_event(PERFORMED, principal, context, request, resource_id=event_id))
    return events


class ExportCut(Exception):
    """The export hit one of its bounds (`cause`: duration, idle) and ends before its last row."""

    def __init__(self, cause: str, message: str):
        super().__init__(message)
        self.cause = cause


class _Export:
    """One export's connection and snapshot, used from worker threads one call at a time.

    The response streams from the event loop, but a client that goes away cancels
    the stream while a batch may still be running in its thread. So the end of the
    export (COMMIT, the connection back to the pool) takes the same lock, waiting
    for that batch, in a thread of its own: a cancelled task cannot be relied on to
    await anything more.

    `cut` ends the export from outside (its duration bound): the snapshot is let
    go at once (after the batch in progress) and the stream, wherever it is, ends
    without its last chunk, so the client cannot take a cut export for a whole one.
    """

    def __init__(self, filters: reads.Filters, fmt: str, cap: int):
        self.filters, self.fmt, self.cap = filters, fmt, cap
        self._holder = database().connection()
        self._lock = threading.Lock()
        self._conn = None
        self._chunks: Iterator[bytes] | None = None
        self._open = False
        self.cut_reason: str | None = None

    def begin(self) -> int:
        """Open the snapshot and count the rows (one past the cap, to know it truncates)."""
        with self._lock:
            self._conn = self._holder.__enter__()
            self._open = True
            try:
                self._conn.run("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                return reads.count_rows(self._conn, self.filters, self.cap + 1)
            except BaseException as exc:
                self._open = False
                self._holder.__exit__(type(exc), exc, exc.__traceback__)
                raise

    def next_chunk(self) -> bytes | None:
        with self._lock:
            if self.cut_reason is not None:
                raise ExportCut("duration", self.cut_reason)
            if not self._open:
                return None
            if self._chunks is None:
                self._chunks = reads.export_chunks(self._conn, self.filters, self.fmt, self.cap)
            return next(self._chunks, None)

    def close(self) -> None:
        with self._lock:
            if not self._open:
                return
            self._open = False
            try:
                self._conn.run("COMMIT")
            except Exception as exc:  # noqa: BLE001 - the pool decides what to do with it
                self._holder.__exit__(type(exc), exc, exc.__traceback__)
                return
            self._holder.__exit__(None, None, None)

    def close_soon(self) -> None:
        threading.Thread(target=self.close, name="export-close", daemon=True).start()

    def cut(self, reason: str) -> None:
        """End the export now, whatever the stream is doing (called on the event loop)."""
        if self.cut_reason is None:
            self.cut_reason = reason
        self.close_soon()


# The export is sent in pieces of this size, each of which the client must take within
# QUERY_EXPORT_IDLE_SECONDS (a batch of 5,000 rows is a few MiB).
SEND_BYTES = 256 * 1024


class _ExportResponse(StreamingResponse):
    """The export's body, bounded in time so that no reader holds a snapshot for long.

    Two bounds, each ending the response without its last chunk (the connection is
    closed mid-body, so the client sees an incomplete download, not a short one):

    - QUERY_EXPORT_MAX_SECONDS from the snapshot's start: a timer cuts the export
      even when nothing else runs (a stream never started, a send stuck for good);
    - QUERY_EXPORT_IDLE_SECONDS for the client to take each SEND_BYTES more: a
      reader that stopped reading is given up on long before the duration bound,
      one that reads slowly but steadily is not.

    The next batch is fetched while this one is sent: PostgreSQL and the driver work
    while the socket drains, and at most two batches are held however long the export.
    """

    def __init__(
        self, job: _Export, rows: int, timer: asyncio.TimerHandle, headers: dict[str, str],
        media_type: str,
    ):  # fmt: skip
        super().__init__((), 200, headers, media_type=media_type)
        self.job, self.rows, self.timer = job, rows, timer

    async def stream_response(self, send) -> None:
        job, idle = self.job, SETTINGS.query_export_idle_seconds
        pending: asyncio.Future | None = None
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})  # fmt: skip
            pending = asyncio.ensure_future(asyncio.to_thread(job.next_chunk))
            while (chunk := await pending) is not None:
                pending = asyncio.ensure_future(asyncio.to_thread(job.next_chunk))
                view = memoryview(chunk)
                for at in range(0, len(view), SEND_BYTES):
                    message = {"type": "http.response.body", "body": view[at : at + SEND_BYTES],
                               "more_body": True}  # fmt: skip
                    try:
                        await asyncio.wait_for(send(message), idle)
                    except TimeoutError:
                        raise ExportCut(
                            "idle",
                            f"the client took less than {SEND_BYTES // 1024} KiB in"
                            f" {idle:g} s (QUERY_EXPORT_IDLE_SECONDS)",
                        ) from None
                    if job.cut_reason is not None:  # the duration bound, mid-batch
                        raise ExportCut("duration", job.cut_reason)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            ROWS.labels("export").inc(self.rows)
        except ExportCut as exc:
            EXPORTS_CUT.labels(exc.cause).inc()
            log.warning("export ended before its last row: %s", exc, extra={"cause": exc.cause})
            # Returning without the last chunk: the server closes the connection mid-body.
        finally:
            if pending is not None:
                pending.cancel()
            job.close_soon()
            self.timer.cancel()  # a stream that never started keeps it: the snapshot is let go


async def export(principal: Principal, request: Request) -> Response:
    filters, fmt = reads.parse_export(list(request.query_params.multi_items()), SETTINGS)
    cap = SETTINGS.query_export_max_rows
    job = _Export(filters, fmt, cap)
    longest = SETTINGS.query_export_max_seconds
    try:
        matched = await asyncio.to_thread(job.begin)
    except reads.PoolExhausted as exc:
        raise _busy(exc) from exc
    except (DatabaseError, InterfaceError, OSError) as exc:
        raise ReadFailed("database_unavailable", "the database did not answer") from exc
    timer = asyncio.get_running_loop().call_later(
        longest, job.cut, f"it ran for {longest:g} s (QUERY_EXPORT_MAX_SECONDS)"
    )
    rows, truncated = min(matched, cap), matched > cap
    context = {"filters": filters.as_params(), "format": fmt, "rows": rows,
               "truncated": truncated}  # fmt: skip
    try:
        await audit_read(read_event(EXPORTED, principal, context, request))
    except BaseException:
        timer.cancel()
        job.close_soon()
        raise
    media = "text/csv; charset=utf-8" if fmt == "csv" else "application/x-ndjson"
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    headers = {
        "Content-Disposition": f'attachment; filename="audit-export-{stamp}.{fmt}"',
        "X-Audit-Export-Rows": str(rows),
        "X-Audit-Export-Truncated": "true" if truncated else "false",
    }
    return _ExportResponse(job, rows, timer, headers, media)


# --------------------------------------------------------------------------- the function


async def authorize(request: Request, *roles: str, token: str | None = None) -> Principal:
    return await authenticate(VERIFIER, request, *roles, token=token)


async def _api(request: Request, path: str) -> Response:
    if path == "/v1/audit/export":
        principal = await authorize(request, READ_ROLE, EXPORT_ROLE)
        return await export(principal, request)
    principal = await authorize(request, READ_ROLE)
    if path == "/v1/audit/events":
        page = await list_events(principal, list(request.query_params.multi_items()), request)
        ROWS.labels("events").inc(len(page["events"]))
        return json_response(200, page)
    event_id = path.removeprefix("/v1/audit/events/")
    if request.query_params:
        name = next(iter(request.query_params.keys()))
        raise reads.BadParameter(name, "unknown parameter; this endpoint takes none")
    events = await get_event(principal, event_id, request)
    ROWS.labels("event").inc(len(events))
    if not events:
        return json_response(404, {"error": "not_found", "message": "no event with this id"})
    return json_response(200, {"events": events})


def _endpoint(path: str) -> str | None:
    if path in ("/v1/audit/events", "/v1/audit/export"):
        return path.rsplit("/", 1)[1]
    if path.startswith("/v1/audit/events/") and len(path) > len("/v1/audit/events/"):
        return "event"
    return None


async def _readyz() -> Response:
    def check(conn) -> bool:
        conn.run("SELECT 1")
        return not reads.can_write(conn)

    try:
        read_only = await in_database(check)
    except ReadFailed as exc:
        return json_response(503, {"ready": False, "detail": str(exc)})
    ok, detail = await asyncio.to_thread(producer_for(AUDIT_PRODUCER_SETTINGS).ready)
    return json_response(
        200 if ok else 503, {"ready": ok, "detail": detail, "read_only_role": read_only}
    )


async def query(request: Request) -> Response:
    """functions-framework aio HTTP target (`--target query`, served with `--asgi`)."""
    from . import query_ui

    path = request.url.path.rstrip("/") or "/"
    if path == "/ui" or path.startswith("/ui/"):
        return await query_ui.handle(request, path)
    if request.method not in ("GET", "HEAD"):
        return json_response(405, {"error": "method_not_allowed"}, {"Allow": "GET"})
    if path == "/healthz":
        return json_response(200, {"status": "ok"})
    if path == "/readyz":
        return await _readyz()
    if path == "/metrics":
        return metrics_response()
    endpoint = _endpoint(path)
    if endpoint is None:
        return json_response(404, {"error": "not_found", "message": f"no such path: {path}"})
    started = time.monotonic()
    try:
        response = await _api(request, path)
    except AuthError as exc:
        response = refusal(exc)
    except reads.BadParameter as exc:
        response = json_response(400, exc.body())
    except ReadFailed as exc:
        response = unavailable(exc)
    LATENCY.labels(endpoint).observe(time.monotonic() - started)
    REQUESTS.labels(endpoint, str(response.status_code)).inc()
    return response
