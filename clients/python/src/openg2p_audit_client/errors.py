"""What can go wrong when emitting, as exceptions an emitter can tell apart.

`InvalidEvent` and `OutboxFull` are raised by `emit` before anything is kept or
sent. Without an outbox, `emit` also raises `EventRejected` (ingest refused the
event: sending it again will not help) and `DeliveryFailed` (ingest could not
be reached or answered 503: the event is not known to be stored, and may be
sent again with the same id).
"""

from __future__ import annotations

from typing import Any


class AuditError(Exception):
    """Base of every error this client raises."""


class InvalidEvent(AuditError, ValueError):
    """The event breaks the contract; `problems` names each thing wrong with it."""

    def __init__(self, problems: list[str], event_id: str | None = None):
        self.problems = list(problems)
        self.event_id = event_id
        super().__init__("invalid audit event: " + "; ".join(self.problems))


class OutboxFull(AuditError):
    """The outbox holds as much as it is allowed to; the event was not queued."""


class TokenError(AuditError):
    """No bearer token could be had (the token endpoint refused or could not be reached)."""

    def __init__(self, message: str, status: int | None = None, body: str | None = None):
        self.status = status
        self.body = body
        super().__init__(message)


class EventRejected(AuditError):
    """Ingest refused the event for good (a 4xx); `body` is its answer, `problems` its list."""

    def __init__(self, event_id: str, status: int, body: str, problems: list[dict[str, Any]]):
        self.event_id = event_id
        self.status = status
        self.body = body
        self.problems = problems
        detail = "; ".join(str(p.get("message", p)) for p in problems) or body[:500]
        super().__init__(f"ingest refused event {event_id} ({status}): {detail}")


class DeliveryFailed(AuditError):
    """Not acknowledged (unreachable, timed out, 5xx, or the credentials were refused).

    The event is not known to be stored: send it again with the same id.
    """

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None):
        self.status = status
        self.retry_after = retry_after
        super().__init__(message)
