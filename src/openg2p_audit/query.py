"""The read side of the trail: filters, keyset pages, exports, and the read-only role.

Shared by the query service (`query_service`) and the operator's CLI
(`openg2p-audit query`), so both validate the same parameters the same way
and run the same SQL.

Pages are keyset pages on (occurred_at, id, source), newest first, never OFFSET: the
seed's indexes all end in `occurred_at DESC`, so a page deep into a busy month
costs what the first page costs. The cursor carries the last row's key and a
fingerprint of the filters, and is signed (HMAC-SHA256), so a client can
neither walk into rows outside its filters by editing it nor reuse it for
another query; a cursor that fails either check is a 400, not an empty page.

Every query is bounded by a required time range (`from` inclusive, `to`
exclusive, at most `QUERY_MAX_RANGE_DAYS`), which is also what lets PostgreSQL
skip the monthly partitions outside it.

The role: `audit_events` is written only by the writer, the replay and the
redrive. The query service connects as a role that holds SELECT on the table
and nothing else (`reader_role_statements`), and on top of that opens every
session read-only, so a bug here cannot change the trail.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
import queue
import re
import secrets
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pg8000.native
from pg8000.exceptions import DatabaseError, InterfaceError

from . import store
from .contract import Outcome
from .settings import Settings

log = logging.getLogger("openg2p_audit.query")

TABLE = store.TABLE

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
# Rows per statement of an export: large enough that round trips do not dominate,
# small enough that one batch is a few MiB at most.
EXPORT_BATCH_ROWS = 5000
FORMATS = ("jsonl", "csv")

# The filters every read endpoint takes, in the order they are shown and fingerprinted.
FILTER_PARAMS = (
    "from",
    "to",
    "actor_id",
    "resource_type",
    "resource_id",
    "type",
    "outcome",
    "source",
    "subject",
    "trace_id",
    "tenant",
)
PAGE_PARAMS = (*FILTER_PARAMS, "limit", "cursor")
EXPORT_PARAMS = (*FILTER_PARAMS, "format")

# The columns an event is answered with, in order.
EVENT_COLUMNS = (*store.COLUMNS, "ingested_at")
# The flat columns of the CSV export: every column, `details` as JSON text.
CSV_COLUMNS = EVENT_COLUMNS

# ASCII digits only, matched against the whole text: Python's \d and int() also take other
# scripts' digits (U+0663), str.isdigit() superscripts too ('²', which int() then refuses:
# a 500), and `$` matches before a final newline.
_D2, _D4 = "[0-9]{2}", "[0-9]{4}"
_RFC3339 = re.compile(
    rf"{_D4}-{_D2}-{_D2}[Tt]{_D2}:{_D2}:{_D2}(\.[0-9]{{1,9}})?([Zz]|[+-]{_D2}:{_D2})"
)
_TRACE_ID = re.compile(r"[0-9a-f]{32}")
_LIMIT = re.compile(r"[0-9]{1,4}")
_TS = "to_char({} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"


class BadParameter(ValueError):
    """A request parameter that cannot be answered: a 400 naming it."""

    def __init__(self, parameter: str, message: str):
        super().__init__(f"{parameter}: {message}")
        self.parameter = parameter
        self.message = message

    def body(self) -> dict[str, str]:
        return {"error": "invalid_parameter", "parameter": self.parameter, "message": self.message}


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class Filters:
    """What an investigator asked for; `type` ending in `*` is a prefix."""

    from_: datetime
    to: datetime
    actor_id: str | None = None
    resource_type: str | None = None
    resource_id: str | None = None
    type: str | None = None
    outcome: str | None = None
    source: str | None = None
    subject: str | None = None
    trace_id: str | None = None
    tenant: str | None = None

    def as_params(self) -> dict[str, str]:
        """The filters as request parameters (for links, the audit event, the fingerprint)."""
        out: dict[str, str] = {"from": _z(self.from_), "to": _z(self.to)}
        for name, value in asdict(self).items():
            if name not in ("from_", "to") and value is not None:
                out[name] = value
        return out

    def fingerprint(self) -> bytes:
        canonical = json.dumps(self.as_params(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).digest()[:12]


@dataclass(frozen=True)
class PageRequest:
    filters: Filters
    limit: int
    after: tuple[datetime, str, str] | None  # the last row's occurred_at, id, source


def _z(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(parameter: str, text: str) -> datetime:
    """RFC 3339 with a zone (`Z` or an offset); fractions beyond microseconds are cut."""
    if not _RFC3339.fullmatch(text):
        hint = " (a '+' in a URL must be sent as %2B)" if " " in text else ""
        raise BadParameter(
            parameter, f"must be an RFC 3339 time such as 2026-04-01T00:00:00Z{hint}"
        )
    head, dot, rest = text.partition(".")
    if dot:
        digits = re.match(r"[0-9]+", rest).group(0)  # type: ignore[union-attr]
        text = f"{head}.{digits[:6].ljust(6, '0')}{rest[len(digits) :]}"
    try:
        moment = datetime.fromisoformat(text.upper().replace("Z", "+00:00"))
        return moment.astimezone(UTC)
    except (ValueError, OverflowError):
        raise BadParameter(parameter, "is not a valid date and time") from None


def _single(items: Sequence[tuple[str, str]], allowed: Sequence[str]) -> dict[str, str]:
    values: dict[str, str] = {}
    for name, value in items:
        if name not in allowed:
            raise BadParameter(name, f"unknown parameter; allowed: {', '.join(allowed)}")
        if name in values:
            raise BadParameter(name, "given more than once")
        values[name] = value
    return values


def check_text(name: str, value: str) -> str:
    """A value that may reach SQL as a bound text parameter, or BadParameter naming it.

    PostgreSQL cannot hold U+0000 in text (the statement would fail: a 5xx, not
    the caller's 400), a lone surrogate cannot be encoded for the wire, and no
    stored value is longer than the indexed-size limit.
    """
    if value == "":
        raise BadParameter(name, "must not be empty (leave the parameter out instead)")
    if "\x00" in value:
        raise BadParameter(name, "must not contain NUL")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise BadParameter(name, "must be valid UTF-8 text") from None
    if size > store.MAX_INDEXED_BYTES:
        raise BadParameter(name, f"is longer than {store.MAX_INDEXED_BYTES} bytes")
    return value


def _text(values: dict[str, str], name: str) -> str | None:
    value = values.get(name)
    return None if value is None else check_text(name, value)


def parse_event_id(text: str) -> str:
    """The `{id}` of `GET /v1/audit/events/{id}` (and `/ui/events/{id}`), checked like a filter."""
    return check_text("id", text)


def parse_filters(values: dict[str, str], settings: Settings) -> Filters:
    for name in ("from", "to"):
        if name not in values:
            raise BadParameter(name, "is required (RFC 3339, e.g. 2026-04-01T00:00:00Z)")
    start = parse_time("from", values["from"])
    end = parse_time("to", values["to"])
    if end <= start:
        raise BadParameter("to", "must be later than from")
    if end - start > timedelta(days=settings.query_max_range_days):
        raise BadParameter(
            "to", f"the range from..to is at most {settings.query_max_range_days} days"
        )
    texts = {n: _text(values, n) for n in FILTER_PARAMS if n not in ("from", "to")}
    if texts["resource_id"] is not None and texts["resource_type"] is None:
        raise BadParameter("resource_id", "needs resource_type too")
    kind = texts["type"]
    if kind is not None and "*" in kind[:-1]:
        raise BadParameter("type", "an exact type, or a prefix with one '*' at the end")
    if kind == "*":
        raise BadParameter("type", "a prefix needs at least one character before '*'")
    outcome = texts["outcome"]
    if outcome is not None and outcome not in {o.value for o in Outcome}:
        raise BadParameter("outcome", f"one of {', '.join(o.value for o in Outcome)}")
    trace = texts["trace_id"]
    if trace is not None and not _TRACE_ID.fullmatch(trace):
        raise BadParameter("trace_id", "32 lowercase hex digits (the W3C trace id)")
    return Filters(from_=start, to=end, **texts)


def parse_page(
    items: Sequence[tuple[str, str]], settings: Settings, codec: CursorCodec
) -> PageRequest:
    """`GET /v1/audit/events`'s parameters; BadParameter names the first bad one."""
    values = _single(items, PAGE_PARAMS)
    filters = parse_filters(values, settings)
    limit = DEFAULT_LIMIT
    if "limit" in values:
        text = values["limit"]
        if not _LIMIT.fullmatch(text) or not 1 <= int(text) <= MAX_LIMIT:
            raise BadParameter("limit", f"an integer from 1 to {MAX_LIMIT}")
        limit = int(text)
    after = codec.decode(values["cursor"], filters) if "cursor" in values else None
    return PageRequest(filters, limit, after)


def parse_export(items: Sequence[tuple[str, str]], settings: Settings) -> tuple[Filters, str]:
    """`GET /v1/audit/export`'s parameters: the filters and the format."""
    values = _single(items, EXPORT_PARAMS)
    filters = parse_filters(values, settings)
    fmt = values.get("format", "jsonl")
    if fmt not in FORMATS:
        raise BadParameter("format", f"one of {', '.join(FORMATS)}")
    return filters, fmt


# --------------------------------------------------------------------------- cursors


# Cursor keys that anyone with a clone of this repository can read: the placeholders
# committed in knative/ (a test checks that every QUERY_CURSOR_SECRET there is listed).
# Whoever holds the key signs any cursor it likes, so the query service will not start
# with one of these, nor with anything else that is plainly not a random key.
COMMITTED_CURSOR_SECRETS = frozenset({"change-me-to-64-random-hex-characters-0123456789abcdef"})
_PLACEHOLDER_WORDS = ("change-me", "changeme", "change_me", "replace-me", "placeholder")


def cursor_secret_problem(secret: str) -> str | None:
    """Why `secret` must not sign cursors, or None when it may."""
    if secret in COMMITTED_CURSOR_SECRETS:
        return (
            "is the placeholder committed in knative/base/query-secret.yaml, which anyone "
            "with a clone of the repository can read"
        )
    if any(word in secret.lower() for word in _PLACEHOLDER_WORDS):
        return "is a placeholder, not a key"
    if len(set(secret)) < 10:
        return "has fewer than 10 distinct characters, so it is not a random key"
    return None


class CursorCodec:
    """Opaque, signed page cursors bound to the filters they were issued for."""

    def __init__(self, secret: str | None):
        self._key = (secret or secrets.token_hex(32)).encode()

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()[:16]

    def encode(self, filters: Filters, occurred_at: str, event_id: str, source: str) -> str:
        payload = json.dumps(
            [occurred_at, event_id, source, base64.b64encode(filters.fingerprint()).decode()],
            separators=(",", ":"),
            ensure_ascii=False,
        ).encode()
        return _b64(payload) + "." + _b64(self._mac(payload))

    def decode(self, cursor: str, filters: Filters) -> tuple[datetime, str, str]:
        bad = BadParameter("cursor", "is not a cursor this service issued (malformed or altered)")
        head, dot, tail = cursor.partition(".")
        if not dot or len(cursor) > 4096:
            raise bad
        try:
            payload, mac = _unb64(head), _unb64(tail)
        except (ValueError, binascii.Error):
            raise bad from None
        if not hmac.compare_digest(mac, self._mac(payload)):
            raise bad
        # Signed by this key, but still checked as input: whoever holds the key (or a
        # leaked one) must get a 400 for a payload encode() never makes, not a 500.
        try:
            fields = json.loads(payload)
        except ValueError:  # not JSON, or not UTF-8
            raise bad from None
        if not (isinstance(fields, list) and len(fields) == 4
                and all(isinstance(f, str) for f in fields)):  # fmt: skip
            raise bad
        occurred_at, event_id, source, fingerprint = fields
        try:
            fingerprint_bytes = base64.b64decode(fingerprint, validate=True)
            after = (
                parse_time("cursor", occurred_at),
                check_text("cursor", event_id),
                check_text("cursor", source),
            )
        except (ValueError, binascii.Error):
            raise bad from None
        if fingerprint_bytes != filters.fingerprint():
            raise BadParameter("cursor", "belongs to a query with other filters")
        return after


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --------------------------------------------------------------------------- SQL


def _select() -> str:
    return ", ".join(
        _TS.format(name) if name in ("occurred_at", "ingested_at") else name
        for name in EVENT_COLUMNS
    )


_JSON_LINE = (
    "json_build_object("
    + ", ".join(
        f"'{name}', {_TS.format(name) if name in ('occurred_at', 'ingested_at') else name}"
        for name in EVENT_COLUMNS
    )
    + ")::text"
)


# A cell a spreadsheet would evaluate as a formula (OWASP, "CSV Injection"): one that starts
# with = + - @, a tab or a carriage return, or that reaches = + - @ after leading blanks (a
# spreadsheet that trims cells on import). Such a cell gets a leading apostrophe, which
# spreadsheets take as "this is text" and do not show, and is always quoted. The rule is
# written once for PostgreSQL (the service's export) and once for Python (`csv_cell`, the
# CLI); a test holds the two equal. The JSON lines are never altered.
_FORMULA = r"^([\t\r]|[ \t\r\n]*[=+@-])"
_NEEDS_QUOTES = r'[,"\r\n]'
_FORMULA_RE = re.compile(_FORMULA)
_NEEDS_QUOTES_RE = re.compile(_NEEDS_QUOTES)


def _csv_field(expr: str) -> str:
    """One CSV field: quoted when it holds a comma, a quote or a line break (as the csv
    module's QUOTE_MINIMAL), quotes doubled, NULL as nothing, formulas neutralised."""
    escaped = f"replace({expr}, '\"', '\"\"')"
    return (
        f"CASE WHEN {expr} IS NULL THEN '' "
        f"WHEN {expr} ~ '{_FORMULA}' THEN '\"''' || {escaped} || '\"' "
        f"WHEN {expr} ~ '{_NEEDS_QUOTES}' THEN '\"' || {escaped} || '\"' "
        f"ELSE {expr} END"
    )


def csv_cell(value: str | None) -> str:
    """`_csv_field` in Python: the same cell for the same value."""
    if value is None:
        return ""
    if _FORMULA_RE.match(value):
        return "\"'" + value.replace('"', '""') + '"'
    if _NEEDS_QUOTES_RE.search(value):
        return '"' + value.replace('"', '""') + '"'
    return value


def csv_line(values: Sequence[str | None]) -> str:
    """One CSV line (without its line break) from the cells' texts."""
    return ",".join(csv_cell(v) for v in values)


# Built by PostgreSQL, as the JSON lines are: one text value per row. The two times are
# never NULL and their format holds nothing to quote or neutralise, so they go in as they are.
_CSV_LINE = " || ',' || ".join(
    _TS.format(name) if name in ("occurred_at", "ingested_at") else _csv_field(f"{name}::text")
    for name in CSV_COLUMNS
)


def where(filters: Filters, after: tuple[datetime, str, str] | None = None) -> tuple[str, dict]:
    """The WHERE clause and its parameters; every value is a bound parameter."""
    clauses = ["occurred_at >= :from_", "occurred_at < :to_"]
    params: dict[str, Any] = {"from_": filters.from_, "to_": filters.to}
    for name in ("actor_id", "resource_type", "resource_id", "outcome", "source", "subject"):
        value = getattr(filters, name)
        if value is not None:
            clauses.append(f"{name} = :{name}")
            params[name] = value
    if filters.trace_id is not None:
        clauses.append("trace_id = :trace_id")
        params["trace_id"] = filters.trace_id
    if filters.type is not None:
        if filters.type.endswith("*"):
            prefix = filters.type[:-1]
            escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            clauses.append("type LIKE :type_prefix")
            params["type_prefix"] = escaped + "%"
        else:
            clauses.append("type = :type")
            params["type"] = filters.type
    if filters.tenant is not None:
        clauses.append("details -> 'extensions' ->> 'tenantid' = :tenant")
        params["tenant"] = filters.tenant
    if after is not None:
        # The first clause is what an index range scan can use; the second breaks ties
        # on the rest of the key (the same id may come from two sources).
        clauses.append(
            "occurred_at <= :after_at AND (occurred_at < :after_at OR id < :after_id"
            " OR (id = :after_id AND source < :after_source))"
        )
        params["after_at"], params["after_id"], params["after_source"] = after
    return " AND ".join(clauses), params


ORDER = "ORDER BY occurred_at DESC, id DESC, source DESC"

# A page's position: the last row's (occurred_at, id, source).
After = tuple[datetime, str, str]


def page_sql(filters: Filters, limit: int, after: After | None) -> tuple[str, dict]:
    clause, params = where(filters, after)
    params["limit_"] = limit
    return f"SELECT {_select()} FROM {TABLE} WHERE {clause} {ORDER} LIMIT :limit_", params


def _event(row: Sequence[Any]) -> dict[str, Any]:
    return dict(zip(EVENT_COLUMNS, row, strict=True))


@dataclass
class Page:
    events: list[dict[str, Any]]
    next_cursor: str | None


def fetch_page(conn: pg8000.native.Connection, request: PageRequest, codec: CursorCodec) -> Page:
    """One page, newest first, and the cursor of the next one (None on the last page)."""
    sql, params = page_sql(request.filters, request.limit + 1, request.after)
    rows = conn.run(sql, **params)
    events = [_event(r) for r in rows[: request.limit]]
    more = len(rows) > request.limit
    last = events[-1] if events else None
    cursor = (
        codec.encode(request.filters, last["occurred_at"], last["id"], last["source"])
        if more and last
        else None
    )
    return Page(events, cursor)


def fetch_event(conn: pg8000.native.Connection, event_id: str) -> list[dict[str, Any]]:
    """The stored event(s) with this id: the key is (id, source, occurred_at), so there may be
    several (other sources, other times)."""
    rows = conn.run(f"SELECT {_select()} FROM {TABLE} WHERE id = :id {ORDER}", id=event_id)
    return [_event(r) for r in rows]


def count_rows(conn: pg8000.native.Connection, filters: Filters, cap: int) -> int:
    """How many rows the filters select, counting no further than `cap`."""
    clause, params = where(filters)
    params["cap_"] = cap
    sql = f"SELECT count(*) FROM (SELECT 1 FROM {TABLE} WHERE {clause} LIMIT :cap_) s"
    return int(conn.run(sql, **params)[0][0])


def export_chunks(
    conn: pg8000.native.Connection, filters: Filters, fmt: str, cap: int
) -> Iterator[bytes]:
    """The export as byte chunks, one keyset batch at a time: memory stays one batch.

    JSON lines and CSV lines are built by PostgreSQL (one text value per row), which
    keeps the driver's per-column decoding and the csv module out of the hot path. Call it
    inside one REPEATABLE READ transaction so that the batches, and the count
    the audit event carries, see one snapshot.
    """
    if fmt == "csv":
        yield (csv_line(CSV_COLUMNS) + "\r\n").encode()
    after: After | None = None
    left = cap
    # The key comes back as text: the driver would otherwise build a datetime for every
    # row, and only the last row's is needed (for the next batch).
    key = f"{_TS.format('occurred_at')}, id, source"
    select = _JSON_LINE if fmt == "jsonl" else _CSV_LINE
    while left > 0:
        clause, params = where(filters, after)
        params["limit_"] = min(EXPORT_BATCH_ROWS, left)
        rows = conn.run(
            f"SELECT {key}, {select} FROM {TABLE} WHERE {clause} {ORDER} LIMIT :limit_",
            **params,
        )
        if not rows:
            return
        end = "\n" if fmt == "jsonl" else "\r\n"
        yield (end.join([r[3] for r in rows]) + end).encode()
        left -= len(rows)
        if len(rows) < params["limit_"]:
            return
        after = (parse_time("cursor", rows[-1][0]), rows[-1][1], rows[-1][2])


# --------------------------------------------------------------------------- connections


def connect(settings: Settings, application_name: str = "openg2p-audit-query"):
    """A connection that can only read: every transaction on it is READ ONLY.

    The role is the real boundary (it holds SELECT only); this is the second
    one, which also holds when someone deploys the service with a writing role.
    """
    conn = store.connect(settings, application_name=application_name)
    try:
        conn.run("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
    except BaseException:
        conn.close()
        raise
    return conn


def can_write(conn: pg8000.native.Connection) -> bool:
    """Whether the connected role could change the table, were its session not read-only."""
    return bool(
        conn.run(
            "SELECT to_regclass(:t) IS NOT NULL AND"
            " has_table_privilege(to_regclass(:t), 'INSERT, UPDATE, DELETE, TRUNCATE')",
            t=TABLE,
        )[0][0]
    )


class PoolExhausted(Exception):
    """Every connection this process may hold is in use: answered 503, never a new one."""


# How long a read waits for one of the pool's connections before it is answered 503.
POOL_WAIT_SECONDS = 1.0


class Database:
    """At most QUERY_DB_POOL_SIZE connections per process, reused across requests.

    Each is used by one thread at a time; an export keeps its connection between
    batches. The bound is what keeps a burst of reads or a pile of slow exports
    from opening connections until PostgreSQL's `max_connections` refuses the
    writer too: the read that would need one more waits `POOL_WAIT_SECONDS` for
    one to come back, then gets PoolExhausted (503, `cause: database_busy`).
    """

    def __init__(self, settings: Settings, size: int | None = None):
        self.settings = settings
        self.size = size or settings.query_db_pool_size
        self._idle: queue.LifoQueue[pg8000.native.Connection] = queue.LifoQueue(self.size)
        self._slots = threading.BoundedSemaphore(self.size)
        self.writable_role_reported = False

    @contextlib.contextmanager
    def connection(self) -> Iterator[pg8000.native.Connection]:
        if not self._slots.acquire(timeout=POOL_WAIT_SECONDS):
            raise PoolExhausted(f"all {self.size} database connections of this process are in use")
        try:
            with self._checked_out() as conn:
                yield conn
        finally:
            self._slots.release()

    @contextlib.contextmanager
    def _checked_out(self) -> Iterator[pg8000.native.Connection]:
        try:
            conn = self._idle.get_nowait()
        except queue.Empty:
            conn = connect(self.settings)
            if not self.writable_role_reported and can_write(conn):
                self.writable_role_reported = True
                log.error(
                    "the query service's database role can write to %s: give it a role with "
                    "SELECT only (see README, 'The read-only role'); sessions stay read-only",
                    TABLE,
                )
        try:
            yield conn
        except (InterfaceError, OSError):
            _close(conn)
            raise
        except DatabaseError:
            # The statement failed (timeout, cancelled); the connection is still usable
            # unless a transaction was left open.
            with contextlib.suppress(Exception):
                conn.run("ROLLBACK")
            self._put_back(conn)
            raise
        except BaseException:
            _close(conn)
            raise
        else:
            self._put_back(conn)

    def _put_back(self, conn: pg8000.native.Connection) -> None:
        try:
            self._idle.put_nowait(conn)
        except queue.Full:
            _close(conn)


def _close(conn: pg8000.native.Connection) -> None:
    with contextlib.suppress(Exception):
        conn.close()


# --------------------------------------------------------------------------- the role


def reader_role_statements(role: str, password: str | None, database: str) -> list[str]:
    """The SQL that creates (or resets) the query service's role: SELECT on the table only.

    Run by the table's owner after the writer created the schema. Grants on a
    partitioned table cover reads through it; the partitions themselves stay
    closed to the role, so it cannot reach rows except through `audit_events`.

    PostgreSQL lets every role (PUBLIC) create temporary tables in a database:
    a reader with TEMP could fill the disk or shadow `audit_events` with a temp
    table of the same name for a session that forgot its schema. That right is
    taken from PUBLIC on the audit database (nothing of the trail uses temporary
    tables; the database's owner keeps it) and from the role. The last statement
    checks the outcome and fails, naming what is left, when the role can still
    create temporary tables or tables in `public` (which PostgreSQL 14 and older
    grant to PUBLIC): REVOKE by someone who may not does nothing but warn.
    """
    ident = pg8000.native.identifier(role)
    db = pg8000.native.identifier(database)
    name, db_name = pg8000.native.literal(role), pg8000.native.literal(database)
    auth = f"PASSWORD {pg8000.native.literal(password)}" if password else "PASSWORD NULL"
    return [
        "DO $$ BEGIN"
        f" IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {name})"
        f" THEN CREATE ROLE {ident} LOGIN; END IF; END $$",
        f"ALTER ROLE {ident} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS {auth}",
        f"ALTER ROLE {ident} SET default_transaction_read_only = on",
        f"GRANT CONNECT ON DATABASE {db} TO {ident}",
        f"REVOKE TEMPORARY ON DATABASE {db} FROM PUBLIC",
        f"REVOKE CREATE, TEMPORARY ON DATABASE {db} FROM {ident}",
        f"GRANT USAGE ON SCHEMA public TO {ident}",
        f"REVOKE CREATE ON SCHEMA public FROM {ident}",
        f"REVOKE ALL ON {TABLE} FROM {ident}",
        f"GRANT SELECT ON {TABLE} TO {ident}",
        "DO $$ BEGIN"
        f" IF has_database_privilege({name}, {db_name}, 'TEMPORARY') THEN RAISE EXCEPTION"
        " 'role % can still create temporary tables in database %: run these statements as"
        f" the database''s owner', {name}, {db_name}; END IF;"
        f" IF has_schema_privilege({name}, 'public', 'CREATE') THEN RAISE EXCEPTION"
        " 'role % can create tables in schema public: run REVOKE CREATE ON SCHEMA public"
        f" FROM PUBLIC as its owner (PostgreSQL 15 and later do so by default)', {name};"
        " END IF; END $$",
    ]


def ensure_reader_role(conn: pg8000.native.Connection, role: str, password: str | None) -> None:
    """Create the read-only role on the connected database (idempotent)."""
    database = conn.run("SELECT current_database()")[0][0]
    for sql in reader_role_statements(role, password, database):
        conn.run(sql)
