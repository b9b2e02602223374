"""The ingest function: CloudEvents over HTTP in, Kafka records out.

Every OpenG2P service sends its audit events here, so the function is strict
about input and never loses what it has accepted:

- it answers 202 only once Kafka has acknowledged every event of the request
  (see `producer`), and the 202 lists the accepted ids;
- bad input gets a 4xx whose JSON body names each problem (with the event's
  index in a batch) and nothing of that request is produced: a batch is all
  or nothing;
- when Kafka cannot take the events in time it answers 503 with Retry-After
  within the ack timeout, never hanging and never dropping silently;
- unless INGEST_AUTH=disabled, a caller without a valid bearer token gets 401
  before its body is read, an event outside the caller's sources (the source
  policy) gets 403, and each accepted event carries the caller's identity in
  the CloudEvents authcontext extension, which only ingest may set: an audit
  trail anyone can write under any name proves nothing.

It routes by path itself because one functions-framework target serves the
CloudEvents endpoint (`/`, where a Knative Broker Trigger also delivers), the
audit manager's legacy paths that existing emitters call, and the probes.

The HTTP binding is read with `http_binding` rather than with
`cloudevents.http.from_http`: that helper invents an `id` and a `time` when
they are missing (the contract requires `id` in every CloudEvents mode) and
reports all missing attributes as one opaque message, while each problem must
be named to the emitter.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import Counter, Histogram
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from . import store
from .attestation import EXTENSION as ATTESTATION
from .attestation import Attestor, is_delivery_metadata
from .auth import AuthError, Principal, TokenVerifier, bearer_token, refusal
from .contract import AuditEvent, Limits, Problem, check_event
from .http_binding import BATCH, STRUCTURED, binary_attributes, is_binary, media_type
from .kafka_binding import KafkaRecord, encode
from .observability import configure_logging, metrics_response
from .policy import SourcePolicy, dumps_claims, reserved
from .producer import TooLarge, Unavailable, drain_on_sigterm, producer_for
from .serving import bound_request_headers
from .settings import SettingsError, load_settings

# Settings are read at import, i.e. when the server starts: a bad value or a
# missing broker address stops the process with one line instead of failing
# every request later.
SETTINGS = load_settings()
configure_logging(SETTINGS.log_level.upper())
bound_request_headers(SETTINGS)  # 431 past HTTP_MAX_HEADER_BYTES, before any token is read
log = logging.getLogger("openg2p_audit.ingest")
if not SETTINGS.kafka_configured:
    raise SettingsError("KAFKA_BOOTSTRAP_SERVERS is not set: ingest needs the Kafka brokers")
LIMITS = Limits(
    max_depth=SETTINGS.ingest_max_depth,
    retention_months=SETTINGS.retention_months,
    max_clock_skew_seconds=SETTINGS.ingest_max_clock_skew_seconds,
)

# Authentication: a verifier for every trusted issuer and the source policy, or neither
# when INGEST_AUTH=disabled (said loudly: anyone who reaches ingest can then forge events).
if SETTINGS.ingest_auth == "required":
    VERIFIER: TokenVerifier | None = TokenVerifier.for_settings(SETTINGS)
    POLICY: SourcePolicy | None = SourcePolicy.from_settings(SETTINGS)
else:
    VERIFIER = POLICY = None
    log.warning(
        "INGEST_AUTH=disabled: ingest accepts events from anyone under any source; "
        "never run a deployment like this"
    )
AUTH_CLAIMS = [c.strip() for c in SETTINGS.ingest_auth_claims.split(",") if c.strip()]
# The CloudEvents authcontext extension: set by ingest only, never taken from an emitter.
AUTHCONTEXT = ("authtype", "authid", "authclaims")
# Every record is attested (attestation.py): the writer stores nothing else. No key, no start.
ATTESTOR = Attestor.from_keys(SETTINGS.attestation_ingest_keys, "ATTESTATION_INGEST_KEYS")

JSON_TYPES = frozenset({"application/json", STRUCTURED})

ACCEPTED = Counter("audit_ingest_events_accepted", "Events acknowledged by Kafka and answered 202")
REJECTED = Counter(
    "audit_ingest_events_rejected",
    "Events refused with a 4xx, by the reason of their first problem "
    "(`batch`: a valid event refused with its batch)",
    ["reason"],
)
UNAVAILABLE = Counter(
    "audit_ingest_unavailable_responses", "Requests answered 503, by cause", ["cause"]
)
ABANDONED = Counter(
    "audit_ingest_abandoned_events",
    "Events of requests whose caller disconnected before the answer, by what Kafka then did "
    "(`acked` ones are also counted as accepted)",
    ["outcome"],
)
PRODUCE_LATENCY = Histogram(
    "audit_ingest_produce_latency_seconds",
    "From handing a request's records to the producer until Kafka acknowledged the last one",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 5.0),
)


class Rejected(Exception):
    """The request is refused as a whole; nothing of it is produced."""

    def __init__(self, status: int, problems: list[Problem], events: int = 1):
        super().__init__(problems[0].message)
        self.status = status
        self.problems = problems
        self.events = events


def _problem(reason: str, message: str, status: int = 400) -> Rejected:
    return Rejected(status, [Problem(reason, message)])


# -- reading the request -----------------------------------------------------


async def _body(request: Request, limit: int, what: str) -> bytes:
    """The body, refusing (413) before reading more than `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _problem("too_large", f"{what} is {declared} bytes; at most {limit} allowed", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise _problem("too_large", f"{what} is over {limit} bytes", 413)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


# The escape of a UTF-16 surrogate (\ud800-\udfff), in either case, and the character.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _json(body: bytes) -> Any:
    # UTF-8 only (RFC 8259 section 8.1): json.loads would also guess UTF-16 and UTF-32, whose
    # bytes hide the `\u0000` and surrogate escapes from the scans of the raw body.
    try:
        value = json.loads(
            body.decode("utf-8-sig"), parse_constant=_not_json, parse_float=_finite_float
        )
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, absurd nesting
        raise _problem("invalid_json", f"body is not valid JSON: {exc}") from None
    if _SURROGATE_ESCAPE.search(body) and _has_lone_surrogate(value):
        # json.loads joins escaped pairs into one character and keeps a lone half as is;
        # such a string is not Unicode text: it cannot be encoded for Kafka nor stored.
        raise _problem(
            "invalid_json", "body is not valid JSON: a string holds an unpaired surrogate escape"
        )
    return value


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    # 1e400 would become inf, which is serialised as null: the event would be stored altered.
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _has_lone_surrogate(value: Any) -> bool:
    """Whether any string or key holds U+D800-U+DFFF (walked without recursion)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _binary_attributes(request: Request) -> dict[str, Any]:
    return binary_attributes(request.headers.items(), request.headers.get("content-type"))


def _is_binary(request: Request) -> bool:
    return is_binary(request.headers.keys())


def _mimetype(request: Request) -> str:
    return media_type(request.headers.get("content-type"))


def _check_all(raws: list[Any], batch: bool, body: bytes | None = None) -> list[AuditEvent]:
    """Validate every event, collecting every problem; `body` is the raw JSON they came from.

    JSON can only carry U+0000 as the escape `\\u0000`, so a body without that
    text spares the walk through every string.
    """
    may_hold_nul = body is None or b"\\u0000" in body
    window = LIMITS.time_window()
    problems: list[Problem] = []
    events: list[AuditEvent] = []
    for i, raw in enumerate(raws):
        event, found = check_event(
            raw, LIMITS, i if batch else None, may_hold_nul=may_hold_nul, window=window
        )
        if found:
            problems.extend(found)
        elif event is not None:
            # What the table itself would refuse (an index entry too large) is refused here,
            # before the 202, rather than dead-lettered by the writer afterwards.
            oversized = store.index_problems(event)
            problems.extend(
                Problem("too_large", message, field, i if batch else None)
                for field, message in oversized
            )
            if not oversized:
                events.append(event)
    if problems:
        raise Rejected(400, problems, len(raws))
    return events


def _encode_all(events: list[AuditEvent], batch: bool) -> list[KafkaRecord]:
    """The attested records, each checked whole (headers included) against the limits."""
    records = [encode(e, ATTESTOR) for e in events]
    limit = SETTINGS.ingest_max_event_bytes
    header_limit = SETTINGS.ingest_max_attribute_bytes
    problems = []
    for i, r in enumerate(records):
        where = i if batch else None
        if r.size > limit:
            problems.append(Problem(
                "too_large", f"event is {r.size} bytes with its attributes; at most {limit} "
                "allowed", None, where,
            ))  # fmt: skip
        elif r.attribute_bytes > header_limit:
            problems.append(Problem(
                "too_large", f"the event's attributes take {r.attribute_bytes} bytes as "
                f"binary-mode headers; at most {header_limit} allowed (put large values "
                "in data)", None, where,
            ))  # fmt: skip
    if problems:
        raise Rejected(413, problems, len(records))
    return records


def _batch_list(value: Any, count_limit: int) -> list[Any]:
    if not isinstance(value, list):
        raise _problem("schema", "a batch must be a JSON array of events")
    if len(value) > count_limit:
        raise _problem(
            "too_large", f"batch holds {len(value)} events; at most {count_limit} allowed", 413
        )
    if not value:
        raise _problem("schema", "a batch must hold at least one event")
    return value


def _compat(raw: Any) -> Any:
    """The audit manager's plain-JSON events: id and specversion may be left out."""
    if isinstance(raw, dict):
        if raw.get("id") is None:
            raw["id"] = str(uuid.uuid4())
        raw.setdefault("specversion", "1.0")
    return raw


def _json_media(mimetype: str) -> bool:
    return mimetype == "application/json" or (
        mimetype.startswith("application/") and mimetype.endswith("+json")
    )


async def _cloudevents(request: Request) -> tuple[list[AuditEvent], bool]:
    # The media type names the mode; ce-* headers alone mean binary mode.
    mimetype = _mimetype(request)
    if mimetype == STRUCTURED:
        body = await _body(request, SETTINGS.ingest_max_event_bytes, "event")
        return _check_all([_json(body)], batch=False, body=body), False
    if mimetype == BATCH:
        body = await _body(request, SETTINGS.ingest_max_batch_bytes, "batch")
        raws = _batch_list(_json(body), SETTINGS.ingest_max_batch_events)
        return _check_all(raws, batch=True, body=body), True
    if _is_binary(request):
        if mimetype and not _json_media(mimetype):
            raise _problem(
                "unsupported_media_type",
                f"binary-mode data must be JSON (application/json), not {mimetype}",
                415,
            )
        body = await _body(request, SETTINGS.ingest_max_event_bytes, "event")
        attrs = _binary_attributes(request)
        attrs["data"] = _json(body) if body else None
        return _check_all([attrs], batch=False), False
    raise _problem(
        "unsupported_media_type",
        f"content type {mimetype or '(none)'} is not a CloudEvent: use binary mode "
        f"(ce-* headers with application/json), {STRUCTURED} or {BATCH}",
        415,
    )


def _require_json(request: Request) -> None:
    mimetype = _mimetype(request)
    if mimetype not in JSON_TYPES:
        raise _problem(
            "unsupported_media_type",
            f"content type {mimetype or '(none)'} is not supported; send application/json",
            415,
        )


async def _legacy_event(request: Request) -> tuple[list[AuditEvent], bool]:
    _require_json(request)
    body = await _body(request, SETTINGS.ingest_max_event_bytes, "event")
    return _check_all([_compat(_json(body))], batch=False, body=body), False


async def _legacy_batch(request: Request) -> tuple[list[AuditEvent], bool]:
    _require_json(request)
    body = await _body(request, SETTINGS.ingest_max_batch_bytes, "batch")
    raw = _json(body)
    if not isinstance(raw, dict) or "events" not in raw:
        raise _problem("schema", 'body must be an object {"events": [...]}')
    events = _batch_list(raw["events"], SETTINGS.ingest_max_batch_events)
    return _check_all([_compat(e) for e in events], batch=True, body=body), True


# -- answering ---------------------------------------------------------------


def _dumps(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def _json_response(
    status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> Response:
    return Response(_dumps(body), status, headers, media_type="application/json")


def _refusal(status: int, body: dict[str, Any]) -> Response:
    """A refusal that does not read the rest of the body: the connection is closed instead.

    An oversized upload must not be pulled into memory just to be thrown away.
    """
    return _json_response(status, body, {"Connection": "close"})


def _trace_id(events: list[AuditEvent], request: Request) -> str | None:
    for e in events:
        if e.trace_id:
            return e.trace_id
    parts = (request.headers.get("traceparent") or "").split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else None


Reader = Callable[[Request], Awaitable[tuple[list[AuditEvent], bool]]]


async def _caller(request: Request) -> Principal | None:
    """The verified caller (None when auth is disabled); AuthError when refused.

    Checked before the body is read, so a caller without a valid token cannot
    make ingest parse (or hold) a megabyte batch.
    """
    if VERIFIER is None:
        return None
    token = bearer_token(request.headers.get("authorization"))
    if token is not None:
        hit = VERIFIER.cached(token)
        if hit is not None:
            return hit
    try:
        return await asyncio.to_thread(VERIFIER.authorize, token)
    except AuthError as exc:
        log.info("refused %s: %s", request.scope["path"], exc.reason, extra={"status": exc.status})
        raise


def _reserved(name: str) -> str | None:
    """Why an emitter may not send this extension, or None."""
    if name in AUTHCONTEXT:
        return f"{name} is set by ingest from the caller's token; do not send it"
    if name == ATTESTATION:
        return f"{name} is set by ingest on the records it produces; do not send it"
    if name.startswith("knativeerror"):
        return f"{name} is set by Knative on dead letters; do not send it"
    return None


def _authorise(events: list[AuditEvent], batch: bool, caller: Principal | None) -> None:
    """Refuse extensions that only ingest or Knative set (400), and events outside the caller's
    sources (403); then stamp each event with the caller's authcontext. All or nothing, as
    the batch. Knative's Kafka dispatcher adds `knativekafkapartition` and
    `knativekafkaoffset` to every event a Trigger delivers: where it was in the Broker's
    topic, not part of the event, so they are dropped."""
    bad = []
    for i, e in enumerate(events):
        extra = e.__pydantic_extra__ or {}
        for name in [n for n in extra if is_delivery_metadata(n) and n.startswith("knativekafka")]:
            del extra[name]
        for name in extra:
            why = _reserved(name)
            if why:
                reason = "authcontext" if name in AUTHCONTEXT else "reserved"
                bad.append(Problem(reason, why, name, i if batch else None))
    if bad:
        raise Rejected(400, bad, len(events))
    # The query service's family is refused even with INGEST_AUTH=disabled (policy.reserved).
    taken = [Problem("forbidden", why[1], why[0], i if batch else None)
             for i, e in enumerate(events) if (why := reserved(e.source, e.type))]  # fmt: skip
    if taken:
        raise Rejected(403, taken, len(events))
    if caller is None or POLICY is None:
        return
    claims = dict(caller.claims)
    refused = []
    for i, e in enumerate(events):
        decision = POLICY.check(claims, e.source, e.type)
        if not decision.allowed:
            refused.append(Problem("forbidden", decision.reason, "source", i if batch else None))
    if refused:
        raise Rejected(403, refused, len(events))
    context: dict[str, Any] = {"authtype": _auth_type(claims), "authid": caller.subject}
    authclaims = dumps_claims(claims, AUTH_CLAIMS)
    if authclaims is not None:
        context["authclaims"] = authclaims
    for e in events:
        e.__pydantic_extra__.update(context)  # type: ignore[union-attr]


def _auth_type(claims: dict[str, Any]) -> str:
    """CloudEvents authcontext `authtype`: a workload's token, or a person's."""
    sub, username = claims.get("sub", ""), claims.get("preferred_username")
    if str(sub).startswith("system:serviceaccount:") or (
        isinstance(username, str) and username.startswith("service-account-")
    ):
        return "service_account"
    return "user"


async def _accept(request: Request, reader: Reader) -> Response:
    try:
        caller = await _caller(request)
    except AuthError as exc:
        response = refusal(exc)
        response.headers["Connection"] = "close"  # the body is left unread
        return response
    try:
        events, batch = await reader(request)
        _authorise(events, batch, caller)
        records = _encode_all(events, batch)
    except Rejected as exc:
        return _rejected(request, exc)
    except ClientDisconnect:
        return _json_response(400, {"error": "the client closed the connection mid-request"})
    started = time.monotonic()
    try:
        await producer_for(SETTINGS).publish(records, started, on_abandoned=_count_abandoned)
    except TooLarge as exc:
        # The deployment's Kafka takes smaller records than INGEST_MAX_EVENT_BYTES allows.
        return _rejected(request, _problem("too_large", f"{exc}; send a smaller event", 413))
    except Unavailable as exc:
        UNAVAILABLE.labels(exc.cause).inc()
        log.warning(
            "answering 503: %s",
            exc,
            extra={
                "cause": exc.cause,
                "events": len(events),
                "trace_id": _trace_id(events, request),
            },
        )
        return _json_response(
            503,
            {"error": "unavailable", "cause": exc.cause, "message": str(exc)},
            {"Retry-After": str(SETTINGS.ingest_retry_after_seconds)},
        )
    PRODUCE_LATENCY.observe(time.monotonic() - started)
    ACCEPTED.inc(len(events))
    ids = [e.id for e in events]
    # One line per accepted request costs more than the rest of the request
    # path; 202s are counted in metrics and the events themselves are on Kafka.
    if log.isEnabledFor(logging.DEBUG):
        log.debug(
            "accepted %d event(s)",
            len(ids),
            extra={"event_ids": ids[:20], "trace_id": _trace_id(events, request)},
        )
    return _json_response(202, {"accepted": ids})


def _count_abandoned(acked: int, failed: int) -> None:
    """What became of the records of a request whose caller stopped waiting for the answer."""
    if acked:
        ACCEPTED.inc(acked)
        ABANDONED.labels("acked").inc(acked)
    if failed:
        ABANDONED.labels("failed").inc(failed)


def _rejected(request: Request, exc: Rejected) -> Response:
    first_reason: dict[int | None, str] = {}
    for p in exc.problems:
        first_reason.setdefault(p.index, p.reason)
    for reason in first_reason.values():
        REJECTED.labels(reason).inc()
    if exc.events > len(first_reason):
        REJECTED.labels("batch").inc(exc.events - len(first_reason))
    body = {
        "error": "request too large" if exc.status == 413 else "invalid events",
        "problems": [p.as_dict() for p in exc.problems],
    }
    if exc.status == 415:
        body["error"] = "unsupported media type"
    elif exc.status == 403:
        body["error"] = "forbidden"
    log.warning(
        "rejected a request with %d problem(s)",
        len(exc.problems),
        extra={
            "status": exc.status,
            "path": request.url.path,
            "reasons": sorted(set(first_reason.values())),
            "trace_id": _trace_id([], request),
        },
    )
    return _refusal(exc.status, body)


async def _healthz(_request: Request) -> Response:
    return _json_response(200, {"status": "ok"})


async def _readyz(_request: Request) -> Response:
    ok, detail = await asyncio.to_thread(producer_for(SETTINGS).ready)
    return _json_response(200 if ok else 503, {"ready": ok, "detail": detail})


async def _metrics(_request: Request) -> Response:
    return metrics_response()


_POST_ROUTES: dict[str, Reader] = {
    "/": _cloudevents,
    "/v1/auditmanager/events": _legacy_event,
    "/v1/auditmanager/events/batch": _legacy_batch,
}
_GET_ROUTES = {"/healthz": _healthz, "/readyz": _readyz, "/metrics": _metrics}


async def ingest(request: Request) -> Response:
    """functions-framework aio HTTP target (`--target ingest`, served with `--asgi`)."""
    # Take SIGTERM from the worker's first request on, not its first publish: a first
    # request still checking its token when SIGTERM came would otherwise open a producer
    # that nothing closes.
    drain_on_sigterm(producer_for(SETTINGS))
    path = request.scope["path"].rstrip("/") or "/"  # request.url would parse the whole URL
    reader = _POST_ROUTES.get(path)
    if reader is not None:
        if request.method != "POST":
            return _json_response(405, {"error": "method not allowed"}, {"Allow": "POST"})
        return await _accept(request, reader)
    probe = _GET_ROUTES.get(path)
    if probe is not None:
        if request.method not in ("GET", "HEAD"):
            return _json_response(405, {"error": "method not allowed"}, {"Allow": "GET"})
        return await probe(request)
    return _json_response(404, {"error": f"no such path: {request.url.path}"})
