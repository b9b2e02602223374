"""Knative Service `audit-writer`: KafkaSource deliveries → PostgreSQL.

functions-framework target: `write` (signature type: http).
"""

from openg2p_audit.writer import startup, write

startup()  # a bad token setting stops the server here, not at the first delivery

__all__ = ["write"]
