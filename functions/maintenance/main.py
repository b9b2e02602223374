"""Knative Service `audit-maintenance`: hourly partition upkeep and dead-letter redrive,
fired by a PingSource.

functions-framework target: `maintain` (signature type: cloudevent). GET /metrics,
GET /healthz and GET /readyz are served beside it.
"""

from openg2p_audit.maintenance import add_routes, maintain

add_routes()

__all__ = ["maintain"]
