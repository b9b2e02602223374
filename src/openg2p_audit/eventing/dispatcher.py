"""A Kafka consumer-group member that hands records to an Egress, as the Knative dispatcher does.

Used for KafkaSources and for Triggers (a Kafka-backed Broker is a topic plus
one consumer group per Trigger). What it keeps from knative-extensions/
eventing-kafka-broker (`OrderedConsumerVerticle`, `UnorderedConsumerVerticle`,
`OffsetManager`):

- ordered: records of one partition are delivered one after the other, the
  next only once the previous one is settled; partitions run in parallel;
- unordered: records are delivered concurrently; the member polls again, for
  up to `max_poll_records` more, whenever fewer than `max_poll_records` are in
  flight, so up to 2 x max_poll_records - 1 are (Knative's
  `UnorderedConsumerVerticle.poll()` with `max.poll.records`, 50 in
  config-kafka-source-data-plane: up to 99);
- an offset becomes committable only once its record is settled (2xx, or in
  the dead-letter sink); the committed offset only ever moves over a
  contiguous run of settled records, so a slow or stuck record holds back
  the commit of everything after it, however the records completed;
- commits happen every `commit_interval` seconds, when partitions are
  revoked and when the dispatcher stops (Knative: every 5 s by default).

kafka-python's consumer is not thread-safe: one thread owns it and polls;
deliveries are coroutines on an event loop of their own, sharing one keep-alive
HTTP session (as Knative's Vert.x dispatcher shares its WebClient), and report
back through a queue. Backpressure
is applied by polling no more than the backlog allows, not with
pause()/resume(): kafka-python 3.0.12 can leave a resumed partition's parked
fetch unreturned forever, which silently stalls the partition. While the
backlog is full the thread still polls for one record now and then, so the
group membership stays alive however slow the subscriber is.

A member must never sit in its group with no partitions while its topics have
some. The group leader assigns from its own metadata; a member that joins
right after its topic was created can find no partitions for it, and
kafka-python would look again only after `metadata_max_age_ms` (5 minutes).
So the member waits for its topics' metadata before it joins, and while its
assignment is empty it refreshes the metadata every second: once partitions
show up, the changed metadata makes it rejoin and the leader assigns them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from .binding import Event
from .delivery import Egress, Outcome

log = logging.getLogger(__name__)

KEEPALIVE_POLL = 30.0  # seconds: poll for one record even when the backlog is full
# A poll costs about 1.5 ms whatever it returns, so the backlog is refilled once a quarter of
# it is free, or once a few milliseconds passed with any room at all.
REFILL_FRACTION = 4
REFILL_WAIT = 0.005  # seconds
# config-kafka-source-data-plane's max.poll.records (eventing-kafka-broker
# data-plane/config/source/100-config-kafka-source-data-plane.yaml).
MAX_POLL_RECORDS = 50
METADATA_WAIT = 10.0  # seconds: longest wait for the topics' partitions before joining
UNASSIGNED_REFRESH = 1.0  # seconds between metadata refreshes while nothing is assigned

# A record's Event, or None to skip it (e.g. a Trigger filter did not match).
RecordMapper = Callable[[Any], Event]
EventFilter = Callable[[Event], bool]


class OffsetTracker:
    """Settled offsets of one partition; the committable offset is the first unsettled one."""

    def __init__(self, first_offset: int):
        self.committed = max(first_offset, 0)  # next offset to read after a restart
        self._settled: set[int] = set()

    def settle(self, offset: int) -> None:
        if offset >= self.committed:
            self._settled.add(offset)

    def to_commit(self) -> int:
        nxt = self.committed
        while nxt in self._settled:
            nxt += 1
        return nxt

    def mark_committed(self, offset: int) -> None:
        self._settled = {o for o in self._settled if o >= offset}
        self.committed = offset


@dataclass
class DispatcherStats:
    received: int = 0
    delivered: int = 0
    dead_lettered: int = 0
    dropped: int = 0
    filtered: int = 0
    commits: int = 0
    outcomes: list[Outcome] = field(default_factory=list)  # the last few, newest last
    assignments: list[set[TopicPartition]] = field(default_factory=list)  # the last few


def _describe(tps: set[TopicPartition]) -> str:
    by_topic: dict[str, list[int]] = {}
    for tp in tps:
        by_topic.setdefault(tp.topic, []).append(tp.partition)
    return ", ".join(f"{t} {sorted(p)}" for t, p in sorted(by_topic.items())) or "none"


class _Listener(AsyncConsumerRebalanceListener):
    """kafka-python 3 calls the listener on its IO thread while the consumer thread waits
    in poll(); a blocking consumer call there fails, so the commit on revoke is awaited."""

    def __init__(self, owner: KafkaDispatcher):
        self.owner = owner

    async def on_partitions_revoked(self, revoked):
        await self.owner._on_revoked(set(revoked), commit=True)

    async def on_partitions_lost(self, lost):
        await self.owner._on_revoked(set(lost), commit=False)  # no longer ours to commit

    async def on_partitions_assigned(self, assigned):
        self.owner._on_assigned(set(assigned))


class KafkaDispatcher:
    """Consume `topics` as `group`, map each record to an Event, deliver it through `egress`."""

    def __init__(
        self,
        *,
        name: str,
        bootstrap_servers: list[str],
        group: str,
        topics: list[str],
        egress: Egress,
        mapper: RecordMapper,
        ordered: bool,
        initial_offset: str = "earliest",
        event_filter: EventFilter | None = None,
        commit_interval: float = 5.0,
        max_poll_records: int = MAX_POLL_RECORDS,
        max_buffered: int = 500,
    ):
        self.name = name
        self.bootstrap_servers = bootstrap_servers
        self.group = group
        self.topics = topics
        self.egress = egress
        self.mapper = mapper
        self.ordered = ordered
        self.initial_offset = initial_offset
        self.event_filter = event_filter
        self.commit_interval = commit_interval
        self.max_poll_records = max_poll_records
        # Polling stops while this many records are fetched and not settled. Ordered: all
        # partitions' queues together. Unordered: max.poll.records, as Knative's consumer
        # polls only while fewer than that are in flight.
        self.max_backlog = max_buffered if ordered else max_poll_records
        self._refill = max(1, self.max_backlog // REFILL_FRACTION)
        self.stats = DispatcherStats()
        # Deliveries run as coroutines on one event loop thread, over one keep-alive session.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task] = set()
        self._done: queue.Queue[tuple[TopicPartition, int | None, Outcome | None]] = queue.Queue()
        self._control: queue.Queue[Callable[[], None]] = queue.Queue()
        self._trackers: dict[TopicPartition, OffsetTracker] = {}
        self._assigned: set[TopicPartition] = set()
        self._queues: dict[TopicPartition, deque[Any]] = {}  # ordered: per-partition backlog
        self._queues_lock = threading.Lock()
        self._last_poll = time.monotonic()
        self._revoked_gen: dict[TopicPartition, int] = {}
        self._resume_at: dict[TopicPartition, int] = {}  # the group's offset at the last revoke
        self._in_flight = 0
        self._consumer: KafkaConsumer | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self._last_commit = time.monotonic()
        self._last_refresh = time.monotonic()
        self._commit_on_stop = True

    # --- lifecycle -----------------------------------------------------------

    def start(self, timeout: float = 60.0) -> KafkaDispatcher:
        if self.initial_offset == "latest":
            self._init_offsets_to_latest()
        self._start_loop()
        self._thread = threading.Thread(target=self._run, name=f"consumer-{self.name}", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"{self.name}: consumer did not start within {timeout}s")
        if self._failed:
            raise RuntimeError(f"{self.name}: consumer failed to start: {self._failed}")
        return self

    def wait_assigned(self, timeout: float = 30.0) -> set[TopicPartition]:
        """Block until the group gave this member its partitions (tests, dev up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._assigned:
                return set(self._assigned)
            time.sleep(0.05)
        raise TimeoutError(f"{self.name}: no partitions assigned within {timeout}s")

    def stop(self, timeout: float = 30.0, commit: bool = True) -> None:
        """Stop polling, let in-flight deliveries settle (bounded), commit, leave the group.

        `commit=False` is a crash: nothing more is committed, so whatever was
        delivered since the last periodic commit is delivered again by the
        next member, as when a dispatcher pod dies.
        """
        self._commit_on_stop = commit
        self.egress.stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._stop_loop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _init_offsets_to_latest(self) -> None:
        """Knative commits the end offsets for a new group with initialOffset latest, so
        events sent after the source is Ready are never skipped however late the
        consumer joins. Same here, before the first poll."""
        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap_servers, request_timeout_ms=15000)
        consumer = KafkaConsumer(
            bootstrap_servers=self.bootstrap_servers, group_id=self.group, enable_auto_commit=False
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:  # the group coordinator may still be coming up on a fresh broker
                    have = admin.list_group_offsets(self.group).get(self.group)
                    break
                except KafkaError as exc:
                    if not exc.retriable or time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            if have:
                return
            # A topic created a moment ago can show no partitions yet; committing nothing would
            # leave the group without offsets, and each later assignment would then skip to the
            # end again, past events sent after the source was ready.
            missing = self._wait_for_partitions(consumer, deadline)
            if missing:
                log.warning("%s: no partitions known for %s; their start is left to the broker",
                            self.name, ", ".join(missing))  # fmt: skip
            tps = [
                TopicPartition(t, p)
                for t in self.topics
                for p in sorted(consumer.partitions_for_topic(t) or [])
            ]
            if tps:
                ends = consumer.end_offsets(tps)
                consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in ends.items()})
        finally:
            consumer.close(autocommit=False)
            admin.close()

    # --- the consumer thread -----------------------------------------------

    def _run(self) -> None:
        try:
            self._consumer = KafkaConsumer(
                bootstrap_servers=self.bootstrap_servers,
                group_id=self.group,
                client_id=f"openg2p-audit-runner-{self.name}",
                enable_auto_commit=False,
                auto_offset_reset=self.initial_offset,
                max_poll_records=max(self.max_backlog, self.max_poll_records),
                session_timeout_ms=10000,
                heartbeat_interval_ms=1000,
            )
        except Exception as exc:  # noqa: BLE001 - reported to start()
            self._failed = exc
            self._ready.set()
            return
        self._ready.set()
        consumer = self._consumer
        try:
            # Subscribed first, then the metadata: subscribe() does not join (the first
            # poll does), and kafka-python only takes the metadata of topics it is
            # subscribed to into the snapshot it assigns from. Fetched before subscribing,
            # the snapshot stayed empty and the first assignment was followed at once
            # by a rebalance, which revoked partitions with records already fetched.
            consumer.subscribe(self.topics, listener=_Listener(self))
            self._await_topic_metadata(consumer)
            while not self.egress.stopping.is_set():
                try:
                    self._run_control()
                    self._refresh_while_unassigned(consumer)
                    room = self.max_backlog - self._in_flight
                    since = time.monotonic() - self._last_poll
                    if (room >= self._refill or (room > 0 and since > REFILL_WAIT)
                            or since > KEEPALIVE_POLL):  # fmt: skip
                        self._last_poll = time.monotonic()
                        batch = consumer.poll(timeout_ms=100, max_records=self._poll_size(room))
                        for tp, records in batch.items():
                            self._dispatch(tp, records)
                        self._drain_done()
                    else:
                        self._drain_done(block=0.05)
                    if time.monotonic() - self._last_commit >= self.commit_interval:
                        self._commit()
                except KafkaError as exc:
                    # Broker gone or group rebalancing: what is settled stays tracked and
                    # is committed on a later round; nothing is skipped.
                    log.warning("%s: Kafka error, carrying on: %r", self.name, exc)
                    self.egress.stopping.wait(0.5)
        except Exception:
            log.exception("%s: consumer loop failed", self.name)
        finally:
            self._shutdown()

    def _poll_size(self, room: int) -> int:
        """How many records one poll may return. Unordered: a whole max.poll.records
        whenever fewer than that are in flight (Knative polls for that many as soon as
        in-flight drops below it). Ordered: only what fits the backlog. One when full: the
        keep-alive poll that keeps kafka-python's group membership (max.poll.interval.ms)."""
        if not self.ordered and room > 0:
            return self.max_poll_records
        return max(room, 1)

    def _missing_partitions(self, consumer: KafkaConsumer) -> list[str]:
        consumer.topics()  # always a fresh metadata request, unlike partitions_for_topic()
        return [t for t in self.topics if not consumer.partitions_for_topic(t)]

    def _wait_for_partitions(self, consumer: KafkaConsumer, deadline: float) -> list[str]:
        """Refresh the metadata until every topic has partitions, or the deadline or a stop
        comes; return the topics still without (a topic may only come later)."""
        while True:
            try:
                missing = self._missing_partitions(consumer)
            except KafkaError as exc:
                missing = [f"({exc!r})"]
            if not missing or time.monotonic() > deadline or self.egress.stopping.wait(0.1):
                return missing

    def _await_topic_metadata(self, consumer: KafkaConsumer) -> None:
        """Join only once every topic's partitions are known (bounded)."""
        missing = self._wait_for_partitions(consumer, time.monotonic() + METADATA_WAIT)
        if missing and not self.egress.stopping.is_set():
            log.warning("%s: no partitions known for %s yet; joining the group anyway",
                        self.name, ", ".join(missing))  # fmt: skip

    def _refresh_while_unassigned(self, consumer: KafkaConsumer) -> None:
        """With no partitions, fetch metadata again: new partitions make the member rejoin."""
        if self._assigned or time.monotonic() - self._last_refresh < UNASSIGNED_REFRESH:
            return
        self._last_refresh = time.monotonic()
        missing = self._missing_partitions(consumer)
        log.debug("%s: nothing assigned; metadata refreshed (no partitions for: %s)",
                  self.name, ", ".join(missing) or "-")  # fmt: skip

    def _shutdown(self) -> None:
        if self._commit_on_stop:
            deadline = time.monotonic() + 10
            while self._in_flight and time.monotonic() < deadline:
                self._drain_done(block=0.1)
            self._drain_done()
            with contextlib.suppress(Exception):
                self._commit()
        with contextlib.suppress(Exception):
            assert self._consumer is not None
            self._consumer.close(autocommit=False)

    def _run_control(self) -> None:
        while True:
            try:
                request = self._control.get_nowait()
            except queue.Empty:
                return
            request()

    def _dispatch(self, tp: TopicPartition, records: list[Any]) -> None:
        if tp not in self._assigned:
            return
        self._trackers.setdefault(tp, OffsetTracker(records[0].offset))
        self.stats.received += len(records)
        self._in_flight += len(records)
        assert self._loop is not None
        if not self.ordered:
            self._loop.call_soon_threadsafe(self._spawn_each, tp, records)
            return
        with self._queues_lock:
            backlog = self._queues.get(tp)
            start_worker = backlog is None
            if start_worker:
                backlog = self._queues[tp] = deque()
            backlog.extend(records)
        if start_worker:
            gen = self._revoked_gen.get(tp, 0)
            self._loop.call_soon_threadsafe(self._spawn, self._drain_partition(tp, gen))

    # --- the delivery loop ---------------------------------------------------

    def _start_loop(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(
            target=loop.run_forever, name=f"deliver-{self.name}", daemon=True
        )
        self._loop_thread.start()

        async def open_session() -> None:
            self._session = self.egress.new_session(
                2 * max(self.max_poll_records, self.max_backlog)
            )

        asyncio.run_coroutine_threadsafe(open_session(), loop).result(10)

    def _stop_loop(self) -> None:
        """Cancel what is still in flight (unsettled: redelivered), close the session."""
        loop, self._loop = self._loop, None
        if loop is None:
            return

        async def close() -> None:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self._session is not None:
                await self._session.close()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        if self._loop_thread is not None:
            self._loop_thread.join(10)
        loop.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: delivery task failed", self.name, exc_info=task.exception())

    def _spawn_each(self, tp: TopicPartition, records: list[Any]) -> None:
        """Unordered: every record of a poll in flight at once (the poll is already bounded)."""
        for record in records:
            self._spawn(self._deliver_one(tp, record))

    async def _drain_partition(self, tp: TopicPartition, gen: int) -> None:
        """Ordered: deliver one partition's backlog, one record at a time, until it is empty."""
        while True:
            with self._queues_lock:
                backlog = self._queues.get(tp)
                if not backlog or self._revoked_gen.get(tp, 0) != gen:
                    if backlog is not None and self._revoked_gen.get(tp, 0) == gen:
                        del self._queues[tp]
                    return
                record = backlog.popleft()
            if self.egress.stopping.is_set():
                self._done.put((tp, record.offset, None))
                continue
            self._done.put((tp, record.offset, await self._deliver(record)))

    async def _deliver_one(self, tp: TopicPartition, record: Any) -> None:
        self._done.put((tp, record.offset, await self._deliver(record)))

    async def _deliver(self, record: Any) -> Outcome:
        try:
            event = self.mapper(record)
        except Exception as exc:  # noqa: BLE001 - Knative discards records it cannot map
            log.error("%s: cannot build an event from %s-%s@%s: %s", self.name,
                      record.topic, record.partition, record.offset, exc)  # fmt: skip
            return Outcome(f"{record.topic}-{record.partition}@{record.offset}", dropped=True)
        if self.event_filter is not None and not self.event_filter(event):
            return Outcome(event.id, filtered=True)
        assert self._session is not None
        return await self.egress.deliver(self._session, event)

    def _drain_done(self, block: float | None = None) -> None:
        while True:
            try:
                tp, offset, outcome = (
                    self._done.get(timeout=block) if block else self._done.get_nowait()
                )
            except queue.Empty:
                return
            block = None
            self._in_flight -= 1
            if outcome is None:
                continue
            self._record(outcome)
            tracker = self._trackers.get(tp)
            if outcome.settled and tracker is not None:
                tracker.settle(offset)

    def _record(self, outcome: Outcome) -> None:
        s = self.stats
        s.delivered += outcome.delivered
        s.dead_lettered += outcome.dead_lettered
        s.dropped += outcome.dropped
        s.filtered += outcome.filtered
        s.outcomes.append(outcome)
        del s.outcomes[:-200]

    def _commit(self, only: set[TopicPartition] | None = None) -> None:
        self._last_commit = time.monotonic()
        offsets = {}
        for tp, tracker in self._trackers.items():
            if only is not None and tp not in only:
                continue
            nxt = tracker.to_commit()
            if nxt > tracker.committed:
                offsets[tp] = nxt
        if not offsets or self._consumer is None:
            return
        self._consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()})
        for tp, o in offsets.items():
            self._trackers[tp].mark_committed(o)
        self.stats.commits += 1
        log.debug("%s: committed %s", self.name, offsets)

    # Rebalance callbacks: run by kafka-python's IO thread while the consumer thread is in poll().

    async def _on_revoked(self, revoked: set[TopicPartition], commit: bool) -> None:
        self._drain_done()
        offsets = {}
        for tp in revoked:
            tracker = self._trackers.pop(tp, None)
            if tracker is None:
                continue
            self._resume_at[tp] = tracker.committed
            if commit and tracker.to_commit() > tracker.committed:
                offsets[tp] = tracker.to_commit()
            with self._queues_lock:
                self._revoked_gen[tp] = self._revoked_gen.get(tp, 0) + 1
                dropped = self._queues.pop(tp, None) or ()
            self._in_flight -= len(dropped)  # fetched again, by whoever owns the partition next
        if offsets and self._consumer is not None:
            try:
                await self._consumer.commit_async(
                    {tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()}
                )
            except Exception as exc:  # noqa: BLE001 - the next owner redelivers from the last commit
                log.warning("%s: commit on revoke failed: %s", self.name, exc)
            else:
                self._resume_at.update(offsets)
                self.stats.commits += 1
        self._assigned -= revoked
        if revoked:
            log.info("%s: partitions revoked: %s", self.name, _describe(revoked))

    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        """A partition given back keeps kafka-python's fetch position, which is past the
        records dropped on revoke: go back to the group's offset so none is skipped."""
        resume, self._resume_at = self._resume_at, {}
        for tp in assigned & resume.keys():
            self._consumer.seek(tp, resume[tp])
            self._trackers[tp] = OffsetTracker(resume[tp])
        self._assigned = set(assigned)
        self.stats.assignments.append(set(assigned))
        del self.stats.assignments[:-20]
        log.info("%s: partitions assigned: %s", self.name, _describe(assigned))

    # --- operator actions ------------------------------------------------------

    def _deliver_from_thread(self, record: Any) -> Outcome:
        loop = self._loop
        if loop is None or not loop.is_running():
            raise RuntimeError(f"{self.name}: not running")
        return asyncio.run_coroutine_threadsafe(self._deliver(record), loop).result()

    def rewind(self, topic: str, partition: int, offset: int, timeout: float = 10.0) -> None:
        """Move this member back to `offset` (as after a crash before commit); the records
        from there on are delivered again and the commit follows them."""
        done = threading.Event()

        def _seek() -> None:
            tp = TopicPartition(topic, partition)
            if tp in self._assigned:
                with self._queues_lock:
                    self._revoked_gen[tp] = self._revoked_gen.get(tp, 0) + 1
                    dropped = self._queues.pop(tp, None) or ()
                self._in_flight -= len(dropped)
                self._consumer.seek(tp, offset)
                self._trackers[tp] = OffsetTracker(offset)
            done.set()

        self._control.put(_seek)
        if not done.wait(timeout):
            raise TimeoutError(f"{self.name}: rewind not applied within {timeout}s")

    def commit_now(self, timeout: float = 10.0) -> None:
        done = threading.Event()
        self._control.put(lambda: (self._drain_done(), self._commit(), done.set()))
        if not done.wait(timeout):
            raise TimeoutError(f"{self.name}: commit not applied within {timeout}s")

    def redeliver(
        self, topic: str, partition: int, start: int, end: int | None = None
    ) -> list[Outcome]:
        """Deliver offsets [start, end) of one partition again, outside the group.

        The group's committed offsets do not move. `end` defaults to the
        partition's end at the time of the call. Returns one Outcome per record.
        """
        tp = TopicPartition(topic, partition)
        consumer = KafkaConsumer(
            bootstrap_servers=self.bootstrap_servers, group_id=None, enable_auto_commit=False
        )
        outcomes: list[Outcome] = []
        try:
            consumer.assign([tp])
            stop_at = end if end is not None else consumer.end_offsets([tp])[tp]
            consumer.seek(tp, start)
            deadline = time.monotonic() + 30
            while consumer.position(tp) < stop_at and time.monotonic() < deadline:
                for record in consumer.poll(timeout_ms=200).get(tp, []):
                    if record.offset >= stop_at:
                        break
                    outcomes.append(self._deliver_from_thread(record))
        finally:
            consumer.close(autocommit=False)
        return outcomes
