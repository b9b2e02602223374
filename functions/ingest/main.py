"""Knative Service `audit-ingest`: CloudEvents over HTTP → Kafka.

functions-framework target: `ingest` (signature type: http).
"""

from openg2p_audit.ingest import ingest

__all__ = ["ingest"]
