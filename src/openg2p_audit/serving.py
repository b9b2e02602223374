"""How every function is served: the bound on request headers that nothing else sets.

functions-framework's ASGI mode runs gunicorn with `uvicorn_worker.UvicornWorker`, which
parses HTTP with httptools (llhttp). llhttp sets no limit on a request's header section
(Node.js bounds it itself), gunicorn's `limit_request_*` settings bind only gunicorn's own
parsers, and uvicorn hands the app nothing before the whole header section has arrived:
an 8 MB header would be read into memory before the app could even answer 401.

So the worker's HTTP protocol is replaced, when a function module is imported (in
gunicorn's master, before it forks its workers), by `BoundedHttpToolsProtocol`: it counts
each request's header bytes as they arrive and, once `HTTP_MAX_HEADER_BYTES` is passed,
answers 431 with a JSON body and closes the connection without reading further, before
any token is checked.
"""

from __future__ import annotations

import json

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from .settings import Settings

_END = b"\r\n\r\n"


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a bound on each request's header section."""

    max_header_bytes = 64 * 1024

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._awaiting_headers = True
        self._header_bytes = 0
        self._tail = b""  # the last bytes seen, so an end of headers split across reads is found

    def on_headers_complete(self) -> None:
        self._awaiting_headers = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._awaiting_headers = True
        self._header_bytes = 0
        self._tail = b""

    def data_received(self, data: bytes) -> None:
        if self._awaiting_headers:
            seen = self._tail + data
            end = seen.find(_END)
            counted = len(data) if end < 0 else max(0, end + len(_END) - len(self._tail))
            self._header_bytes += counted
            self._tail = seen[-(len(_END) - 1) :]
            if self._header_bytes > self.max_header_bytes:
                self._refuse()
                return
        super().data_received(data)

    def _refuse(self) -> None:
        limit = self.max_header_bytes
        body = json.dumps({
            "error": "request header fields too large",
            "problems": [{
                "reason": "too_large", "field": "headers",
                "message": f"the request's headers are over {limit} bytes; at most {limit} "
                "allowed (send large attributes in data, or in structured mode)",
            }],
        }).encode()  # fmt: skip
        self.logger.warning("refused a request: headers over %d bytes", limit)
        self.transport.write(
            b"".join([
                STATUS_LINE[431],
                b"content-type: application/json\r\n",
                b"content-length: " + str(len(body)).encode() + b"\r\n",
                b"connection: close\r\n\r\n",
                body,
            ])
        )  # fmt: skip
        self._awaiting_headers = False
        self.transport.close()


def bound_request_headers(settings: Settings) -> None:
    """Serve this process's functions with BoundedHttpToolsProtocol (see the module docstring).

    Called at import, in gunicorn's master: its workers are forked afterwards and build
    their uvicorn config from the class attribute changed here. Without the uvicorn worker
    (a function imported elsewhere) there is nothing to do.
    """
    BoundedHttpToolsProtocol.max_header_bytes = settings.http_max_header_bytes
    try:
        from uvicorn_worker import UvicornWorker
    except ImportError:  # pragma: no cover - uvicorn[standard] ships with functions-framework
        return
    UvicornWorker.CONFIG_KWARGS = {**UvicornWorker.CONFIG_KWARGS, "http": BoundedHttpToolsProtocol}
