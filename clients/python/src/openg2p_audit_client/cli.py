"""`openg2p-audit-emit`: audit events as JSON lines on stdin, to ingest.

    openg2p-audit-emit --url URL (--token T | --token-file F |
                       --token-url U --client-id C [--client-secret S])
                       [--outbox PATH [--flush-only]] [--timeout SECONDS] < events.jsonl

Each line is one CloudEvent as a JSON object (`specversion`, `id`, `time` and
`datacontenttype` are filled in when missing). With `--outbox`, the events
are committed to the outbox first and then sent for up to `--timeout`
seconds; what is not yet acknowledged stays queued for a later run (`--flush-only`
sends what an outbox holds without reading stdin). Without an outbox, the
events are sent at once, retried until `--timeout`, and an event that could
not be delivered makes the exit status 1.

It prints `N accepted, M queued, K rejected` and exits 0 when nothing was
rejected (a line that is not a valid event counts as rejected), 1 otherwise,
2 for a usage error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any, TextIO

from ._version import __version__
from .client import AuditClient
from .delivery import Item
from .errors import AuditError, InvalidEvent, OutboxFull
from .tokens import ClientCredentials, TokenFile

SECRET_ENV = "OPENG2P_AUDIT_CLIENT_SECRET"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="openg2p-audit-emit",
        description="Send audit events (CloudEvents as JSON lines on stdin) to ingest.",
    )
    p.add_argument("--url", required=True, help="ingest's URL (or a Broker's, with --single)")
    auth = p.add_argument_group("token (one of)")
    auth.add_argument("--token", help="a bearer token")
    auth.add_argument("--token-file", help="a file holding the token, re-read when it changes")
    auth.add_argument("--token-url", help="OAuth2 token endpoint (Keycloak client credentials)")
    auth.add_argument("--client-id", help="with --token-url")
    auth.add_argument("--client-secret", help=f"with --token-url (or set {SECRET_ENV})")
    auth.add_argument("--scope", help="with --token-url: the scope to ask for")
    p.add_argument("--outbox", metavar="PATH", help="the SQLite outbox; created when missing")
    p.add_argument("--flush-only", action="store_true",
                   help="send what the outbox holds; read nothing from stdin")  # fmt: skip
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to keep sending (default 10)")  # fmt: skip
    p.add_argument("--single", action="store_true",
                   help="one event per request (a Knative Broker takes no batches)")  # fmt: skip
    p.add_argument("--max-batch-events", type=int, default=500,
                   help="events per request, at most ingest's INGEST_MAX_BATCH_EVENTS")  # fmt: skip
    p.add_argument("-v", "--verbose", action="store_true", help="log each attempt")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def _tokens(args: argparse.Namespace, p: argparse.ArgumentParser) -> Any:
    chosen = [n for n in ("token", "token_file", "token_url") if getattr(args, n)]
    if len(chosen) > 1:
        p.error("give one of --token, --token-file, --token-url")
    if args.token:
        return args.token
    if args.token_file:
        return TokenFile(args.token_file)
    if args.token_url:
        secret = args.client_secret or os.environ.get(SECRET_ENV)
        if not args.client_id or not secret:
            p.error(f"--token-url needs --client-id and --client-secret (or {SECRET_ENV})")
        return ClientCredentials(args.token_url, args.client_id, secret, scope=args.scope)
    return None


def _read(stdin: TextIO, client: AuditClient) -> tuple[list[Item], int]:
    items, invalid = [], 0
    for number, line in enumerate(stdin, 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            items.append(client.prepare(raw))
        except (ValueError, InvalidEvent) as exc:  # JSONDecodeError is a ValueError
            invalid += 1
            problems = exc.problems if isinstance(exc, InvalidEvent) else [f"not JSON: {exc}"]
            print(f"line {number}: rejected: {'; '.join(problems)}", file=sys.stderr)
    return items, invalid


def _send_directly(client: AuditClient, items: list[Item], deadline: float) -> int:
    """Send without an outbox, retrying what failed until the deadline; returns the unsent."""
    unsent = 0
    for chunk in client.chunks(items):
        attempt = 0
        while chunk:
            res = client.send(chunk)
            chunk = res.unsent
            if not chunk:
                break
            attempt += 1
            delay = res.failure.retry_after if res.failure and res.failure.retry_after else None
            delay = delay or min(client.backoff_max, client.backoff_initial * 2 ** (attempt - 1))
            if time.monotonic() + delay > deadline:
                print(f"{len(chunk)} event(s) not delivered: {res.failure}", file=sys.stderr)
                unsent += len(chunk)
                break
            time.sleep(delay)
    return unsent


def main(argv: list[str] | None = None, stdin: TextIO | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.flush_only and not args.outbox:
        p.error("--flush-only needs --outbox")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    deadline = time.monotonic() + args.timeout
    try:
        client = AuditClient(
            args.url, _tokens(args, p), args.outbox, batch=not args.single,
            max_batch_events=args.max_batch_events, prometheus=False,
        )  # fmt: skip
    except (OSError, ValueError, AuditError) as exc:
        print(f"openg2p-audit-emit: {exc}", file=sys.stderr)
        return 2
    invalid = unsent = 0
    try:
        items: list[Item] = []
        if not args.flush_only:
            items, invalid = _read(stdin or sys.stdin, client)
        if client.outbox is not None:
            try:
                for chunk in client.chunks(items):  # one transaction per request-sized group
                    client.outbox.put((i.id, i.body) for i in chunk)
            except OutboxFull as exc:
                print(f"openg2p-audit-emit: {exc}", file=sys.stderr)
                unsent = 1
            client.flush(max(0.0, deadline - time.monotonic()))
        else:
            unsent = _send_directly(client, items, deadline)
        queued = client.outbox.depth()[0] if client.outbox is not None else 0
    finally:
        client.close(timeout=0)
    print(f"{client.sent} accepted, {queued} queued, {client.rejected + invalid} rejected")
    return 0 if client.rejected + invalid == 0 and unsent == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
