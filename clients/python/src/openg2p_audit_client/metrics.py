"""The client's numbers in Prometheus form, when `prometheus_client` is installed.

One collector on the default registry reports every live `AuditClient` of the
process, labelled by its outbox file (empty without one), read at scrape time:
the depth and oldest age come from the outbox itself, so they are true for
every process that shares the file. Without `prometheus_client`, the same
numbers are `AuditClient.metrics()`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

_registered = False
_lock = threading.Lock()

# name, kind, help, key in AuditClient.metrics()
FAMILIES = (
    ("openg2p_audit_client_outbox_events", "gauge",
     "Audit events in the outbox, waiting for ingest's 202", "outbox_events"),
    ("openg2p_audit_client_outbox_bytes", "gauge",
     "Bytes of the audit events in the outbox", "outbox_bytes"),
    ("openg2p_audit_client_outbox_oldest_age_seconds", "gauge",
     "How long the oldest audit event in the outbox has waited", "outbox_oldest_age_seconds"),
    ("openg2p_audit_client_outbox_rejected_events", "gauge",
     "Audit events in the outbox's rejected table", "outbox_rejected"),
    ("openg2p_audit_client_events_sent", "counter",
     "Audit events this process delivered (answered 202)", "sent"),
    ("openg2p_audit_client_events_rejected", "counter",
     "Audit events ingest refused for good (4xx)", "rejected"),
    ("openg2p_audit_client_failed_attempts", "counter",
     "Delivery attempts that got no 202 and no refusal (unreachable, timeout, 5xx, 401)",
     "failed_attempts"),
)  # fmt: skip


class ClientCollector:
    """A prometheus_client custom collector over the live clients."""

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from .client import live_clients

        families = {}
        for name, kind, doc, _ in FAMILIES:
            cls = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            families[name] = cls(name, doc, labels=["outbox"])
        # Clients sharing an outbox (or having none) share a label: their counters add up,
        # and the outbox's own numbers are the same for each of them.
        by_label: dict[str, dict[str, float]] = {}
        for client in live_clients():
            values = client.metrics()
            seen = by_label.setdefault(client.outbox_path or "", {})
            for name, kind, _, key in FAMILIES:
                if key in values:
                    add = kind == "counter"
                    seen[name] = seen.get(name, 0.0) + values[key] if add else values[key]
        for label, values in by_label.items():
            for name, value in values.items():
                families[name].add_metric([label], value)
        yield from families.values()

    def describe(self) -> Iterator[Any]:
        return iter(())


def register_default() -> bool:
    """Register the collector on prometheus_client's default registry once; False without it."""
    global _registered
    try:
        from prometheus_client import REGISTRY
    except ImportError:
        return False
    with _lock:
        if not _registered:
            REGISTRY.register(ClientCollector())
            _registered = True
    return True
