"""Broker and Trigger, the Knative Kafka Broker way: a topic in, one consumer group per Trigger.

The Broker's ingress accepts binary or structured CloudEvents and answers
202 once the event is in the broker topic (`knative-broker-<ns>-<name>`),
so a caller's 202 means the event is durable, as with the Kafka Broker
class. Each Trigger consumes that topic in its own group
(`knative-trigger-<ns>-<name>`), keeps the events its filter matches and
delivers them in binary mode (or structured: `delivery.format: json`) with
the Trigger's delivery settings, falling back to the Broker's.

Filters: `filter.attributes` (exact match; an empty value only requires the
attribute to exist) and the `filters` dialects exact, prefix, suffix, all,
any and not. `filters` wins when both are set, as in Knative. CE-SQL is not
emulated: a Trigger using it is reported and not started.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .binding import Event, from_kafka
from .delivery import Egress
from .dispatcher import KafkaDispatcher
from .kafkasource import with_kafka_metadata
from .manifests import Broker, Delivery, ManifestError, Trigger

Filter = Callable[[Event], bool]


def broker_topic(broker: Broker) -> str:
    return f"knative-broker-{broker.namespace}-{broker.name}"


def trigger_group(trigger: Trigger) -> str:
    return f"knative-trigger-{trigger.namespace}-{trigger.name}"


def _attr_map(node: Any, dialect: str) -> dict[str, str]:
    if not isinstance(node, dict) or not node:
        raise ManifestError(f"filters.{dialect}: expected a non-empty map of attribute: value")
    return {str(k): str(v) for k, v in node.items()}


def compile_filter(spec: dict[str, Any]) -> Filter:
    """One entry of `spec.filters` as a predicate; raises ManifestError for CE-SQL or junk."""
    if len(spec) != 1:
        raise ManifestError(f"a filter must have exactly one dialect, got {sorted(spec)}")
    dialect, node = next(iter(spec.items()))
    if dialect in ("exact", "prefix", "suffix"):
        wanted = _attr_map(node, dialect)

        def test(event: Event) -> bool:
            for name, value in wanted.items():
                have = event.get(name)
                if have is None:
                    return False
                if dialect == "exact" and have != value:
                    return False
                if dialect == "prefix" and not have.startswith(value):
                    return False
                if dialect == "suffix" and not have.endswith(value):
                    return False
            return True

        return test
    if dialect in ("all", "any"):
        subs = [compile_filter(s) for s in node or []]
        if dialect == "all":
            return lambda event: all(f(event) for f in subs)
        return lambda event: any(f(event) for f in subs)
    if dialect == "not":
        inner = compile_filter(node or {})
        return lambda event: not inner(event)
    if dialect == "cesql":
        raise ManifestError("CE-SQL filters (filters[].cesql) are not emulated by the local runner")
    raise ManifestError(f"unknown filter dialect {dialect!r}")


def trigger_filter(trigger: Trigger) -> Filter | None:
    if trigger.filters:
        subs = [compile_filter(f) for f in trigger.filters]
        return lambda event: all(f(event) for f in subs)
    if trigger.filter_attributes:
        wanted = dict(trigger.filter_attributes)

        def exact(event: Event) -> bool:
            for name, value in wanted.items():
                have = event.get(name)
                if have is None or (value != "" and have != value):
                    return False
            return True

        return exact
    return None


def trigger_dispatcher(
    trigger: Trigger,
    broker: Broker,
    *,
    bootstrap_servers: list[str],
    destination: str,
    dead_letter: str | None,
    on_dead_letter_failure: str = "retry",
    commit_interval: float = 5.0,
) -> KafkaDispatcher:
    delivery = trigger.delivery or broker.delivery or Delivery()
    egress = Egress(
        name=trigger.key,
        destination=destination,
        delivery=delivery,
        namespace=trigger.namespace,
        dead_letter=dead_letter,
        on_dead_letter_failure=on_dead_letter_failure,
    )
    return KafkaDispatcher(
        name=trigger.key,
        bootstrap_servers=bootstrap_servers,
        group=trigger_group(trigger),
        topics=[broker_topic(broker)],
        egress=egress,
        mapper=lambda record: with_kafka_metadata(
            from_kafka(record.headers or [], record.value), record
        ),
        ordered=trigger.ordering == "ordered",
        initial_offset="latest",
        event_filter=trigger_filter(trigger),
        commit_interval=commit_interval,
    )
