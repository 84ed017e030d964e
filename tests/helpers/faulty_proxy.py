"""An HTTP proxy on 127.0.0.1 that fails a fixed share of S3 requests.

Every ``every``-th request gets, in turn, HTTP 503 SlowDown, HTTP 500
InternalError, or a connection reset with no response at all; keys
containing ``forbidden`` always get 403 AccessDenied, and requests that
``refuse(method, path)`` answers with (status, code, message) get that S3
error. The rest go to the real S3 endpoint behind it unchanged.
"""

from __future__ import annotations

import http.client
import itertools
import socket
import struct
import threading
from collections import Counter
from typing import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("slowdown", "internal", "reset")
_XML = '<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{msg}</Message></Error>'


class FaultyProxy:
    def __init__(self, upstream: str, every: int = 5,
                 refuse: Callable[[str, str], tuple[int, str, str] | None] | None = None):
        self.upstream = urlsplit(upstream)
        self.every = every
        self.refuse = refuse
        self.counter = itertools.count(1)
        self.lock = threading.Lock()
        self.faults: Counter[tuple[str, str]] = Counter()  # (kind, method)
        self.forwarded = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy.lock:
                    n = next(proxy.counter)
                if "forbidden" in self.path:
                    return self._error(403, "AccessDenied", "Access Denied")
                refusal = proxy.refuse(self.command, self.path) if proxy.refuse else None
                if refusal:
                    return self._error(*refusal)
                if n % proxy.every == 0:
                    kind = FAULTS[(n // proxy.every) % len(FAULTS)]
                    with proxy.lock:
                        proxy.faults[(kind, self.command)] += 1
                    if kind == "reset":  # RST, no response
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        self.close_connection = True
                        return
                    if kind == "slowdown":
                        return self._error(503, "SlowDown", "Please reduce your request rate.")
                    return self._error(500, "InternalError", "We encountered an internal error.")
                self._forward(body)

            def _error(self, status: int, code: str, msg: str) -> None:
                payload = _XML.format(code=code, msg=msg).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            def _forward(self, body: bytes) -> None:
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "expect")}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                payload = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "transfer-encoding", "content-length", "server", "date"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
                conn.close()
                with proxy.lock:
                    proxy.forwarded += 1

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def __enter__(self) -> "FaultyProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
