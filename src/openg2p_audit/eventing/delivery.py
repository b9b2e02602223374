"""Delivering one CloudEvent to a subscriber the way the Knative Kafka dispatcher does.

Mirrors knative-extensions/eventing-kafka-broker's `WebClientCloudEventSender`
and `RecordDispatcherImpl`:

- binary-mode HTTP POST with `Prefer: reply` and `Kn-Namespace`, header values
  as Vert.x writes them (binding.py);
- with Knative's OIDC feature, a token of the source's OIDC service account for
  the destination's audience, and for the dead-letter sink's audience (the
  KafkaSink's own) on dead letters; with the feature off but an audience named,
  the dispatcher cannot get a token and fails before sending
  (OIDCTokenRequestException): not retried, dead-lettered with
  `knativeerrordest` and no code;
- an answer >= 300 is a failure; 5xx, 404, 408, 409 and 429 (and no answer
  at all: refused connection, timeout) are retried up to `delivery.retry`
  times, waiting `backoff(n)` before retry n; any other failure is final;
- a final failure goes to the dead-letter sink, with `knativeerrordest`
  (the subscriber URL), `knativeerrorcode` (its status, if it answered),
  `knativeerrordata` (base64 of at most 1024 bytes of its body, if any) and
  one extension per `kne-*` response header;
- the dead-letter sink is sent to with the same retry policy.

One deliberate difference, stricter than Knative: when the dead-letter sink
cannot take the event either (or none is configured) Knative still commits
the offset and the event is gone. An audit trail may not lose events, so by
default the runner keeps retrying the whole delivery and the offset stays
uncommitted (`on_dead_letter_failure="retry"`); `"commit"` gives Knative's
behaviour.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from .binding import Event, Unsendable, to_http_binary, to_http_structured
from .manifests import Delivery

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 600.0  # seconds: the dispatcher's DEFAULT_TIMEOUT_MS
ERROR_DATA_MAX_BYTES = 1024
ERROR_HEADER_PREFIX = "kne-"
LOG_PER_SECOND = 20


def is_retryable(status: int) -> bool:
    """The Kafka dispatcher's rule (WebClientCloudEventSender.isRetryableStatusCode)."""
    return status >= 500 or status in (404, 408, 409, 429)


# The CloudEvents Go SDK's rule, which the PingSource adapter retries by (cloudevents/sdk-go
# v2 protocol/http/protocol.go, defaultRetriableErrors): not 500, not 408 or 409.
SDK_RETRYABLE = frozenset((404, 413, 425, 429, 502, 503, 504))


def is_retryable_by_the_sdk(status: int) -> bool:
    return status in SDK_RETRYABLE


@dataclass
class Response:
    status: int | None  # None: no HTTP answer (connection refused, timeout, ...)
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


@dataclass
class Outcome:
    """What became of one event. `settled` means its offset may be committed."""

    event_id: str
    delivered: bool = False
    dead_lettered: bool = False
    dropped: bool = False  # dead-letter failed and the policy said commit anyway
    filtered: bool = False  # a Trigger filter did not match
    aborted: bool = False  # the runner is stopping; not settled
    attempts: int = 0
    status: int | None = None
    dead_letter_status: int | None = None
    error: str | None = None

    @property
    def settled(self) -> bool:
        return self.delivered or self.dead_lettered or self.dropped or self.filtered


def new_session(connections: int = 100, timeout: float = DEFAULT_TIMEOUT) -> aiohttp.ClientSession:
    """A keep-alive client on the running loop, as the dispatcher's Vert.x WebClient pools.

    The attempt timeout is the session's, so no request builds one of its own."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections, limit_per_host=connections),
        timeout=aiohttp.ClientTimeout(total=timeout),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Content-Type"),
    )


async def post(
    session: aiohttp.ClientSession, url: str, event: Event, *, namespace: str, structured: bool,
    token: str | None = None,
) -> Response:  # fmt: skip
    try:
        headers, body = to_http_structured(event) if structured else to_http_binary(event)
    except Unsendable as exc:  # Vert.x fails the request before it is sent
        return Response(None, error=f"IllegalArgumentException: {exc}")
    headers["Prefer"] = "reply"
    headers["Kn-Namespace"] = namespace
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        async with session.post(url, data=body, headers=headers, allow_redirects=False) as resp:
            data = await resp.read()
            if 200 <= resp.status < 300:  # headers matter only to a dead letter's extensions
                return Response(resp.status, data)
            return Response(resp.status, data or b"", dict(resp.headers.items()))
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return Response(None, error=f"{type(exc).__name__}: {exc}")


def error_extensions(destination: str, response: Response) -> dict[str, str]:
    ext = {"knativeerrordest": destination}
    if response.status is None:
        return ext
    ext["knativeerrorcode"] = str(response.status)
    for name, value in response.headers.items():
        if name.lower().startswith(ERROR_HEADER_PREFIX):
            ext[name[len(ERROR_HEADER_PREFIX) :].lower()] = value
    if response.body:
        ext["knativeerrordata"] = base64.b64encode(response.body[:ERROR_DATA_MAX_BYTES]).decode()
    return ext


class Aborted(Exception):
    """The runner is stopping; the event stays unsettled."""


@dataclass
class Egress:
    """One subscriber (and its dead-letter sink) with one delivery policy.

    Deliveries are coroutines on the dispatcher's event loop, sharing one
    keep-alive `session`; `deliver_now` runs one from any thread (a ping, a
    redelivery) on a loop and session of its own.
    """

    name: str  # for logs: "KafkaSource/audit-events-to-writer"
    destination: str
    delivery: Delivery
    namespace: str
    dead_letter: str | None = None
    on_dead_letter_failure: str = "retry"  # retry | commit
    # Knative's OIDC feature: a token of the sender's identity for the destination's
    # audience on every attempt, and one for the dead-letter sink's audience on every
    # attempt to it (RecordDispatcherImpl's two senders share the identity).
    token: Callable[[], str] | None = None
    dead_letter_token: Callable[[], str] | None = None
    # Which answers are worth another attempt: the Kafka dispatcher's rule by default.
    retryable: Callable[[int], bool] = is_retryable
    # The destination names an audience but the OIDC feature is off: WebClientCloudEventSender
    # fails each delivery with OIDCTokenRequestException before sending (not retried).
    no_oidc_service_account: bool = False
    stopping: threading.Event = field(default_factory=threading.Event)
    _log_second: int = field(default=0, repr=False)
    _log_count: int = field(default=0, repr=False)
    _log_skipped: int = field(default=0, repr=False)

    async def _pause(self, seconds: float) -> bool:
        """Sleep, but wake within 50 ms when the runner stops; True if it is stopping."""
        deadline = time.monotonic() + seconds
        while not self.stopping.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await asyncio.sleep(min(left, 0.05))
        return True

    async def _send(
        self, session: aiohttp.ClientSession, url: str, event: Event, outcome: Outcome
    ) -> Response:
        structured = self.delivery.format == "structured"
        mint = self.token if url == self.destination else self.dead_letter_token
        retry = 0
        if url == self.destination and self.no_oidc_service_account:
            outcome.attempts += 1
            return Response(
                None, error="OIDCTokenRequestException: can't request an OIDC token, as target "
                "has an audience set, but no OIDC service account set in client yet",
            )  # fmt: skip
        while True:
            token = mint() if mint is not None else None
            resp = await post(
                session, url, event, namespace=self.namespace, structured=structured, token=token
            )
            outcome.attempts += 1
            if resp.ok:
                return resp
            final = resp.status is not None and not self.retryable(resp.status)
            if final or retry >= self.delivery.retry:
                return resp
            retry += 1
            wait = self.delivery.backoff(retry)
            log.warning(
                "%s: %s answered %s for event %s; retry %d/%d in %.3fs",
                self.name, url, resp.status or resp.error, event.id, retry,
                self.delivery.retry, wait,
            )  # fmt: skip
            if await self._pause(wait):
                raise Aborted

    def new_session(self, connections: int) -> aiohttp.ClientSession:
        return new_session(connections, self.delivery.timeout or DEFAULT_TIMEOUT)

    def _log_delivered(self, event: Event, status: int | None) -> None:
        """One line per delivery for a person watching `dev up`, at most LOG_PER_SECOND a
        second; beyond that a count, so a drain at thousands a second is not a log flood."""
        now = int(time.monotonic())
        if now != self._log_second:
            if self._log_skipped:
                log.info("%s: %d more events delivered to %s in the last second",
                         self.name, self._log_skipped, self.destination)  # fmt: skip
            self._log_second, self._log_count, self._log_skipped = now, 0, 0
        if self._log_count >= LOG_PER_SECOND:
            self._log_skipped += 1
            return
        self._log_count += 1
        log.info("%s: event %s (%s) -> %s answered %s",
                 self.name, event.id, event.type, self.destination, status)  # fmt: skip

    def deliver_now(self, event: Event) -> Outcome:
        """`deliver` from a thread without an event loop."""

        async def once() -> Outcome:
            async with self.new_session(4) as session:
                return await self.deliver(session, event)

        return asyncio.run(once())

    async def deliver(self, session: aiohttp.ClientSession, event: Event) -> Outcome:
        """Deliver (retrying, dead-lettering) until settled or the runner stops."""
        outcome = Outcome(event.id)
        round_ = 0
        while True:
            try:
                return await self._deliver_once(session, event, outcome)
            except Aborted:
                outcome.aborted = True
                return outcome
            except _DeadLetterFailed:
                round_ += 1
                pause = max(self.delivery.backoff(min(round_, 6)), 1.0)
                log.error(
                    "%s: event %s neither delivered nor dead-lettered; offset kept, "
                    "trying again in %.1fs",
                    self.name, event.id, pause,
                )  # fmt: skip
                if await self._pause(pause):
                    outcome.aborted = True
                    return outcome

    async def _deliver_once(
        self, session: aiohttp.ClientSession, event: Event, outcome: Outcome
    ) -> Outcome:
        resp = await self._send(session, self.destination, event, outcome)
        outcome.status = resp.status
        outcome.error = resp.error
        if resp.ok:
            outcome.delivered = True
            if log.isEnabledFor(logging.INFO):
                self._log_delivered(event, resp.status)
            return outcome
        if self.dead_letter is None:
            log.error(
                "%s: event %s failed (%s) and there is no dead-letter sink",
                self.name, event.id, resp.status or resp.error,
            )  # fmt: skip
            if self.on_dead_letter_failure == "commit":
                outcome.dropped = True
                return outcome
            raise _DeadLetterFailed
        failed = event.with_extensions(error_extensions(self.destination, resp))
        dls = await self._send(session, self.dead_letter, failed, outcome)
        outcome.dead_letter_status = dls.status
        if dls.ok:
            outcome.dead_lettered = True
            log.warning(
                "%s: event %s dead-lettered to %s (subscriber answered %s)",
                self.name, event.id, self.dead_letter, resp.status or resp.error,
            )  # fmt: skip
            return outcome
        log.error(
            "%s: dead-letter sink %s answered %s for event %s",
            self.name, self.dead_letter, dls.status or dls.error, event.id,
        )  # fmt: skip
        if self.on_dead_letter_failure == "commit":
            outcome.dropped = True
            return outcome
        raise _DeadLetterFailed


class _DeadLetterFailed(Exception):
    pass
