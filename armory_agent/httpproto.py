"""A small, strict HTTP/1.1 request reader and response writer for the agent's front door.

Only what JSON-RPC clients need: request line + headers with a size cap, a Content-Length
body (no chunked uploads), keep-alive. Every limit and timeout is the caller's, so slow or
oversized clients are cut off with a clear status instead of holding memory or a task.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

MAX_HEAD = 16 * 1024
MAX_HEADERS = 64

_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_TARGET = re.compile(rb"^[\x21-\x7e]+$")

REASONS = {
    200: "OK",
    204: "No Content",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    411: "Length Required",
    413: "Payload Too Large",
    415: "Unsupported Media Type",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


class HttpError(Exception):
    """A request the front door refuses at the HTTP level; the connection is closed after it."""

    def __init__(self, status: int, message: str, code: int = -32600) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


class ClientGone(Exception):
    """The peer closed the connection (or sent nothing) before a request began."""


@dataclass
class Request:
    method: str
    target: str
    version: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    @property
    def keep_alive(self) -> bool:
        conn = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return conn == "keep-alive"
        return conn != "close"


class Connection:
    """A buffered reader over one client connection with deadline-based reads."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()

    async def _fill(self, deadline: float, what: str) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(what)
        async with asyncio.timeout(remaining):  # cheaper than wait_for (no extra task)
            chunk = await self.reader.read(65536)
        if not chunk:
            raise ConnectionResetError("peer closed")
        self.buf += chunk

    async def read_head(self, timeout: float) -> Request:
        """Read and parse a request head; ClientGone if nothing arrived, HttpError if bad."""
        deadline = time.monotonic() + timeout
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(self.buf) > MAX_HEAD:
                raise HttpError(431, "request head too large")
            started = bool(self.buf)
            try:
                await self._fill(deadline, "head")
            except TimeoutError:
                if started:
                    raise HttpError(408, "request head not received in time") from None
                raise ClientGone("idle") from None
            except ConnectionResetError:
                if started:
                    raise HttpError(400, "connection closed inside the request head") from None
                raise ClientGone("closed") from None
        if end > MAX_HEAD:
            raise HttpError(431, "request head too large")
        head = bytes(self.buf[:end])
        del self.buf[: end + 4]
        return parse_head(head)

    async def read_body(self, length: int, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while len(self.buf) < length:
            try:
                await self._fill(deadline, "body")
            except TimeoutError:
                raise HttpError(408, "request body not received in time") from None
            except ConnectionResetError:
                raise HttpError(400, "connection closed inside the request body") from None
        body = bytes(self.buf[:length])
        del self.buf[:length]
        return body

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def close(self, drain_bytes: int = 0, drain_timeout: float = 1.0) -> None:
        """Close; with drain_bytes, first read (and drop) what the client still sends so its
        OS does not turn our early answer into a reset."""
        try:
            if drain_bytes > 0 and self.writer.can_write_eof():
                self.writer.write_eof()
                deadline = time.monotonic() + drain_timeout
                received = 0
                while received < drain_bytes:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    chunk = await asyncio.wait_for(self.reader.read(65536), remaining)
                    if not chunk:
                        break
                    received += len(chunk)
        except (OSError, TimeoutError, ConnectionError):
            pass
        finally:
            self.writer.close()
            try:
                await asyncio.wait_for(self.writer.wait_closed(), 1)
            except (OSError, TimeoutError, ConnectionError):
                pass


def parse_head(head: bytes) -> Request:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or not _TARGET.match(parts[1]):
        raise HttpError(400, "malformed request line")
    version = parts[2].decode("latin-1")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpError(431, "too many request headers")
    headers: dict[str, str] = {}
    for raw in lines[1:]:
        name, sep, value = raw.partition(b":")
        if not sep or not _TOKEN.match(name):
            raise HttpError(400, "malformed request header")
        key = name.decode("latin-1").lower()
        text = value.strip(b" \t").decode("latin-1")
        if any(c in text for c in "\r\n\x00"):
            raise HttpError(400, "malformed request header")
        if key in headers:
            if key in ("host", "content-length", "content-type", "origin", "transfer-encoding"):
                raise HttpError(400, f"duplicate {key} header")
            headers[key] = headers[key] + ", " + text
        else:
            headers[key] = text
    if version == "HTTP/1.1" and "host" not in headers:
        raise HttpError(400, "missing Host header")
    return Request(
        method=parts[0].decode("latin-1"),
        target=parts[1].decode("latin-1"),
        version=version,
        headers=headers,
    )


def content_length(req: Request, limit: int) -> int:
    """The body length, checked: 411 without Content-Length, 413 above `limit`."""
    if "transfer-encoding" in req.headers:
        raise HttpError(411, "chunked request bodies are not accepted; send Content-Length")
    raw = req.headers.get("content-length")
    if raw is None:
        raise HttpError(411, "Content-Length required")
    if not raw.isdigit() or len(raw) > 12:
        raise HttpError(400, "malformed Content-Length")
    length = int(raw)
    if length > limit:
        raise HttpError(413, f"request body larger than {limit} bytes")
    return length


def error_body(code: int, message: str, msg_id: Any = None) -> bytes:
    body = {"jsonrpc": "2.0", "id": msg_id, "error": {"code": code, "message": message}}
    return json.dumps(body, separators=(",", ":")).encode()


def response(
    status: int, body: bytes, keep_alive: bool, extra: dict[str, str] | None = None
) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "X-Content-Type-Options: nosniff",
        f"Connection: {'keep-alive' if keep_alive else 'close'}",
    ]
    for k, v in (extra or {}).items():
        lines.append(f"{k}: {v}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
