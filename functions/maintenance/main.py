"""Knative Service `audit-maintenance`: hourly partition upkeep, fired by a PingSource.

functions-framework target: `maintain` (signature type: cloudevent).
"""

from openg2p_audit.maintenance import maintain

__all__ = ["maintain"]
