"""Load with known ids, and the zero-loss accounting every fault case ends with.

The load behaves as OpenG2P emitters are told to: a 202 means stored for
good; a 503 or a refused connection means "not known to be stored", so the
same events are sent again, with the same ids, until they are acknowledged.
Every id therefore ends in one of three states: acknowledged, refused (4xx),
or given up (still unacknowledged when the load's deadline passed, which a
case treats as a failure).
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import urllib3

from eventing_support import headers_of, read_topic
from pipeline_support import audit_event, stored_ids

BATCH = {"Content-Type": "application/cloudevents-batch+json"}


@dataclass
class Load:
    """`total` events in batches of `batch`, paced at about `rate` events/s, from `threads`."""

    url: str
    total: int
    batch: int = 10
    rate: float = 500.0
    threads: int = 4
    give_up_after: float = 90.0
    prefix: str = field(default_factory=lambda: f"f-{uuid.uuid4().hex[:8]}")
    token: str | None = None  # the emitter's bearer token, where ingest requires one
    acked: set[str] = field(default_factory=set)
    refused: dict[str, int] = field(default_factory=dict)
    answers: Counter = field(default_factory=Counter)
    retried: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.ids = [f"{self.prefix}-{i:06d}" for i in range(self.total)]
        self._lock = threading.Lock()
        self._work: queue.Queue[list[str]] = queue.Queue()
        for i in range(0, self.total, self.batch):
            self._work.put(self.ids[i : i + self.batch])
        self._threads: list[threading.Thread] = []
        self._started = 0.0
        self._sent = 0

    def start(self) -> Load:
        self._started = time.monotonic()
        http = urllib3.PoolManager(maxsize=self.threads, retries=False)
        for _ in range(self.threads):
            t = threading.Thread(target=self._run, args=(http,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def wait(self) -> Load:
        for t in self._threads:
            t.join(self.give_up_after + 30)
        return self

    @property
    def given_up(self) -> set[str]:
        return set(self.ids) - self.acked - set(self.refused)

    def _pace(self, n: int) -> None:
        with self._lock:
            self._sent += n
            due = self._started + self._sent / self.rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def _run(self, http: urllib3.PoolManager) -> None:
        while True:
            try:
                ids = self._work.get_nowait()
            except queue.Empty:
                return
            self._pace(len(ids))
            body = json.dumps([audit_event(i) for i in ids])
            headers = dict(BATCH)
            if self.token is not None:
                headers["Authorization"] = f"Bearer {self.token}"
            while time.monotonic() - self._started < self.give_up_after:
                try:
                    reply = http.request(
                        "POST", self.url + "/", body=body, headers=headers, timeout=10.0
                    )
                    status: int | str = reply.status
                except urllib3.exceptions.HTTPError as exc:
                    status = type(exc).__name__
                with self._lock:
                    self.answers[status] += 1
                    if status == 202:
                        self.acked.update(ids)
                        break
                    if isinstance(status, int) and 400 <= status < 500:
                        self.refused.update(dict.fromkeys(ids, status))
                        break
                    self.retried.update(ids)
                time.sleep(0.2)


def dlq_records(settings, ids: set[str], timeout: float = 5.0) -> dict[str, list[dict]]:
    """Headers of the DLQ records carrying one of `ids`, by id."""
    out: dict[str, list[dict]] = {}
    for record in read_topic(settings.bootstrap_servers, settings.kafka_dlq_topic, 10**9, timeout):
        h = headers_of(record)
        # A record the KafkaSource could not read as a CloudEvent was delivered wrapped
        # (dev.knative.kafka.event); its own headers ride along as kafkaheader* extensions.
        event_id = h.get("ce_id") if h.get("ce_id") in ids else h.get("ce_kafkaheaderceid")
        if event_id in ids:
            out.setdefault(event_id, []).append(h)
    return out


def wait_for_rows(settings, ids: set[str], timeout: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        rows = stored_ids(settings, sorted(ids))
        if set(rows) >= ids or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def account(settings, load: Load, case: str, report, timeout: float = 90.0) -> dict[str, int]:
    """Zero loss: every acknowledged id stored exactly once, nothing refused stored anywhere."""
    load.wait()
    rows = wait_for_rows(settings, load.acked, timeout)
    every = set(load.ids)
    stored = stored_ids(settings, sorted(every))
    dead = dlq_records(settings, every)
    counts = {
        "sent": len(every),
        "acknowledged": len(load.acked),
        "refused": len(load.refused),
        "retried_after_503": len(load.retried),
        "stored": len(stored),
        "dlq": len(dead),
    }
    report(
        f"{case}: "
        + ", ".join(f"{k}={v}" for k, v in counts.items())
        + f"; answers {dict(load.answers)}"
    )
    assert not load.given_up, f"{len(load.given_up)} ids never acknowledged"
    missing = load.acked - set(rows)
    assert not missing, f"{len(missing)} acknowledged ids lost, e.g. {sorted(missing)[:3]}"
    duplicated = {k: v for k, v in stored.items() if v != 1}
    assert not duplicated, f"ids stored more than once: {duplicated}"
    leaked = set(load.refused) & (set(stored) | set(dead))
    assert not leaked, f"refused ids found downstream: {sorted(leaked)[:3]}"
    return counts
