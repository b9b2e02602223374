"""The real services the rest of the suite relies on: broker, topics, database."""

import time
import uuid

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition

from openg2p_audit.topics import ensure_topics


def test_topics_are_provisioned_and_only_grow(settings):
    first = {t.name: t for t in ensure_topics(settings)}
    assert first[settings.kafka_events_topic].partitions == 3
    assert first[settings.kafka_events_topic].created
    assert first[settings.kafka_dlq_topic].created

    again = {t.name: t for t in ensure_topics(settings)}
    assert not again[settings.kafka_events_topic].created

    grown = settings.model_copy(update={"kafka_topic_partitions": 5})
    state = {t.name: t for t in ensure_topics(grown)}[settings.kafka_events_topic]
    assert (state.partitions, state.grown_from) == (5, 3)

    shrunk = settings.model_copy(update={"kafka_topic_partitions": 2})
    state = {t.name: t for t in ensure_topics(shrunk)}[settings.kafka_events_topic]
    assert state.partitions == 5 and state.grown_from is None

    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    try:
        described = admin.describe_topics([settings.kafka_events_topic])
        assert len(described[0]["partitions"]) == 5
    finally:
        admin.close()


def test_produce_and_consume_through_a_group_with_committed_offsets(topics):
    topic = topics.kafka_events_topic
    producer = KafkaProducer(
        bootstrap_servers=topics.bootstrap_servers, acks="all", enable_idempotence=True
    )
    sent = {}
    for i in range(20):
        key = f"entity-{i % 4}".encode()
        meta = producer.send(topic, value=f"event-{i}".encode(), key=key).get(timeout=15)
        sent[f"event-{i}"] = meta
    producer.close()

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=topics.bootstrap_servers,
        group_id=topics.kafka_consumer_group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    seen = {}
    deadline = time.monotonic() + 30
    while len(seen) < len(sent) and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500).values():
            for r in records:
                seen[r.value.decode()] = (r.partition, r.offset, r.key)
    consumer.commit()
    assignment = consumer.assignment()
    committed = {tp: consumer.committed(tp) for tp in assignment}
    consumer.close()

    assert set(seen) == set(sent)
    for value, meta in sent.items():
        assert seen[value][:2] == (meta.partition, meta.offset)
    # the same key always lands on the same partition: per-entity order
    by_key = {}
    for partition, _, key in seen.values():
        by_key.setdefault(key, set()).add(partition)
    assert all(len(p) == 1 for p in by_key.values())
    # committed offsets are the next offset to read, per partition
    ends = {}
    for meta in sent.values():
        ends[meta.partition] = max(ends.get(meta.partition, -1), meta.offset + 1)
    assert {tp.partition: off for tp, off in committed.items() if off} == ends

    # a new member of the same group resumes after the committed offsets: nothing new to read
    again = KafkaConsumer(
        bootstrap_servers=topics.bootstrap_servers,
        group_id=topics.kafka_consumer_group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    again.assign([TopicPartition(topic, p) for p in range(3)])
    assert again.poll(timeout_ms=1500) == {}
    again.close()


def test_write_and_read_postgres(pg):
    pg.run("CREATE TABLE probe (id uuid PRIMARY KEY, body jsonb NOT NULL)")
    ident = uuid.uuid4()
    pg.run("INSERT INTO probe VALUES (:id, CAST(:b AS jsonb))", id=ident, b='{"k": [1, 2]}')
    rows = pg.run("SELECT id, body FROM probe")
    assert rows == [[ident, {"k": [1, 2]}]]
    version = pg.run("SHOW server_version_num")[0][0]
    assert int(version) >= 150000


def test_modules_are_isolated(settings, base_settings):
    assert settings.kafka_events_topic != base_settings.kafka_events_topic
    assert settings.pg_connect_kwargs["database"].startswith("t_test_services_")
