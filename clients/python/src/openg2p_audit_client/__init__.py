"""openg2p-audit-client: emit OpenG2P audit events, with a durable outbox.

from openg2p_audit_client import AuditClient, ClientCredentials

tokens = ClientCredentials(TOKEN_URL, "openg2p-registry", SECRET)
with AuditClient(INGEST_URL, tokens, outbox_path="/var/lib/registry/audit.db") as audit:
    audit.emit("org.openg2p.registry.beneficiary.viewed", "/openg2p/registry",
               actor="officer-17", action="view", outcome="success",
               resource={"type": "beneficiary", "id": "BEN-000482"})
"""

from ._version import __version__
from .client import AuditClient
from .errors import (
    AuditError,
    DeliveryFailed,
    EventRejected,
    InvalidEvent,
    OutboxFull,
    TokenError,
)
from .outbox import Outbox, RejectedEvent
from .tokens import CallableToken, ClientCredentials, StaticToken, TokenFile

__all__ = [
    "AuditClient",
    "AuditError",
    "CallableToken",
    "ClientCredentials",
    "DeliveryFailed",
    "EventRejected",
    "InvalidEvent",
    "Outbox",
    "OutboxFull",
    "RejectedEvent",
    "StaticToken",
    "TokenError",
    "TokenFile",
    "__version__",
]
