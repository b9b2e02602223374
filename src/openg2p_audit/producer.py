"""Kafka producing for ingest, with a hard bound on how long a caller waits.

Ingest answers 202 only after the broker has acknowledged every record of the
request (acks=all, idempotent producer), so a pod that scales to zero or
crashes after answering loses nothing. The price is waiting for the ack;
linger lets the concurrent requests of one process share produce batches so
that waiting costs little throughput.

Every wait is bounded by one deadline per request: a caller gets 503 with
Retry-After rather than hanging when the broker is unreachable. kafka-python 3
has no bounded producer buffer of its own, so the number of records still
waiting for an ack is counted here and a request that would exceed the bound
is refused at once: that is the "buffer full" 503.

A record whose request was answered 503 may still reach the topic later (the
producer keeps retrying it); the emitter retries with the same id and the
writer stores each id once.

The producer is created lazily in each process: functions-framework imports
the function in gunicorn's master, then forks workers, and a producer's
sender thread and sockets do not survive a fork.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import ConfigResource, ConfigResourceType
from kafka.errors import (
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
)

from .kafka_binding import KafkaRecord
from .settings import Settings

log = logging.getLogger(__name__)

# After a failed attempt to reach the broker, refuse quickly for this long
# instead of letting every request spend its whole budget on a new attempt.
_FAIL_FAST_SECONDS = 1.0
# Readiness answers are reused this long: probes from the platform and from
# several threads must not each open a new connection.
_READY_CACHE_SECONDS = 1.0
# Bound on flushing what is still in flight when the process exits.
CLOSE_TIMEOUT_SECONDS = 10.0


class Unavailable(Exception):
    """The event is not known to be stored: answer 503 and let the caller retry."""

    def __init__(self, cause: str, detail: str):
        super().__init__(detail)
        self.cause = cause  # broker_unavailable | overloaded | broker_error | shutting_down


class TooLarge(Exception):
    """Kafka would refuse a record this large, now and on every retry: answer 413.

    The topic's `max.message.bytes` is read when the producer is made, and a record over
    it is refused before anything is sent: kafka-python's idempotent producer, once the
    broker has refused a batch for its size, fails every later send with the same error
    (tests/test_write_boundaries.py), so such a record must never reach the broker.
    """


_TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError)
# Kafka's default message.max.bytes: the limit assumed when the topic's cannot be read.
_KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1048588
# What a record batch holding one record adds to its key, value and headers (v2 format: a
# 61-byte batch header, then varint lengths and deltas), reckoned generously.
_BATCH_OVERHEAD = 61 + 40
_PER_HEADER = 10


class EventProducer:
    """One process's producer to the events topic."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.topic = settings.kafka_events_topic
        self.timeout = settings.ingest_ack_timeout_ms / 1000
        self._producer: KafkaProducer | None = None
        self._create_lock = threading.Lock()
        self._failed_at = 0.0
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._probe_pool = ThreadPoolExecutor(1, thread_name_prefix="kafka-ready")
        self._probe: Future[bool] | None = None
        self._probe_lock = threading.Lock()
        self._ready: tuple[float, bool] = (0.0, False)
        self._requests = 0  # publish() calls in progress (on the event loop)
        self.draining = False
        # The topic's max.message.bytes, read with each new producer.
        self.max_message_bytes = _KAFKA_DEFAULT_MAX_MESSAGE_BYTES

    # -- the producer itself -------------------------------------------------

    def _kafka(self, deadline: float) -> KafkaProducer:
        if self._producer is not None:
            return self._producer
        if time.monotonic() - self._failed_at < _FAIL_FAST_SECONDS:
            raise Unavailable("broker_unavailable", "Kafka was unreachable a moment ago")
        if not self._create_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise Unavailable("broker_unavailable", "timed out waiting to connect to Kafka")
        try:
            if self._producer is None:
                budget_ms = max(50, int((deadline - time.monotonic()) * 1000))
                try:
                    self.max_message_bytes = self._topic_limit(budget_ms)
                    budget_ms = max(50, int((deadline - time.monotonic()) * 1000))
                    self._producer = KafkaProducer(**self._config(budget_ms))
                except (KafkaError, OSError) as exc:
                    self._failed_at = time.monotonic()
                    log.warning("cannot connect to Kafka: %s", exc)
                    raise Unavailable("broker_unavailable", f"cannot reach Kafka: {exc}") from exc
                log.info("Kafka producer ready", extra={"topic": self.topic, "pid": os.getpid()})
            return self._producer
        finally:
            self._create_lock.release()

    def _topic_limit(self, budget_ms: int) -> int:
        """The events topic's max.message.bytes (the broker's default when it has none)."""
        admin = KafkaAdminClient(
            bootstrap_servers=self.settings.bootstrap_servers,
            client_id="openg2p-audit-ingest-limits",
            request_timeout_ms=budget_ms,
            bootstrap_timeout_ms=budget_ms,
        )
        try:
            found = admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, self.topic, ["max.message.bytes"])],
                config_filter="all",
            )
            value = found["topic"][self.topic]["max.message.bytes"]["value"]
            return int(value)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("cannot read %s's max.message.bytes (%s); assuming Kafka's default %d",
                        self.topic, exc, _KAFKA_DEFAULT_MAX_MESSAGE_BYTES)  # fmt: skip
            return _KAFKA_DEFAULT_MAX_MESSAGE_BYTES
        finally:
            admin.close()

    def _config(self, bootstrap_timeout_ms: int) -> dict[str, Any]:
        s = self.settings
        return {
            "bootstrap_servers": s.bootstrap_servers,
            "client_id": f"openg2p-audit-ingest-{os.getpid()}",
            "acks": "all",
            "enable_idempotence": True,
            "linger_ms": s.ingest_linger_ms,
            # A batch larger than the topic takes would be split and sent again.
            "batch_size": max(16 * 1024, min(256 * 1024, self.max_message_bytes - _BATCH_OVERHEAD)),
            "max_request_size": max(1024 * 1024, s.ingest_max_event_bytes * 2),
            # Both bound the only blocking inside send(): waiting for metadata.
            "max_block_ms": s.ingest_ack_timeout_ms,
            "bootstrap_timeout_ms": bootstrap_timeout_ms,
            "request_timeout_ms": 10_000,
            "delivery_timeout_ms": 30_000,
            "reconnect_backoff_max_ms": 1_000,
        }

    @property
    def pending(self) -> int:
        return self._pending

    async def publish(
        self,
        records: Sequence[KafkaRecord],
        started: float | None = None,
        on_abandoned: Callable[[int, int], None] | None = None,
    ) -> None:
        """Return once the broker has acknowledged every record; raise Unavailable otherwise.

        The whole call, connecting included, ends within the ack timeout of
        `started`, and holds no thread while it waits: the acks resolve an
        asyncio future from the producer's sender thread. A caller that is
        cancelled while waiting (its client went away) still learns what became
        of the records through `on_abandoned(acked, failed)`, so none goes uncounted.
        """
        if self.draining:
            raise Unavailable("shutting_down", "this instance is shutting down; send elsewhere")
        self._requests += 1
        try:
            await self._publish(records, started, on_abandoned)
        finally:
            self._requests -= 1

    async def _publish(
        self,
        records: Sequence[KafkaRecord],
        started: float | None,
        on_abandoned: Callable[[int, int], None] | None,
    ) -> None:
        deadline = (started or time.monotonic()) + self.timeout
        producer = self._producer
        if producer is None:  # connecting blocks: off the event loop
            drain_on_sigterm(self)
            producer = await asyncio.to_thread(self._kafka, deadline)
        loop = asyncio.get_running_loop()
        if producer._metadata.partitions_for_topic(self.topic) is not None:
            acks = self._send(producer, records, loop)
        else:  # send() would block on the topic's metadata: not on the event loop either
            acks = await asyncio.to_thread(self._send, producer, records, loop)
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await asyncio.shield(acks.future)
        except TimeoutError as exc:
            raise Unavailable(
                "broker_unavailable",
                f"Kafka did not acknowledge within {self.settings.ingest_ack_timeout_ms} ms",
            ) from exc
        except asyncio.CancelledError:
            if on_abandoned is not None:
                acks.when_settled(on_abandoned)
            raise
        if isinstance(acks.error, _TOO_LARGE):
            # The topic's limit shrank since it was read: this producer can send nothing more
            # (see TooLarge), so it is replaced, and the next one reads the limit again.
            self._discard(producer, acks.error)
            raise TooLarge(f"Kafka refused a record this large: {acks.error}")
        if acks.error is not None:
            raise Unavailable("broker_error", f"Kafka rejected a record: {acks.error}")

    def _send(
        self,
        producer: KafkaProducer,
        records: Sequence[KafkaRecord],
        loop: asyncio.AbstractEventLoop,
    ) -> _Acks:
        n = len(records)
        limit = self.max_message_bytes
        for record in records:  # all or nothing, before anything is sent
            size = record.size + _BATCH_OVERHEAD + _PER_HEADER * len(record.headers)
            if size > limit:
                raise TooLarge(
                    f"the event's record is {size} bytes in Kafka; the topic {self.topic} takes "
                    f"at most {limit} (its max.message.bytes)"
                )
        with self._pending_lock:
            if self._pending + n > self.settings.ingest_max_pending_events:
                raise Unavailable(
                    "overloaded",
                    f"{self._pending} events are already waiting for Kafka in this instance",
                )
            self._pending += n
        acks = _Acks(self, loop, n)
        sent = 0
        try:
            for record in records:
                future = producer.send(
                    self.topic, value=record.value, key=record.key, headers=record.headers
                )
                sent += 1
                future.add_callback(acks.ok)
                future.add_errback(acks.fail)
        except KafkaTimeoutError as exc:
            self._failed_at = time.monotonic()
            raise Unavailable("broker_unavailable", "Kafka metadata unavailable in time") from exc
        except _TOO_LARGE as exc:  # the producer's own check, before it took the record
            raise TooLarge(f"Kafka refuses a record this large: {exc}") from exc
        except KafkaError as exc:
            # send() itself only fails like this when the producer is unusable (closed, or
            # in a fatal idempotence state): replace it rather than fail every request.
            self._discard(producer, exc)
            raise Unavailable("broker_error", f"Kafka refused the records: {exc}") from exc
        finally:
            if sent < n:
                with self._pending_lock:
                    self._pending -= n - sent
        return acks

    def _discard(self, producer: KafkaProducer, exc: Exception) -> None:
        with self._create_lock:
            if self._producer is not producer:
                return
            self._producer = None
        log.error("replacing the Kafka producer after: %s", exc)
        threading.Thread(
            target=producer.close, kwargs={"timeout": CLOSE_TIMEOUT_SECONDS}, daemon=True
        ).start()

    def close(self, timeout: float = CLOSE_TIMEOUT_SECONDS) -> None:
        """Flush what is still in flight, then disconnect."""
        producer, self._producer = self._producer, None
        if producer is not None:
            pending = self._pending
            producer.close(timeout=timeout)
            log.info("Kafka producer closed", extra={"flushed": pending, "left": self._pending})
        self._probe_pool.shutdown(wait=False, cancel_futures=True)

    # -- readiness -----------------------------------------------------------

    def _broker_answers(self) -> bool:
        admin = KafkaAdminClient(
            bootstrap_servers=self.settings.bootstrap_servers,
            client_id="openg2p-audit-ingest-ready",
            request_timeout_ms=self.settings.ingest_ack_timeout_ms,
            bootstrap_timeout_ms=self.settings.ingest_ack_timeout_ms,
            reconnect_backoff_max_ms=1_000,
        )
        try:
            return self.topic in admin.list_topics()
        finally:
            admin.close()

    def ready(self) -> tuple[bool, str]:
        """Can this instance reach the broker and see its topic? Answers within the ack timeout."""
        checked_at, ok = self._ready
        if time.monotonic() - checked_at < _READY_CACHE_SECONDS:
            return ok, "cached"
        with self._probe_lock:
            probe = self._probe
            if probe is None or probe.done():
                probe = self._probe = self._probe_pool.submit(self._broker_answers)
        try:
            ok = bool(probe.result(timeout=self.timeout))
            detail = "broker reachable" if ok else f"topic {self.topic} does not exist"
        except FutureTimeout:
            ok, detail = False, "broker did not answer in time"
        except Exception as exc:  # noqa: BLE001 - any failure to reach it means "not ready"
            ok, detail = False, f"broker unreachable: {exc}"
        self._ready = (time.monotonic(), ok)
        return ok, detail


class _Acks:
    """The acks of one request's records; resolves `future` on the loop when all are in.

    Called from the producer's sender thread once per record, so it takes one
    lock per record and wakes the event loop once per request (at the last ack,
    or at the first failure, which already decides the answer).
    """

    __slots__ = (
        "_left", "_lock", "_loop", "_owner", "_settled_hook", "acked", "error", "failed", "future",
    )  # fmt: skip

    def __init__(self, owner: EventProducer, loop: asyncio.AbstractEventLoop, count: int):
        self._owner = owner
        self._loop = loop
        self._left = count
        self._lock = threading.Lock()
        self.future: asyncio.Future[None] = loop.create_future()
        self.acked = 0
        self.failed = 0
        self.error: BaseException | None = None
        self._settled_hook: Callable[[int, int], None] | None = None

    def when_settled(self, hook: Callable[[int, int], None]) -> None:
        """Call `hook(acked, failed)` once every record has an outcome (maybe right now)."""
        with self._lock:
            if self._left > 0:
                self._settled_hook = hook
                return
        hook(self.acked, self.failed)

    def ok(self, _metadata: Any) -> None:
        self._settle(None)

    def fail(self, exc: BaseException) -> None:
        self._settle(exc)

    def _settle(self, exc: BaseException | None) -> None:
        owner = self._owner
        with owner._pending_lock:
            owner._pending -= 1
        with self._lock:
            self._left -= 1
            if exc is None:
                self.acked += 1
            else:
                self.failed += 1
            first_error = exc is not None and self.error is None
            if first_error:
                self.error = exc
            wake = self._left == 0 or first_error
            hook = self._settled_hook if self._left == 0 else None
        if hook is not None:
            hook(self.acked, self.failed)
        if wake:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                self._loop.call_soon_threadsafe(self._resolve)

    def _resolve(self) -> None:
        if not self.future.done():
            self.future.set_result(None)


_instance: EventProducer | None = None
_instance_pid = 0
_instance_lock = threading.Lock()


def producer_for(settings: Settings) -> EventProducer:
    """This process's producer, created on first use (and again after a fork)."""
    global _instance, _instance_pid
    instance = _instance
    if instance is not None and _instance_pid == os.getpid():
        return instance
    with _instance_lock:
        if _instance is None or _instance_pid != os.getpid():
            _instance = EventProducer(settings)
            _instance_pid = os.getpid()
            atexit.register(_close_at_exit, _instance)
        return _instance


def drain_on_sigterm(instance: EventProducer) -> None:
    """On SIGTERM: refuse new events, let waiting requests finish, close, then let the server go.

    uvicorn answers SIGTERM by finishing the open requests and then dying by
    the same signal with its default action, so atexit never runs in a worker.
    So the signal is taken here first, on the worker's main thread (the event
    loop): new requests get 503, the requests already waiting for Kafka get
    their answer, the producer flushes and closes, and only then is uvicorn's
    own handler called and the worker shuts down.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    server_handler = signal.getsignal(signal.SIGTERM)
    if getattr(server_handler, "_audit_drain", False):
        return
    loop = asyncio.get_running_loop()

    def drain() -> None:
        deadline = time.monotonic() + instance.timeout + 1.0
        while instance._requests and time.monotonic() < deadline:
            time.sleep(0.01)
        instance.close()
        if callable(server_handler):
            loop.call_soon_threadsafe(server_handler, signal.SIGTERM, None)
        else:  # no server handler (the default action): exit as it would have
            signal.signal(signal.SIGTERM, server_handler)
            os.kill(os.getpid(), signal.SIGTERM)

    def on_sigterm(_signum: int, _frame: Any) -> None:
        if instance.draining:
            return
        instance.draining = True
        threading.Thread(target=drain, name="kafka-drain", daemon=True).start()

    on_sigterm._audit_drain = True  # type: ignore[attr-defined]
    signal.signal(signal.SIGTERM, on_sigterm)


def _close_at_exit(instance: EventProducer) -> None:
    # gunicorn's worker drains its connections on SIGTERM and then leaves
    # through sys.exit, so atexit runs after the last request has answered.
    if _instance_pid == os.getpid():
        instance.close()
