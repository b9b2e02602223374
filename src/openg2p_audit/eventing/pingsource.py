"""PingSource: a cron schedule that POSTs `dev.knative.sources.ping` events to its sink.

The schedule is evaluated in the manifest's `timezone` (croniter); `fire()`
sends one event right now, for developers and tests that cannot wait an
hour for partition upkeep. Each tick is sent as knative/eventing's mtping adapter
sends it: retried a few times within seconds, with a token of the PingSource's own
OIDC identity when its sink names an audience.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from croniter import croniter

from .binding import Event
from .delivery import Egress, Outcome, is_retryable_by_the_sdk
from .manifests import Delivery, ManifestError, PingSource

log = logging.getLogger(__name__)

PING_TYPE = "dev.knative.sources.ping"
# The ping adapter's own retries (knative/eventing pkg/adapter/mtping/runner.go:
# ContextWithRetriesExponentialBackoff(ctx, 50ms, 5)): 5 more attempts, waiting
# 50 ms x 2^n before the n-th, about 3 s in all; then the tick is given up.
PING_DELIVERY = Delivery(retry=5, backoff_policy="exponential", backoff_delay=0.05)


def ping_event(source: PingSource, now: datetime | None = None) -> Event:
    now = now or datetime.now(UTC)
    attrs = {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": f"/apis/v1/namespaces/{source.namespace}/pingsources/{source.name}",
        "type": PING_TYPE,
        "time": now.astimezone(UTC).isoformat().replace("+00:00", "Z"),
    }
    if source.data is not None and source.content_type:
        attrs["datacontenttype"] = source.content_type
    attrs.update(source.ce_overrides)
    return Event(attrs, source.data)


class PingScheduler:
    """Fires `source` on its schedule until stopped."""

    def __init__(
        self, source: PingSource, destination: str, token: Callable[[], str] | None = None
    ):
        self.source = source
        try:
            self.zone = ZoneInfo(source.timezone)
        except (KeyError, ValueError) as exc:
            raise ManifestError(f"{source.key}: unknown timezone {source.timezone!r}") from exc
        if not croniter.is_valid(source.schedule):
            raise ManifestError(f"{source.key}: invalid schedule {source.schedule!r}")
        # Retried as the ping adapter retries, by the CloudEvents SDK's rule; no dead-letter
        # sink (a PingSource has none), so a tick that still fails is dropped, and the next
        # tick is the next chance. `token`: the PingSource's OIDC identity, when its sink
        # names an audience.
        self.egress = Egress(
            name=source.key, destination=destination, delivery=PING_DELIVERY,
            namespace=source.namespace, on_dead_letter_failure="commit", token=token,
            retryable=is_retryable_by_the_sdk,
        )  # fmt: skip
        self.fired: list[Outcome] = []
        self._thread: threading.Thread | None = None

    def next_fire(self, after: datetime | None = None) -> datetime:
        base = (after or datetime.now(UTC)).astimezone(self.zone)
        return croniter(self.source.schedule, base).get_next(datetime)

    def fire(self) -> Outcome:
        outcome = self.egress.deliver_now(ping_event(self.source))
        self.fired.append(outcome)
        del self.fired[:-100]
        return outcome

    def start(self) -> PingScheduler:
        self._thread = threading.Thread(
            target=self._run, name=f"ping-{self.source.name}", daemon=True
        )
        self._thread.start()
        log.info("%s: next ping at %s", self.source.key, self.next_fire().isoformat())
        return self

    def _run(self) -> None:
        stopping = self.egress.stopping
        while not stopping.is_set():
            due = self.next_fire()
            if stopping.wait(max((due - datetime.now(UTC)).total_seconds(), 0)):
                return
            self.fire()

    def stop(self) -> None:
        self.egress.stopping.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
