"""Knative Service `audit-query`: investigators' reads, each one audited.

functions-framework target: `query` (signature type: http, served with `--asgi`).
"""

from openg2p_audit.query_service import query

__all__ = ["query"]
