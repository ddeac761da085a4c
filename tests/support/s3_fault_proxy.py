"""A fault-injecting HTTP proxy on 127.0.0.1 in front of an S3 endpoint (the moto server of the tests).

Point ``AWS_ENDPOINT_URL`` at :attr:`FaultProxy.url`; every request is forwarded to the upstream
endpoint unchanged (SigV4 signs the Host header, which moto does not check), except that a share
``fault_rate`` of them fails in one of three ways an object store at scale fails:

- ``slow_down``: answered ``503 SlowDown`` before forwarding (throttling; nothing happened);
- ``lost_reply``: forwarded (so a write lands), then answered ``500 InternalError``;
- ``dropped``: the request is read, then the connection is closed without an answer.

Faults are deterministic: whether the n-th request for a given method + path + query fails, and
how, is a hash of (seed, method, path, n), so concurrent clients cannot change which attempt of a
request fails. A request fails at most ``max_consecutive`` times in a row, so a client that
retries more often than that always gets through; ``fail_all=True`` fails every request instead
(with ``slow_down``), for the tests of what a dead endpoint does.
"""
from __future__ import annotations

import hashlib
import http.client
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, Optional, Tuple
from urllib.parse import urlparse

FAULT_KINDS = ("slow_down", "lost_reply", "dropped")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
SOCKET_TIMEOUT_S = 30.0  # an idle keep-alive connection or a stuck upstream ends the handler's loop
MAX_BODY_BYTES = 256 * 1024 * 1024

# As long as real S3 error replies (~250 bytes with the request ids): longer than a small object.
SLOW_DOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                  b"<Message>Please reduce your request rate.</Message><RequestId>4442587FB7D0A2F9</RequestId>"
                  b"<HostId>fault-proxy/" + b"x" * 76 + b"</HostId></Error>")
INTERNAL_ERROR_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
                       b"<Message>We encountered an internal error. Please try again.</Message>"
                       b"<RequestId>4442587FB7D0A2FA</RequestId><HostId>fault-proxy/" + b"x" * 76 + b"</HostId></Error>")


class FaultProxy:
    """``with FaultProxy(upstream, fault_rate=0.3, seed=0) as proxy: ...``; counts in ``proxy.counts``."""

    def __init__(self, upstream: str, fault_rate: float = 0.0, seed: int = 0, max_consecutive: int = 3):
        parsed = urlparse(upstream)
        self.upstream: Tuple[str, int] = (parsed.hostname, parsed.port or 80)
        self._lock = threading.Lock()
        self.seed = seed
        self.configure(fault_rate, max_consecutive)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-fault-proxy", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def configure(self, fault_rate: float, max_consecutive: int = 3, seed: Optional[int] = None,
                  die_at: Optional[str] = None) -> None:
        """New fault settings; counts and per-request history start again.

        ``die_at``: healthy until a request whose path contains this text arrives; that request
        and every later one then fail (``fail_all``), as an endpoint that goes down mid-run.
        """
        with self._lock:
            self.fault_rate, self.max_consecutive = fault_rate, max_consecutive
            self.seed = self.seed if seed is None else seed
            self.die_at, self.fail_all = die_at, False
            self.counts: Counter = Counter()  # "requests", "forwarded", and one per fault kind
            self._seen: Dict[Tuple[str, str], int] = {}
            self._streak: Dict[Tuple[str, str], int] = {}

    def faults(self) -> int:
        return sum(self.counts[kind] for kind in FAULT_KINDS)

    def decide(self, method: str, target: str) -> str:
        """``"forward"`` or the fault kind for this request (counts it)."""
        key = (method, target)
        with self._lock:
            self.counts["requests"] += 1
            if self.die_at is not None and self.die_at in target:
                self.fail_all = True
            if self.fail_all:
                self.counts["slow_down"] += 1
                return "slow_down"
            n = self._seen.get(key, 0)
            self._seen[key] = n + 1
            digest = hashlib.sha256(f"{self.seed}|{method}|{target}|{n}".encode()).digest()
            draw = int.from_bytes(digest[:8], "big") / 2 ** 64
            if draw < self.fault_rate and self._streak.get(key, 0) < self.max_consecutive:
                self._streak[key] = self._streak.get(key, 0) + 1
                kind = FAULT_KINDS[digest[8] % len(FAULT_KINDS)]
                self.counts[kind] += 1
                return kind
            self._streak[key] = 0
            self.counts["forwarded"] += 1
            return "forward"


def _handler_class(proxy: FaultProxy):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the AWS SDKs expect
        timeout = SOCKET_TIMEOUT_S

        def log_message(self, *args) -> None:  # quiet
            pass

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                return self._read_chunked()
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                raise ValueError(f"request body of {length} bytes")
            return self.rfile.read(length) if length else b""

        def _read_chunked(self) -> bytes:
            # Re-framed with a Content-Length for the upstream; aws-chunked content encoding, if
            # any, is inside the chunks and passes through untouched.
            parts, total = [], 0
            for _ in range(1_000_000):  # bounded: a body ends with its zero-length chunk
                size = int(self.rfile.readline(1024).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    for _ in range(1000):  # trailer lines, then the blank line
                        if self.rfile.readline(65537) in (b"\r\n", b"\n", b""):
                            break
                    return b"".join(parts)
                total += size
                if total > MAX_BODY_BYTES:
                    raise ValueError("chunked request body too large")
                parts.append(self.rfile.read(size))
                self.rfile.readline(1024)
            raise ValueError("chunked request body without an end")

        def _answer(self, status: int, body: bytes, headers=()) -> None:
            self.send_response_only(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _forward(self, body: bytes):
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=SOCKET_TIMEOUT_S)
            try:
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                        conn.putheader(name, value)
                conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body)
                response = conn.getresponse()
                data = response.read()
                headers = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP]
                return response.status, data, headers
            finally:
                conn.close()

        def _handle(self) -> None:
            try:
                body = self._read_body()
            except (ValueError, OSError):
                self.close_connection = True
                return
            action = proxy.decide(self.command, self.path)
            if action == "dropped":
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            if action == "slow_down":
                self._answer(503, SLOW_DOWN_BODY, [("Content-Type", "application/xml")])
                return
            try:
                status, data, headers = self._forward(body)
            except OSError:
                self.close_connection = True
                return
            if action == "lost_reply":
                self._answer(500, INTERNAL_ERROR_BODY, [("Content-Type", "application/xml")])
                return
            if self.command == "HEAD":  # the upstream's Content-Length is the object's; keep it
                self.send_response_only(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.end_headers()
                return
            self._answer(status, data, [(k, v) for k, v in headers if k.lower() != "content-length"])

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler
