"""KafkaSource emulation against the real broker, with a scripted stand-in subscriber.

Each source reads its own topic; the stand-in records every HTTP request it
gets and answers with the status codes a test scripts for an event id.
"""

from __future__ import annotations

import base64
import itertools
import time
import uuid

import pytest
from kafka import KafkaConsumer, TopicPartition

from attestation_support import record as encode
from eventing_support import (
    Recorder,
    committed,
    config_map,
    headers_of,
    kafka_sink,
    kafka_source,
    produce,
    read_topic,
    service,
    wait_committed,
    write_manifests,
)
from openg2p_audit.contract import AuditEvent
from openg2p_audit.eventing.kafkasink import ensure_topic
from openg2p_audit.eventing.runner import Runner

BACKOFF = 0.05  # PT0.05S


@pytest.fixture(scope="module")
def recorder(tmp_path_factory):
    return Recorder(tmp_path_factory.mktemp("recorder"))


@pytest.fixture(scope="module")
def runner(topics, recorder, tmp_path_factory):
    settings = topics
    boot = settings.bootstrap_servers
    unordered_topic = settings.kafka_events_topic + ".u"
    stuck_topic = settings.kafka_events_topic + ".stuck"
    for t in (unordered_topic, stuck_topic):
        ensure_topic(boot, t, 1)
    stuck = kafka_source("stuck", settings, topics=[stuck_topic], retry=1, dls=None)
    stuck["spec"]["delivery"]["deadLetterSink"] = {"uri": "http://127.0.0.1:9/unreachable"}
    docs = [
        config_map(settings, recorder.file, recorder.plan_file),
        service("recorder"),
        kafka_sink("dlq", settings.kafka_dlq_topic),
        kafka_source("ordered", settings, ordering="ordered"),
        kafka_source("unordered", settings, ordering="unordered", topics=[unordered_topic]),
        stuck,
    ]
    directory = write_manifests(tmp_path_factory.mktemp("manifests"), docs)
    r = Runner(directory, settings, workdir=tmp_path_factory.mktemp("run"), commit_interval=0.2)
    r.start()
    r.wait_ready()
    yield r
    r.stop()


def _event(**overrides) -> AuditEvent:
    doc = {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": "/openg2p/registry",
        "type": "org.openg2p.audit.beneficiary.updated",
        "subject": "beneficiary/42",
        "time": "2026-04-01T12:00:00Z",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "data": {"actor": {"id": "u1"}, "action": "update", "outcome": "success"},
    }
    doc.update(overrides)
    return AuditEvent.model_validate(doc)


def _produce_event(settings, event: AuditEvent, partition: int = 0, topic: str | None = None):
    rec = encode(event)
    [offset] = produce(
        settings.bootstrap_servers,
        topic or settings.kafka_events_topic,
        [(rec.key, rec.value, rec.headers)],
        partition,
    )
    return rec, offset


def _dlq_record(settings, event_id: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for r in read_topic(settings.bootstrap_servers, settings.kafka_dlq_topic, 1, timeout=1):
            if headers_of(r).get("ce_id") == event_id:
                return r
        time.sleep(0.1)
    raise AssertionError(f"event {event_id} never reached the DLQ topic")


def test_binary_cloudevent_is_delivered_with_its_headers(runner, recorder, topics):
    event = _event(myext="kept")
    rec, _ = _produce_event(topics, event, partition=0)
    [got] = recorder.wait(lambda es: any(e["id"] == event.id for e in es), what="the event")
    got = recorder.for_id(event.id)[0]
    h = got["headers"]
    assert h["ce-specversion"] == "1.0"
    assert h["ce-source"] == "/openg2p/registry"
    assert h["ce-type"] == "org.openg2p.audit.beneficiary.updated"
    assert h["ce-subject"] == "beneficiary/42"
    assert h["ce-traceparent"] == event.traceparent
    assert h["ce-myext"] == "kept"
    assert h["content-type"] == "application/json"
    assert h["prefer"] == "reply" and h["kn-namespace"] == "default"
    assert Recorder.body(got) == rec.value  # the data bytes, untouched


def test_plain_record_is_wrapped_as_kafka_event(runner, recorder, topics):
    topic = topics.kafka_events_topic
    [offset] = produce(
        topics.bootstrap_servers,
        topic,
        [
            (
                b"benef-7",
                b"not a cloudevent{",
                [("Content-Type", b"Text/Plain"), ("X-Trace_Id", b"1")],
            )
        ],
        partition=1,
    )
    event_id = f"partition:1/offset:{offset}"
    recorder.wait(lambda es: any(e["id"] == event_id for e in es), what="the wrapped record")
    h = recorder.for_id(event_id)[0]["headers"]
    assert h["ce-type"] == "dev.knative.kafka.event"
    assert h["ce-subject"] == f"partition:1#{offset}"
    assert h["ce-source"] == f"/apis/v1/namespaces/default/kafkasources/ordered#{topic}"
    assert h["ce-key"] == "benef-7" and h["ce-partitionkey"] == "benef-7"
    assert h["ce-kafkaheaderxtraceid"] == "1"
    assert h["content-type"] == "text/plain"
    assert h["ce-time"].endswith("Z")
    assert Recorder.body(recorder.for_id(event_id)[0]) == b"not a cloudevent{"


def test_retryable_codes_are_retried_with_backoff(runner, recorder, topics):
    event = _event()
    recorder.plan({"ids": {event.id: [{"status": 408}, {"status": 409}, {"status": 202}]}})
    _produce_event(topics, event, partition=2)
    recorder.wait(lambda es: any(e["id"] == event.id and e["status"] == 202 for e in es))
    attempts = recorder.for_id(event.id)
    assert [a["status"] for a in attempts] == [408, 409, 202]
    # exponential: retry n waits backoffDelay * 2**n
    assert attempts[1]["t"] - attempts[0]["t"] >= BACKOFF * 2
    assert attempts[2]["t"] - attempts[1]["t"] >= BACKOFF * 4


def test_exhausted_retries_dead_letter_with_error_extensions(runner, recorder, topics):
    event = _event()
    recorder.plan(
        {"ids": {event.id: [{"status": 503}, {"status": 429}, {"status": 404, "body": "gone"}]}}
    )
    rec, _ = _produce_event(topics, event, partition=0)
    dead = _dlq_record(topics, event.id)
    assert [a["status"] for a in recorder.for_id(event.id)] == [503, 429, 404]  # retry: 2
    h = headers_of(dead)
    assert h["ce_knativeerrorcode"] == "404"
    assert h["ce_knativeerrordest"] == runner.service_url("recorder")
    assert base64.b64decode(h["ce_knativeerrordata"]) == b"gone"
    assert h["ce_testhint"] == "scripted"  # kne-* response headers become extensions
    assert h["ce_type"] == event.type and h["content-type"] == "application/json"
    assert dead.value == rec.value


def test_non_retryable_4xx_goes_straight_to_dead_letter(runner, recorder, topics):
    event = _event()
    recorder.plan({"ids": {event.id: [{"status": 400, "body": '{"error":"bad"}'}]}})
    _produce_event(topics, event, partition=1)
    dead = _dlq_record(topics, event.id)
    assert len(recorder.for_id(event.id)) == 1
    assert headers_of(dead)["ce_knativeerrorcode"] == "400"


def test_offsets_are_committed_after_2xx(runner, recorder, topics):
    source = runner.manifests.get("KafkaSource", "ordered")
    events = [_event() for _ in range(3)]
    offsets = [_produce_event(topics, e, partition=2)[1] for e in events]
    recorder.wait(lambda es: all(any(x["id"] == e.id for x in es) for e in events))
    wait_committed(
        topics.bootstrap_servers, source.consumer_group, topics.kafka_events_topic, 2,
        offsets[-1] + 1,
    )  # fmt: skip


def test_offset_not_committed_while_neither_delivered_nor_dead_lettered(runner, recorder, topics):
    source = runner.manifests.get("KafkaSource", "stuck")
    topic = source.topics[0]
    event = _event()
    recorder.plan({"ids": {event.id: [{"status": 500}]}})
    _, offset = _produce_event(topics, event, partition=0, topic=topic)
    recorder.wait(lambda es: len([e for e in es if e["id"] == event.id]) >= 4, what="retry rounds")
    # the dead-letter sink is unreachable: the record is retried, its offset held back
    assert committed(topics.bootstrap_servers, source.consumer_group).get((topic, 0), 0) <= offset
    recorder.plan({"ids": {event.id: [{"status": 201}]}})
    wait_committed(topics.bootstrap_servers, source.consumer_group, topic, 0, offset + 1, 30)


def test_ordered_delivers_a_partition_one_at_a_time(runner, recorder, topics):
    events = [_event() for _ in range(4)]
    recorder.plan({"delay": {events[0].id: 0.6, events[1].id: 0.2}})
    for e in events:
        _produce_event(topics, e, partition=1)
    ids = [e.id for e in events]
    entries = recorder.wait(lambda es: all(any(x["id"] == i for x in es) for i in ids))
    got = [next(x for x in entries if x["id"] == i) for i in ids]
    assert [x["id"] for x in sorted(got, key=lambda x: x["t"])] == ids
    for prev, nxt in itertools.pairwise(got):
        assert nxt["t"] >= prev["t"] + prev["delay"]  # started only after the previous answered


def test_unordered_delivers_concurrently_and_commits_contiguously(runner, recorder, topics):
    source = runner.manifests.get("KafkaSource", "unordered")
    topic = source.topics[0]
    slow, *fast = [_event() for _ in range(4)]
    recorder.plan({"delay": {slow.id: 3.0}})
    offsets = [_produce_event(topics, e, partition=0, topic=topic)[1] for e in [slow, *fast]]
    entries = recorder.wait(lambda es: all(any(x["id"] == e.id for x in es) for e in fast))
    first = next(x for x in entries if x["id"] == slow.id)
    fast_seen = [next(x for x in entries if x["id"] == e.id) for e in fast]
    assert all(x["t"] < first["t"] + first["delay"] for x in fast_seen)  # overtook the slow one
    time.sleep(0.6)  # several commit intervals
    if time.time() < first["t"] + first["delay"]:  # the slow one has not answered yet
        have = committed(topics.bootstrap_servers, source.consumer_group).get((topic, 0), 0)
        assert have <= offsets[0], "committed past a record that is still in flight"
    wait_committed(topics.bootstrap_servers, source.consumer_group, topic, 0, offsets[-1] + 1)


def test_redeliver_a_range_without_moving_the_group(runner, recorder, topics):
    source = runner.manifests.get("KafkaSource", "ordered")
    event = _event()
    _, offset = _produce_event(topics, event, partition=0)
    recorder.wait(lambda es: any(e["id"] == event.id for e in es))
    wait_committed(topics.bootstrap_servers, source.consumer_group, topics.kafka_events_topic, 0,
                   offset + 1)  # fmt: skip
    before = committed(topics.bootstrap_servers, source.consumer_group)
    outcomes = runner.redeliver("ordered", 0, offset, offset + 1)
    assert [o.event_id for o in outcomes] == [event.id] and outcomes[0].delivered
    assert [e["attempt"] for e in recorder.for_id(event.id)] == [1, 2]
    assert committed(topics.bootstrap_servers, source.consumer_group) == before


def test_a_crashed_dispatcher_redelivers_what_it_had_not_committed(runner, recorder, topics):
    source = runner.manifests.get("KafkaSource", "ordered")
    event = _event()
    recorder.plan({"delay": {event.id: 1.5}})
    _, offset = _produce_event(topics, event, partition=2)
    recorder.wait(lambda es: any(e["id"] == event.id for e in es), what="the first attempt")
    runner.stop_source("ordered", commit=False)  # dies while the subscriber is still working
    assert not runner.sources["ordered"].running
    recorder.plan({})
    runner.start_source("ordered").wait_assigned()
    recorder.wait(lambda es: len([e for e in es if e["id"] == event.id]) >= 2, what="redelivery")
    wait_committed(topics.bootstrap_servers, source.consumer_group, topics.kafka_events_topic, 2,
                   offset + 1)  # fmt: skip


def test_every_record_of_a_burst_over_all_partitions_is_delivered(runner, recorder, topics):
    """A burst fills several partitions' fetches at once; none may stall (regression)."""
    source = runner.manifests.get("KafkaSource", "ordered")
    topic = topics.kafka_events_topic
    records = [(f"k{i}".encode(), b"burst", None) for i in range(150)]
    producer_offsets = produce(topics.bootstrap_servers, topic, records, partition=None)
    assert len(producer_offsets) == 150
    consumer = KafkaConsumer(bootstrap_servers=topics.bootstrap_servers)
    try:
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        ends = consumer.end_offsets(tps)
    finally:
        consumer.close()
    for tp, end in ends.items():
        wait_committed(topics.bootstrap_servers, source.consumer_group, topic, tp.partition,
                       end, 60)  # fmt: skip
