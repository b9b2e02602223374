"""A dispatcher's group member gets its partitions, however soon after the topic it joins.

Against the real broker: the topic is created and subscribed to at once, many
times over, which is the race a fresh clone's test run and `dev up` hit (the
group leader found no partitions for the brand-new topic and, without a
metadata refresh, would have kept the empty assignment for five minutes).
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from kafka import KafkaAdminClient, KafkaProducer, TopicPartition
from kafka.admin import NewTopic

from openg2p_audit.eventing import dispatcher as dispatcher_module
from openg2p_audit.eventing.delivery import Egress, Outcome
from openg2p_audit.eventing.dispatcher import KafkaDispatcher
from openg2p_audit.eventing.kafkasink import ensure_topic
from openg2p_audit.eventing.manifests import Delivery

PARTITIONS = 3
ROUNDS = 15
# Well below kafka-python's metadata_max_age_ms (300 s): only a refresh by the
# dispatcher itself can assign the partitions within it.
ASSIGN_WITHIN = 20.0


def _dispatcher(boot: list[str], topic: str, initial_offset: str = "earliest") -> KafkaDispatcher:
    name = f"KafkaSource/race-{topic.rsplit('.', 1)[-1]}"
    egress = Egress(name=name, destination="http://127.0.0.1:9/", delivery=Delivery(),
                    namespace="test")  # fmt: skip
    return KafkaDispatcher(
        name=name, bootstrap_servers=boot, group=f"{topic}.group", topics=[topic],
        egress=egress, mapper=lambda record: record, ordered=False,
        initial_offset=initial_offset,
    )  # fmt: skip


def _expected(topic: str) -> set[TopicPartition]:
    return {TopicPartition(topic, p) for p in range(PARTITIONS)}


def test_member_joining_just_after_its_topic_was_created_is_assigned_at_once(settings):
    """The first assignment already holds every partition: never an empty one to recover from.

    Without waiting for the metadata, the leader assigned from a cache that did
    not know the new topic yet (kafka-python: "No partition metadata for topic")
    in nearly every round, and recovered only if the next refresh did better.
    """
    boot = settings.bootstrap_servers
    empty_first = []
    for round_ in range(ROUNDS):
        topic = f"{settings.kafka_events_topic}.race{round_}.{uuid.uuid4().hex[:6]}"
        ensure_topic(boot, topic, PARTITIONS)
        dispatcher = _dispatcher(boot, topic).start()
        try:
            assigned = dispatcher.wait_assigned(ASSIGN_WITHIN)
        finally:
            dispatcher.stop()
        assert assigned == _expected(topic), f"round {round_}: {assigned}"
        if not dispatcher.stats.assignments[0]:
            empty_first.append(round_)
    assert empty_first == [], f"rounds that first joined with no partitions: {empty_first}"


def test_member_subscribing_as_the_topic_is_created_gets_every_partition(settings):
    boot = settings.bootstrap_servers
    admin = KafkaAdminClient(bootstrap_servers=boot, request_timeout_ms=15000)
    try:
        for round_ in range(ROUNDS):
            topic = f"{settings.kafka_events_topic}.race{round_}.{uuid.uuid4().hex[:6]}"
            create = NewTopic(topic, PARTITIONS, 1)
            if round_ % 2 == 0:
                admin.create_topics([create])  # and no wait for the topic to settle
                dispatcher = _dispatcher(boot, topic).start()
            else:
                dispatcher = _dispatcher(boot, topic).start()
                time.sleep(0.05 * round_)
                admin.create_topics([create])
            try:
                assigned = dispatcher.wait_assigned(ASSIGN_WITHIN)
            finally:
                dispatcher.stop()
            assert assigned == _expected(topic), f"round {round_}: {assigned}"
    finally:
        admin.close()


def test_member_that_joined_before_its_topic_existed_gets_partitions_once_it_does(
    settings, monkeypatch
):
    # Join without waiting for the topic, so only the refresh after joining can help.
    monkeypatch.setattr(dispatcher_module, "METADATA_WAIT", 0.5, raising=False)
    boot = settings.bootstrap_servers
    topic = f"{settings.kafka_events_topic}.late.{uuid.uuid4().hex[:6]}"
    dispatcher = _dispatcher(boot, topic).start()
    time.sleep(3)  # it has given up waiting and joined with nothing to consume
    assert dispatcher.running and not dispatcher._assigned
    admin = KafkaAdminClient(bootstrap_servers=boot, request_timeout_ms=15000)
    try:
        admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
        assert dispatcher.wait_assigned(ASSIGN_WITHIN + 10) == _expected(topic)
    finally:
        dispatcher.stop()
        admin.close()


def test_a_latest_member_commits_every_partitions_start_before_it_joins(settings):
    """initialOffset latest: the group's start is committed for every partition up front.

    Otherwise a group left without offsets would skip to the end again at each
    later assignment (a rebalance), past events sent after the source was ready.
    """
    boot = settings.bootstrap_servers
    admin = KafkaAdminClient(bootstrap_servers=boot, request_timeout_ms=15000)
    try:
        for round_ in range(5):
            topic = f"{settings.kafka_events_topic}.latest{round_}.{uuid.uuid4().hex[:6]}"
            admin.create_topics([NewTopic(topic, PARTITIONS, 1)])  # no wait for it to settle
            dispatcher = _dispatcher(boot, topic, initial_offset="latest").start()
            try:
                offsets = admin.list_group_offsets(dispatcher.group)[dispatcher.group]
            finally:
                dispatcher.stop()
            assert {tp: meta.offset for tp, meta in offsets.items()} == dict.fromkeys(
                _expected(topic), 0
            ), f"round {round_}"
    finally:
        admin.close()


def test_the_first_assignment_is_not_followed_by_a_rebalance(settings):
    """A member that joined with complete metadata keeps its assignment.

    With the metadata fetched before subscribing, kafka-python's snapshot of
    the subscribed topics stayed empty, so the next metadata refresh made the
    member rejoin at once; that rebalance revoked partitions whose records were
    already fetched, and `dev up` could leave an event undelivered.
    """
    boot = settings.bootstrap_servers
    for round_ in range(3):
        topic = f"{settings.kafka_events_topic}.steady{round_}.{uuid.uuid4().hex[:6]}"
        ensure_topic(boot, topic, PARTITIONS)
        dispatcher = _dispatcher(boot, topic).start()
        try:
            dispatcher.wait_assigned(ASSIGN_WITHIN)
            time.sleep(3)  # the rebalance came within a second of the first assignment
            assignments = list(dispatcher.stats.assignments)
        finally:
            dispatcher.stop()
        assert assignments == [_expected(topic)], f"round {round_}: {assignments}"


class _SlowSubscriber(Egress):
    """Answers 2xx after a pause and remembers the order of what it got."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.got: list[bytes] = []

    async def deliver(self, session, event):
        await asyncio.sleep(0.02)
        self.got.append(event)
        return Outcome(str(event), delivered=True)


@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
def test_records_fetched_before_a_rebalance_that_gives_the_partition_back_are_delivered(
    settings, ordered
):
    """A rebalance revokes everything; when the member gets the same partition back,
    kafka-python keeps its fetch position, so the records it had fetched but not yet
    delivered must be fetched again from the committed offset, not skipped."""
    boot = settings.bootstrap_servers
    topic = f"{settings.kafka_events_topic}.giveback.{uuid.uuid4().hex[:6]}"
    ensure_topic(boot, topic, 1)
    sent = [f"r{i:03d}".encode() for i in range(60)]
    producer = KafkaProducer(bootstrap_servers=boot)
    for value in sent:
        producer.send(topic, value, partition=0)
    producer.flush()
    producer.close()

    egress = _SlowSubscriber(name="giveback", destination="http://127.0.0.1:9/",
                             delivery=Delivery(), namespace="test")  # fmt: skip
    dispatcher = KafkaDispatcher(
        name=f"KafkaSource/giveback-{ordered}", bootstrap_servers=boot, group=f"{topic}.g",
        topics=[topic], egress=egress, mapper=lambda record: record.value, ordered=ordered,
        max_poll_records=10, commit_interval=0.5,
    ).start()  # fmt: skip
    try:
        dispatcher.wait_assigned(ASSIGN_WITHIN)
        deadline = time.monotonic() + 20
        while len(egress.got) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        # What any member joining or leaving the group does to this one.
        dispatcher._control.put(lambda: dispatcher._consumer._coordinator.request_rejoin())
        deadline = time.monotonic() + 30
        while set(egress.got) != set(sent) and time.monotonic() < deadline:
            time.sleep(0.1)
        dispatcher.commit_now()
        assert len(dispatcher.stats.assignments) >= 2, dispatcher.stats.assignments
    finally:
        dispatcher.stop()
    assert sorted(set(sent) - set(egress.got)) == []
    admin = KafkaAdminClient(bootstrap_servers=boot)
    try:
        committed = admin.list_group_offsets(f"{topic}.g")[f"{topic}.g"]
    finally:
        admin.close()
    assert committed[TopicPartition(topic, 0)].offset == len(sent)
    if ordered:  # redelivery goes back, never forward past a record not yet delivered
        firsts = [egress.got.index(v) for v in sent]
        assert firsts == sorted(firsts)


class _HoldingSubscriber(Egress):
    """Answers the first delivery at once and holds every later one until released,
    counting how many it holds at the most (all on the dispatcher's one event loop)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.first_answered = False
        self.released = False
        self.holding = 0
        self.peak = 0
        self.delivered = 0

    async def deliver(self, session, event):
        if self.first_answered:
            self.holding += 1
            self.peak = max(self.peak, self.holding)
            while not self.released:
                await asyncio.sleep(0.01)
            self.holding -= 1
        self.first_answered = True
        self.delivered += 1
        return Outcome(str(event), delivered=True)


def test_unordered_consumer_polls_a_whole_batch_whenever_fewer_than_max_poll_records_are_out(
    settings,
):
    """Knative's UnorderedConsumerVerticle polls again as soon as fewer than max.poll.records
    deliveries are in flight, and a poll returns up to max.poll.records more: with the
    default 50, up to 99 are in flight per consumer. The runner stopped at 50 before."""
    boot = settings.bootstrap_servers
    topic = f"{settings.kafka_events_topic}.inflight.{uuid.uuid4().hex[:6]}"
    ensure_topic(boot, topic, 1)
    producer = KafkaProducer(bootstrap_servers=boot)
    for i in range(100):
        producer.send(topic, f"r{i:03d}".encode(), partition=0)
    producer.flush()
    producer.close()
    per_poll = 10
    egress = _HoldingSubscriber(name="inflight", destination="http://127.0.0.1:9/",
                                delivery=Delivery(), namespace="test")  # fmt: skip
    dispatcher = KafkaDispatcher(
        name="KafkaSource/inflight", bootstrap_servers=boot, group=f"{topic}.g", topics=[topic],
        egress=egress, mapper=lambda record: record.value, ordered=False,
        max_poll_records=per_poll, commit_interval=0.5,
    ).start()  # fmt: skip
    try:
        dispatcher.wait_assigned(ASSIGN_WITHIN)
        deadline = time.monotonic() + 20
        while egress.peak < 2 * per_poll - 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # nothing more may arrive while all of them are held
        peak = egress.peak
        egress.released = True
        deadline = time.monotonic() + 30
        while egress.delivered < 100 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        egress.released = True
        dispatcher.stop()
    # One answered, then a whole poll on top of the 9 still out: more than max.poll.records,
    # never 2 x max.poll.records.
    assert per_poll < peak <= 2 * per_poll - 1, peak
    assert egress.delivered == 100
