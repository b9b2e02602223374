"""Knative Service `audit-writer`: KafkaSource deliveries → PostgreSQL.

functions-framework target: `write` (signature type: http).
"""

from openg2p_audit.writer import write

__all__ = ["write"]
