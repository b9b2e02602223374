"""`openg2p-audit topics`: what the Job audit-topics (and dev up) creates, against the real broker.

Every setting the command uses comes from the environment, so the Job needs nothing but
the ConfigMap: topic names, the events topic's partitions, and how each topic is
replicated (KAFKA_REPLICATION_FACTOR, KAFKA_MIN_INSYNC_REPLICAS).
"""

from __future__ import annotations

import pytest
from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType
from kafka.errors import InvalidReplicationFactorError

from openg2p_audit import cli
from openg2p_audit.topics import ensure_topics


def _topic_config(settings, topic: str) -> dict[str, dict]:
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    try:
        result = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    finally:
        admin.close()
    return next(iter(next(iter(result.values())).values()))


def test_the_command_creates_every_topic_from_the_environment(settings, monkeypatch, capsys):
    for key, value in {
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "KAFKA_EVENTS_TOPIC": settings.kafka_events_topic,
        "KAFKA_DLQ_TOPIC": settings.kafka_dlq_topic,
        "KAFKA_DIGESTS_TOPIC": settings.kafka_digests_topic,
        "KAFKA_TOPIC_PARTITIONS": "3",
        "KAFKA_REPLICATION_FACTOR": "1",
        "KAFKA_MIN_INSYNC_REPLICAS": "1",
    }.items():
        monkeypatch.setenv(key, value)
    assert cli.main(["topics"]) == 0
    out = capsys.readouterr().out
    assert f"{settings.kafka_events_topic}: 3 partitions (created)" in out
    assert f"{settings.kafka_dlq_topic}: 1 partitions (created)" in out
    assert cli.main(["topics"]) == 0  # idempotent: every deploy runs it again
    assert f"{settings.kafka_events_topic}: 3 partitions (exists)" in capsys.readouterr().out
    for topic in (settings.kafka_events_topic, settings.kafka_dlq_topic):
        config = _topic_config(settings, topic)["min.insync.replicas"]
        # Set on the topic itself, not inherited from the broker's default.
        assert config["value"] == "1" and config["config_source"] == "DYNAMIC_TOPIC_CONFIG", config


def test_the_replication_factor_reaches_the_broker(settings):
    """A one-broker cluster cannot hold two copies: the broker refuses, and says why."""
    wanted = settings.model_copy(
        update={
            "kafka_events_topic": settings.kafka_events_topic + ".rf",
            "kafka_replication_factor": 2,
            "kafka_min_insync_replicas": 2,
        }
    )
    with pytest.raises(InvalidReplicationFactorError):
        ensure_topics(wanted)
