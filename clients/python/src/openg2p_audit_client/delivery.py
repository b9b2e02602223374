"""Sending events to ingest and deciding, per event, what its answer means.

One function, `deliver`, serves both paths: the outbox's background sender
and a synchronous `emit` without an outbox. Its rules:

- **202**: accepted; ingest answers it only once Kafka holds every event.
- **5xx, a refused connection, a timeout**: "not known to be stored". Every
  event of the request stays unsent, to be sent again with the same id (the
  writer stores an id once); `Retry-After` says when.
- **401** after one retry with a fresh token, and **404, 405, 407, 408, 425,
  429**: refusals of the request, not of its events (wrong credentials, wrong
  URL, overload); the events stay unsent, as for a 503, and the cause is logged.
- **Any other 4xx** is a refusal of events, for good. A batch is all or
  nothing at ingest, and its body lists each problem with the `index` of its
  event: those events are rejected with the body, and the others are sent
  again at once without them. A refusal that names no index (a request-level
  400 or 413) is narrowed down by sending each half of the batch on its own,
  until a single event's refusal is its own.
"""

from __future__ import annotations

import email.utils
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import urllib3

from ._version import __version__
from .errors import DeliveryFailed, TokenError

STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
# Answers that refuse the request rather than its events: sending later may succeed.
REQUEST_REFUSALS = frozenset({401, 404, 405, 407, 408, 425, 429})
USER_AGENT = f"openg2p-audit-client/{__version__}"


@dataclass(frozen=True)
class Item:
    """One event to send: `key` is the caller's handle (the outbox row), `body` its JSON."""

    key: Any
    id: str
    body: bytes


@dataclass(frozen=True)
class Refusal:
    item: Item
    status: int
    body: str
    problems: list[dict[str, Any]]


@dataclass
class Resolution:
    accepted: list[Item] = field(default_factory=list)
    rejected: list[Refusal] = field(default_factory=list)
    unsent: list[Item] = field(default_factory=list)
    failure: DeliveryFailed | None = None
    requests: int = 0


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    retry_after: float | None

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


class Transport:
    """POSTs to one URL: single events in structured mode, several as a CloudEvents batch.

    `batch=False` sends every event on its own, which a Knative Broker's ingress
    requires (it takes one event per request).
    """

    def __init__(
        self,
        url: str,
        tokens: Any,
        *,
        timeout: float = 10.0,
        batch: bool = True,
        http: urllib3.PoolManager | None = None,
    ):
        self.url = url
        self.tokens = tokens
        self.timeout = timeout
        self.batch = batch
        self.http = http or urllib3.PoolManager(maxsize=4)

    def post(self, bodies: list[bytes]) -> Answer:
        """One request; DeliveryFailed when no answer came, TokenError when no token."""
        if len(bodies) == 1:
            payload, ctype = bodies[0], STRUCTURED
        else:
            assert self.batch, "several events in one request need batch mode"
            payload, ctype = b"[" + b",".join(bodies) + b"]", BATCH
        answer = self._post(payload, ctype)
        if answer.status == 401 and hasattr(self.tokens, "invalidate"):
            # The token expired early, was revoked, or the key rotated: one more try with
            # a fresh one before the refusal counts.
            self.tokens.invalidate()
            answer = self._post(payload, ctype)
        return answer

    def _post(self, payload: bytes, ctype: str) -> Answer:
        headers = {"Content-Type": ctype, "Accept": "application/json", "User-Agent": USER_AGENT}
        if self.tokens is not None:
            headers["Authorization"] = f"Bearer {self.tokens.token()}"
        try:
            resp = self.http.request(
                "POST", self.url, body=payload, headers=headers,
                timeout=urllib3.Timeout(self.timeout), retries=False, redirect=False,
            )  # fmt: skip
        except urllib3.exceptions.HTTPError as exc:
            raise DeliveryFailed(f"{self.url} could not be reached: {_reason(exc)}") from None
        return Answer(resp.status, resp.data, retry_after(resp.headers.get("Retry-After")))


def deliver(transport: Transport, items: list[Item]) -> Resolution:
    """Send `items` (already within ingest's batch limits) and sort them by outcome."""
    res = Resolution()
    work = [items]
    while work:
        chunk = work.pop(0)
        if res.failure is not None:
            res.unsent.extend(chunk)
            continue
        res.requests += 1
        try:
            answer = transport.post([i.body for i in chunk])
        except DeliveryFailed as exc:
            res.failure = exc
        except TokenError as exc:
            res.failure = DeliveryFailed(f"no token for {transport.url}: {exc}")
        else:
            if answer.status == 202:
                res.accepted.extend(chunk)
                continue
            if not 400 <= answer.status < 500 or answer.status in REQUEST_REFUSALS:
                res.failure = DeliveryFailed(_describe(transport.url, answer), answer.status,
                                             answer.retry_after)  # fmt: skip
            else:
                work[0:0] = _refused(chunk, answer, res)
                continue
        res.unsent.extend(chunk)
    return res


def _refused(chunk: list[Item], answer: Answer, res: Resolution) -> list[list[Item]]:
    """Reject the events the refusal names; return what must be sent again, and how."""
    problems = _problems(answer.body)
    if len(chunk) == 1:
        res.rejected.append(Refusal(chunk[0], answer.status, answer.text, problems))
        return []
    by_index: dict[int, list[dict[str, Any]]] = {}
    for p in problems:
        i = p.get("index")
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(chunk):
            by_index = {}
            break
        by_index.setdefault(i, []).append(p)
    if not by_index:
        half = len(chunk) // 2
        return [chunk[:half], chunk[half:]]
    for i in sorted(by_index):
        res.rejected.append(Refusal(chunk[i], answer.status, answer.text, by_index[i]))
    good = [item for i, item in enumerate(chunk) if i not in by_index]
    return [good] if good else []


def _problems(body: bytes) -> list[dict[str, Any]]:
    try:
        doc = json.loads(body)
    except ValueError:
        return []
    found = doc.get("problems") if isinstance(doc, dict) else None
    return [p for p in found if isinstance(p, dict)] if isinstance(found, list) else []


def _describe(url: str, answer: Answer) -> str:
    if answer.status == 401:
        what = "refused the token (401) even after a fresh one was fetched"
    elif answer.status in (404, 405):
        what = f"answered {answer.status}: is this the ingest (or Broker) URL?"
    else:
        what = f"answered {answer.status}"
    return f"{url} {what}: {answer.text[:300]}"


def _reason(exc: Exception) -> str:
    inner = getattr(exc, "reason", None)
    return f"{type(exc).__name__}: {inner or exc}"


def retry_after(value: str | None) -> float | None:
    """A Retry-After header in seconds from now (RFC 9110: delay-seconds or an HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - datetime.now(timezone.utc).timestamp())
