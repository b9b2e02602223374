"""`AuditClient`: emit audit events to ingest, through a durable outbox or synchronously.

With `outbox_path`, `emit` validates the event, commits it to the outbox and
returns its id; a background thread sends what the outbox holds, in batches
within ingest's limits, and keeps every event until ingest answered 202 for
it (see `delivery` for what each answer means). A process that crashes or is
killed resumes, on its next start, from what the outbox still holds: every
event whose `emit` returned is delivered once ingest is reachable, with the id
it was given (the writer stores an id once, so a re-sent event is one row).

Without an outbox, `emit` sends the event at once and raises when it was not
acknowledged: the caller then holds the only copy.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import urllib3

from . import event as events
from .delivery import Item, Resolution, Transport, deliver
from .errors import DeliveryFailed, EventRejected, InvalidEvent
from .outbox import Outbox
from .tokens import token_source as as_token_source

log = logging.getLogger("openg2p_audit_client")

# Ingest's defaults (INGEST_MAX_BATCH_EVENTS, INGEST_MAX_BATCH_BYTES, INGEST_MAX_EVENT_BYTES,
# INGEST_MAX_DEPTH): set the client's to a deployment's values when it changes them.
MAX_BATCH_EVENTS = 500
MAX_BATCH_BYTES = 5 * 1024 * 1024
MAX_EVENT_BYTES = 256 * 1024
MAX_DEPTH = 32

_LIVE: weakref.WeakSet[AuditClient] = weakref.WeakSet()
_SETUP_LOCK = threading.Lock()


class AuditClient:
    """Emits audit events to ingest (or to a Knative Broker with `batch=False`).

    `token_source`: a token string, a callable returning one, `ClientCredentials`,
    `TokenFile`, or None when ingest takes events without tokens.
    `outbox_path`: the SQLite outbox file; None sends synchronously.
    """

    def __init__(
        self,
        url: str,
        token_source: Any = None,
        outbox_path: str | os.PathLike[str] | None = None,
        *,
        timeout: float = 10.0,
        batch: bool = True,
        max_batch_events: int = MAX_BATCH_EVENTS,
        max_batch_bytes: int = MAX_BATCH_BYTES,
        max_event_bytes: int = MAX_EVENT_BYTES,
        max_depth: int = MAX_DEPTH,
        max_outbox_events: int = 100_000,
        max_outbox_bytes: int = 256 * 1024 * 1024,
        linger: float = 0.05,
        backoff_initial: float = 0.5,
        backoff_max: float = 60.0,
        http: urllib3.PoolManager | None = None,
        prometheus: bool = True,
    ):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url must be an http(s) URL, got {url!r}")
        self.url = url
        self.tokens = as_token_source(token_source)
        self.timeout = timeout
        self.batch = batch
        self.max_batch_events = max_batch_events if batch else 1
        self.max_batch_bytes = max_batch_bytes
        self.max_event_bytes = max_event_bytes
        self.max_depth = max_depth
        self.linger = linger
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.outbox_path = os.fspath(outbox_path) if outbox_path is not None else None
        self._outbox_bounds = (max_outbox_events, max_outbox_bytes)
        self._given_http = http
        # What this process sent and what ingest refused (the outbox keeps the refused ones).
        self.sent = 0
        self.rejected = 0
        self.failed_attempts = 0
        self._pid = -1
        self._closed = False
        self._setup()
        _LIVE.add(self)
        if prometheus:
            from .metrics import register_default

            register_default()
        if self.outbox is not None and self.outbox.depth()[0]:
            self._start_sender()  # what an earlier run left: resume at once

    # -- per process -------------------------------------------------------------

    def _setup(self) -> None:
        """Connections, locks and the sender belong to one process; a forked child
        (an Odoo or gunicorn worker) makes its own on first use."""
        self._pid = os.getpid()
        http = self._given_http or urllib3.PoolManager(maxsize=4)
        self._transport = Transport(
            self.url, self.tokens, timeout=self.timeout, batch=self.batch, http=http
        )
        self.outbox: Outbox | None = None
        if self.outbox_path is not None:
            self.outbox = Outbox(
                self.outbox_path,
                max_events=self._outbox_bounds[0],
                max_bytes=self._outbox_bounds[1],
            )
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._kick = threading.Event()
        self._closing = threading.Event()
        self._sender: threading.Thread | None = None
        self._pause_until = 0.0
        self._pause_is_retry_after = False
        self._failures = 0

    def _this_process(self) -> None:
        if self._pid != os.getpid():
            with _SETUP_LOCK:
                if self._pid != os.getpid():
                    # The parent's SQLite connection must not be used (nor closed) here.
                    self._setup()

    # -- emitting ------------------------------------------------------------------

    def emit(
        self,
        type: str,
        source: str,
        actor: str | dict[str, Any],
        action: str,
        outcome: str,
        resource: dict[str, Any] | None = None,
        subject: str | None = None,
        *,
        id: str | None = None,
        time: datetime | str | None = None,
        traceparent: str | None = None,
        extensions: dict[str, str | int | bool] | None = None,
        **details: Any,
    ) -> str:
        """Emit one audit event; returns its id.

        `details` are the record's other members (`reason`, `changes`, `context`, or
        the emitter's own). Raises InvalidEvent before anything is kept or sent, and
        OutboxFull when the outbox is at its bound; without an outbox also
        EventRejected and DeliveryFailed.
        """
        built = events.build_event(
            type, source, actor, action, outcome, resource, subject,
            id=id, time=time, traceparent=traceparent, extensions=extensions, **details,
        )  # fmt: skip
        return self.emit_event(built)

    def emit_event(self, event: dict[str, Any]) -> str:
        """Emit a whole CloudEvent given as a dict (`specversion`, `id`, `time` and
        `datacontenttype` are filled in when missing); returns its id."""
        (event_id,) = self.emit_events([event])
        return event_id

    def emit_events(self, batch: Iterable[dict[str, Any]]) -> list[str]:
        """Emit several events: with an outbox, all are committed in one transaction or,
        when one is invalid or they do not fit, none. Without one, they are sent in
        batches and the first refusal or failure is raised."""
        checked = [self.prepare(e) for e in batch]
        if self._closed:
            raise RuntimeError("the AuditClient is closed")
        self._this_process()
        if self.outbox is not None:
            self.outbox.put((i.id, i.body) for i in checked)
            self._start_sender()
            self._wake.set()
            return [i.id for i in checked]
        for chunk in self.chunks(checked):
            res = self.send(chunk)
            if res.rejected:
                r = res.rejected[0]
                raise EventRejected(r.item.id, r.status, r.body, r.problems)
            if res.failure is not None:
                raise res.failure
        return [i.id for i in checked]

    def prepare(self, raw: dict[str, Any]) -> Item:
        """Complete, check and encode one event; InvalidEvent names every problem."""
        if not isinstance(raw, dict):
            raise InvalidEvent(["an event must be a JSON object"])
        event = events.complete(raw)
        events.check(event, self.max_depth)
        body = events.encode(event)
        size = events.record_size(event, body)
        if size > self.max_event_bytes:
            raise InvalidEvent(
                [f"the event is about {size} bytes at ingest; at most {self.max_event_bytes} "
                 "are allowed (INGEST_MAX_EVENT_BYTES)"], event["id"],
            )  # fmt: skip
        return Item(None, event["id"], body)

    def chunks(self, items: list[Item]) -> Iterable[list[Item]]:
        """`items` in request-sized groups (ingest's event count and body size limits)."""
        chunk: list[Item] = []
        total = 1
        for item in items:
            if chunk and (len(chunk) >= self.max_batch_events
                          or total + len(item.body) + 1 > self.max_batch_bytes):  # fmt: skip
                yield chunk
                chunk, total = [], 1
            chunk.append(item)
            total += len(item.body) + 1
        if chunk:
            yield chunk

    def send(self, items: list[Item]) -> Resolution:
        """One delivery attempt of `items` now, bypassing the outbox; counted and logged."""
        self._this_process()
        res = deliver(self._transport, items)
        self._account(res)
        return res

    # -- the outbox's sender -------------------------------------------------------

    def _start_sender(self) -> None:
        with self._lock:
            if self._sender is None or not self._sender.is_alive():
                self._closing.clear()
                self._sender = threading.Thread(
                    target=self._run, name="openg2p-audit-outbox", daemon=True
                )
                self._sender.start()

    def _run(self) -> None:
        assert self.outbox is not None
        lease = 3 * self.timeout + 10  # a request, a 401 retry and a token fetch
        while not self._closing.is_set():
            pause = self._pause_until - time.monotonic()
            if pause > 0:
                self._kick.wait(pause)
                if self._kick.is_set() and not self._pause_is_retry_after:
                    self._pause_until = 0.0  # flush(): try again now rather than after backoff
                self._kick.clear()
                continue
            try:
                rows = self.outbox.claim(self.max_batch_events, self.max_batch_bytes, lease)
            except Exception:  # the database locked for longer than the busy timeout...
                log.exception("outbox %s: could not read; trying again", self.outbox_path)
                self._pause(None)
                continue
            if not rows:
                elsewhere = self.outbox.next_unclaimed_in()
                self._wake.wait(1.0 if elsewhere is None else min(1.0, elsewhere + 0.05))
                if self._wake.is_set() and self.linger and not self._closing.is_set():
                    time.sleep(self.linger)  # let a burst of emits fill one batch
                self._wake.clear()
                continue
            items = [Item(r.seq, r.id, r.body) for r in rows]
            try:
                res = self.send(items)
            except Exception as exc:  # a token source's own bug...: keep the rows, keep going
                log.exception("audit events not sent; they stay in the outbox")
                res = Resolution(unsent=items, failure=DeliveryFailed(str(exc)))
            try:
                self._settle(res)
            except Exception:
                log.exception("outbox %s: could not record an outcome", self.outbox_path)

    def _settle(self, res: Resolution) -> None:
        assert self.outbox is not None
        self.outbox.delete([i.key for i in res.accepted])
        self.outbox.reject(
            [(r.item.key, r.status, r.body, _json_list(r.problems)) for r in res.rejected]
        )
        failure = res.failure
        self.outbox.release([i.key for i in res.unsent], str(failure) if failure else None)
        if failure is not None:
            self._pause(failure)
        elif res.accepted and self._failures:
            log.info(
                "delivering again after %d failed attempt(s); %d event(s) waiting",
                self._failures, self.outbox.depth()[0],
            )  # fmt: skip
            self._failures = 0

    def _pause(self, failure: DeliveryFailed | None) -> None:
        self._failures += 1
        if failure is not None and failure.retry_after is not None:
            delay, self._pause_is_retry_after = min(failure.retry_after, 3600.0), True
        else:
            backoff = min(self.backoff_max, self.backoff_initial * 2 ** (self._failures - 1))
            delay = backoff * random.uniform(0.5, 1.0)  # jitter, not secrecy
            self._pause_is_retry_after = False
        self._pause_until = time.monotonic() + delay
        if self._failures == 1 or self._failures % 20 == 0:
            log.warning(
                "audit events not delivered (attempt %d, next in %.1f s; they stay in the "
                "outbox): %s", self._failures, delay, failure,
            )  # fmt: skip

    def _account(self, res: Resolution) -> None:
        with self._lock:
            self.sent += len(res.accepted)
            self.rejected += len(res.rejected)
            if res.failure is not None:
                self.failed_attempts += 1
        for r in res.rejected:
            log.warning(
                "ingest rejected audit event %s (%d): %s%s", r.item.id, r.status,
                "; ".join(str(p.get("message", p)) for p in r.problems) or r.body[:300],
                " (kept in the outbox's rejected table)" if self.outbox is not None else "",
            )  # fmt: skip

    # -- waiting, closing, looking ---------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the outbox is empty (True) or `timeout` seconds passed (False).

        A backoff in progress is cut short; a `Retry-After` of ingest's is still honoured.
        """
        if self.outbox is None:
            return True
        self._this_process()
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.outbox.depth()[0]:
            self._start_sender()
            self._kick.set()
            self._wake.set()
        while True:
            if self.outbox.depth()[0] == 0:
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            time.sleep(0.05 if left is None else min(0.05, left))

    def close(self, timeout: float = 5.0) -> bool:
        """Flush for up to `timeout` seconds, then stop the sender; True when nothing waits.

        What is still queued stays in the outbox for the next start.
        """
        if self._closed:
            return True
        empty = self.flush(timeout)
        self._closed = True
        sender = self._sender if self._pid == os.getpid() else None
        self._closing.set()
        self._kick.set()
        self._wake.set()
        if sender is not None:
            sender.join(3 * self.timeout + 10)
        if self.outbox is not None and (sender is None or not sender.is_alive()):
            self.outbox.close()
        _LIVE.discard(self)
        return empty

    def __enter__(self) -> AuditClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def metrics(self) -> dict[str, float]:
        """What the Prometheus collector exports, as numbers."""
        out: dict[str, float] = {
            "sent": self.sent,
            "rejected": self.rejected,
            "failed_attempts": self.failed_attempts,
        }
        if self.outbox is not None and not self._closed:
            self._this_process()
            events_, size = self.outbox.depth()
            out.update(
                outbox_events=events_,
                outbox_bytes=size,
                outbox_oldest_age_seconds=self.outbox.oldest_age(),
                outbox_rejected=self.outbox.rejected_count(),
            )
        return out

    def __repr__(self) -> str:
        return f"AuditClient({self.url!r}, outbox={self.outbox_path!r})"


def live_clients() -> list[AuditClient]:
    return list(_LIVE)


def _json_list(problems: list[dict[str, Any]]) -> str:
    return json.dumps(problems, ensure_ascii=False)
