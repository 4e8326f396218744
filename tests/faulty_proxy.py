"""An HTTP proxy on loopback in front of an S3 server (moto's) that answers a share of the requests for image keys
with 503 SlowDown or 500 InternalError, as S3 does under load. The AWS SDK inside pyarrow sees real HTTP errors, so
its own retries are in the loop too. Which request fails is decided by a seeded hash of (method, key, the how-many-th
request for it), so a run is reproducible whatever the thread interleaving."""

from __future__ import annotations

import hashlib
import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ERRORS = ((503, "SlowDown", "Please reduce your request rate."), (500, "InternalError", "We encountered an internal "
                                                                                        "error. Please try again."))


class FaultyProxy:
    def __init__(self, upstream: str, rate: float, seed: int = 0, match: str = ".png") -> None:
        host, port = upstream.replace("http://", "").split(":")
        self.upstream, self.rate, self.seed, self.match = (host, int(port)), rate, seed, match
        self.counts: dict[tuple[str, str], int] = {}
        self.faults = self.passed = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                body = self._body()
                if self.match_fault():
                    status, code, message = ERRORS[proxy._n_faults() % 2]
                    payload = (b"" if self.command == "HEAD" else
                               f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}'
                               f"</Message></Error>".encode())
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if payload:
                        self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("connection", "transfer-encoding", "content-length")}
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(k, v)
                # A HEAD answer carries the object's length without a body.
                length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():  # the SDK streams uploads
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def match_fault(self) -> bool:
                key = self.path.split("?")[0]
                if proxy.match not in key:
                    return False
                with proxy.lock:
                    n = proxy.counts.get((self.command, key), 0)
                    proxy.counts[(self.command, key)] = n + 1
                digest = hashlib.sha256(f"{proxy.seed}/{self.command}/{key}/{n}".encode()).digest()
                fail = int.from_bytes(digest[:8], "big") / 2**64 < proxy.rate
                with proxy.lock:
                    if fail:
                        proxy.faults += 1
                    else:
                        proxy.passed += 1
                return fail

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _n_faults(self) -> int:
        with self.lock:
            return self.faults

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FaultyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
