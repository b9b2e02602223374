"""Knative Service `audit-maintenance`: hourly partition upkeep and dead-letter redrive,
fired by a PingSource.

functions-framework target: `maintain` (signature type: http, served with `--asgi`): it
reads the ping CloudEvent itself, and serves GET /metrics, /healthz and /readyz beside it.
"""

from openg2p_audit.maintenance import maintain, startup

startup()  # a bad token setting stops the server here, not at the first ping

__all__ = ["maintain"]
