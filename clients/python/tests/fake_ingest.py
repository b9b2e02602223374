"""A stand-in for ingest over real HTTP on 127.0.0.1, for the client's unit tests.

It answers as ingest does (202 with the accepted ids) unless a test queued other
answers, and records every request. The real ingest, with tokens and its source
policy, is exercised by the repository's tests/test_client_stack.py.
"""

from __future__ import annotations

import json
import socket
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def events(self) -> list[dict[str, Any]]:
        doc = json.loads(self.body)
        return doc if isinstance(doc, list) else [doc]

    @property
    def ids(self) -> list[str]:
        return [e["id"] for e in self.events]


Answer = tuple[int, Any, dict[str, str]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeIngest:
    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.requests: list[Seen] = []
        self.answers: deque[Answer | Callable[[Seen], Answer]] = deque()
        self._server: ThreadingHTTPServer | None = None
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def accepted_ids(self) -> list[str]:
        return [i for r in self.requests if getattr(r, "status", 0) == 202 for i in r.ids]

    def answer(self, seen: Seen) -> Answer:
        with self.lock:
            scripted = self.answers.popleft() if self.answers else None
        if callable(scripted):
            return scripted(seen)
        if scripted is not None:
            return scripted
        return 202, {"accepted": seen.ids}, {}

    def start(self) -> FakeIngest:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                seen = Seen(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                status, doc, headers = fake.answer(seen)
                seen.status = status  # type: ignore[attr-defined]
                with fake.lock:
                    fake.requests.append(seen)
                out = json.dumps(doc).encode() if doc is not None else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(out)

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def event_args(n: int = 0, **over: Any) -> dict[str, Any]:
    """Keyword arguments of AuditClient.emit for one realistic event."""
    args: dict[str, Any] = {
        "type": "org.openg2p.registry.beneficiary.viewed",
        "source": "/openg2p/registry",
        "actor": "officer-17",
        "action": "view",
        "outcome": "success",
        "resource": {"type": "beneficiary", "id": f"BEN-{n:06d}"},
        "subject": f"beneficiary/BEN-{n:06d}",
    }
    args.update(over)
    return args
