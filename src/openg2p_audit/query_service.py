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
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar

from pg8000.exceptions import DatabaseError, InterfaceError
from prometheus_client import Counter, Histogram
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from . import query as reads
from .attestation import QUERY_SOURCE, Attestor
from .auth import AuthError, Principal, TokenVerifier, authenticate, refusal
from .contract import AuditEvent
from .kafka_binding import encode
from .observability import configure_logging, metrics_response, prepare_multiprocess_metrics
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
SOURCE = QUERY_SOURCE  # the only source the query service's key may attest
PERFORMED = "org.openg2p.audit.query.performed"
EXPORTED = "org.openg2p.audit.query.exported"
JSON_MEDIA = "application/json"

prepare_multiprocess_metrics()
REQUESTS = Counter(
    "audit_query_requests_total",
    "Answered requests, by endpoint and status",
    ["endpoint", "status"],
)
ROWS = Counter("audit_query_rows_total", "Rows answered, by endpoint", ["endpoint"])
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
    except (DatabaseError, InterfaceError, OSError) as exc:
        log.warning("database unavailable: %s", exc)
        raise ReadFailed("database_unavailable", "the database did not answer") from exc


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
    events = await in_database(reads.fetch_event, event_id)
    context = {"filters": {"id": event_id}, "rows": len(events)}
    await audit_read(read_event(PERFORMED, principal, context, request, resource_id=event_id))
    return events


class _Export:
    """One export's connection and snapshot, used from worker threads one call at a time.

    The response streams from the event loop, but a client that goes away cancels
    the stream while a batch may still be running in its thread. So the end of the
    export (COMMIT, the connection back to the pool) takes the same lock, waiting
    for that batch, in a thread of its own: a cancelled task cannot be relied on to
    await anything more.
    """

    def __init__(self, filters: reads.Filters, fmt: str, cap: int):
        self.filters, self.fmt, self.cap = filters, fmt, cap
        self._holder = database().connection()
        self._lock = threading.Lock()
        self._conn = None
        self._chunks: Iterator[bytes] | None = None
        self._open = False

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


async def export(principal: Principal, request: Request) -> Response:
    filters, fmt = reads.parse_export(list(request.query_params.multi_items()), SETTINGS)
    cap = SETTINGS.query_export_max_rows
    job = _Export(filters, fmt, cap)
    try:
        matched = await asyncio.to_thread(job.begin)
    except (DatabaseError, InterfaceError, OSError) as exc:
        raise ReadFailed("database_unavailable", "the database did not answer") from exc
    rows, truncated = min(matched, cap), matched > cap
    context = {"filters": filters.as_params(), "format": fmt, "rows": rows,
               "truncated": truncated}  # fmt: skip
    try:
        await audit_read(read_event(EXPORTED, principal, context, request))
    except BaseException:
        job.close_soon()
        raise

    async def body() -> AsyncIterator[bytes]:
        # The next batch is fetched while this one is sent: PostgreSQL and the driver work
        # while the socket drains. At most two batches are held, however long the export.
        pending = asyncio.ensure_future(asyncio.to_thread(job.next_chunk))
        try:
            while (chunk := await pending) is not None:
                pending = asyncio.ensure_future(asyncio.to_thread(job.next_chunk))
                yield chunk
        finally:
            pending.cancel()
            job.close_soon()
        ROWS.labels("export").inc(rows)

    media = "text/csv; charset=utf-8" if fmt == "csv" else "application/x-ndjson"
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    headers = {
        "Content-Disposition": f'attachment; filename="audit-export-{stamp}.{fmt}"',
        "X-Audit-Export-Rows": str(rows),
        "X-Audit-Export-Truncated": "true" if truncated else "false",
    }
    return StreamingResponse(body(), 200, headers, media_type=media)


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
