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

import atexit
import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from kafka import KafkaAdminClient, KafkaProducer
from kafka.errors import KafkaError, KafkaTimeoutError

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
        self.cause = cause  # broker_unavailable | overloaded | broker_error


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
                    self._producer = KafkaProducer(**self._config(budget_ms))
                except (KafkaError, OSError) as exc:
                    self._failed_at = time.monotonic()
                    log.warning("cannot connect to Kafka: %s", exc)
                    raise Unavailable("broker_unavailable", f"cannot reach Kafka: {exc}") from exc
                log.info("Kafka producer ready", extra={"topic": self.topic, "pid": os.getpid()})
            return self._producer
        finally:
            self._create_lock.release()

    def _config(self, bootstrap_timeout_ms: int) -> dict[str, Any]:
        s = self.settings
        return {
            "bootstrap_servers": s.bootstrap_servers,
            "client_id": f"openg2p-audit-ingest-{os.getpid()}",
            "acks": "all",
            "enable_idempotence": True,
            "linger_ms": s.ingest_linger_ms,
            "batch_size": 256 * 1024,
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

    def _done(self, _result: Any = None) -> None:
        with self._pending_lock:
            self._pending -= 1

    def publish(self, records: Sequence[KafkaRecord], started: float | None = None) -> None:
        """Return once the broker has acknowledged every record; raise Unavailable otherwise.

        The whole call, connecting included, ends within the ack timeout of `started`.
        """
        deadline = (started or time.monotonic()) + self.timeout
        producer = self._kafka(deadline)
        n = len(records)
        with self._pending_lock:
            if self._pending + n > self.settings.ingest_max_pending_events:
                raise Unavailable(
                    "overloaded",
                    f"{self._pending} events are already waiting for Kafka in this instance",
                )
            self._pending += n
        futures = []
        try:
            for record in records:
                future = producer.send(
                    self.topic, value=record.value, key=record.key, headers=record.headers
                )
                future.add_both(self._done)
                futures.append(future)
        except KafkaTimeoutError as exc:
            self._failed_at = time.monotonic()
            raise Unavailable("broker_unavailable", "Kafka metadata unavailable in time") from exc
        except KafkaError as exc:
            # send() itself only fails like this when the producer is unusable (closed, or
            # in a fatal idempotence state): replace it rather than fail every request.
            self._discard(producer, exc)
            raise Unavailable("broker_error", f"Kafka refused the records: {exc}") from exc
        finally:
            unsent = n - len(futures)
            if unsent:
                with self._pending_lock:
                    self._pending -= unsent
        for future in futures:
            try:
                future.get(timeout=max(0.0, deadline - time.monotonic()))
            except KafkaTimeoutError as exc:
                raise Unavailable(
                    "broker_unavailable",
                    f"Kafka did not acknowledge within {self.settings.ingest_ack_timeout_ms} ms",
                ) from exc
            except KafkaError as exc:
                raise Unavailable("broker_error", f"Kafka rejected a record: {exc}") from exc

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


def _close_at_exit(instance: EventProducer) -> None:
    # gunicorn's worker drains its connections on SIGTERM and then leaves
    # through sys.exit, so atexit runs after the last request has answered.
    if _instance_pid == os.getpid():
        instance.close()
