"""Topic provisioning, in code so every environment gets the same topics.

The events topic's partition count bounds how many writers can consume in
parallel. It can grow, never shrink (shrinking would break key → partition
ordering), so provisioning only ever adds partitions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from kafka import KafkaAdminClient
from kafka.admin import NewPartitions, NewTopic
from kafka.errors import TopicAlreadyExistsError

from .settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TopicState:
    name: str
    partitions: int
    created: bool
    grown_from: int | None = None


def _partition_counts(admin: KafkaAdminClient, names: list[str]) -> dict[str, int]:
    existing = set(admin.list_topics())
    wanted = [n for n in names if n in existing]
    if not wanted:
        return {}
    return {t["name"]: len(t["partitions"]) for t in admin.describe_topics(wanted)}


# The digests topic (sealing.py) keeps every digest for good: compacted, keyed by sequence
# number (so a re-published digest replaces only itself), and no time or size limit.
DIGEST_TOPIC_CONFIG = {"cleanup.policy": "compact", "retention.ms": "-1", "retention.bytes": "-1"}


def ensure_topics(settings: Settings) -> list[TopicState]:
    """Create the events, both DLQ and the digests topics if missing; grow the events topic.

    The digests topic has one partition: the chain is one ordered sequence. New topics get
    KAFKA_REPLICATION_FACTOR copies and KAFKA_MIN_INSYNC_REPLICAS, so that a deployment's
    `openg2p-audit topics` (the Job audit-topics) needs nothing beyond the ConfigMap. A
    topic that exists keeps its replication: changing that is a reassignment, an operator's
    decision.
    """
    wanted = {
        settings.kafka_events_topic: settings.kafka_topic_partitions,
        settings.kafka_dlq_topic: 1,
        settings.kafka_broker_dlq_topic: 1,
        settings.kafka_digests_topic: 1,
    }
    replication_factor = settings.kafka_replication_factor
    durable = {"min.insync.replicas": str(settings.kafka_min_insync_replicas)}
    configs = {name: dict(durable) for name in wanted}
    configs[settings.kafka_digests_topic].update(DIGEST_TOPIC_CONFIG)
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers, request_timeout_ms=15000)
    try:
        current = _partition_counts(admin, list(wanted))
        states: list[TopicState] = []
        for name, partitions in wanted.items():
            have = current.get(name)
            if have is None:
                try:
                    admin.create_topics(
                        [NewTopic(name, partitions, replication_factor,
                                  topic_configs=configs.get(name, {}))]
                    )  # fmt: skip
                    log.info("created topic %s with %d partitions", name, partitions)
                except TopicAlreadyExistsError:  # another process won the race
                    pass
                states.append(TopicState(name, partitions, created=True))
            elif have < partitions:
                admin.create_partitions({name: NewPartitions(total_count=partitions)})
                log.info("grew topic %s from %d to %d partitions", name, have, partitions)
                states.append(TopicState(name, partitions, created=False, grown_from=have))
            else:
                states.append(TopicState(name, have, created=False))
        admin.wait_for_topics(list(wanted), timeout_ms=30000)
        return states
    finally:
        admin.close()
