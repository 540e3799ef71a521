"""Forwards one JSON-RPC call to Clef's loopback HTTP over a small pool of kept-alive connections.

Only the client's `Origin` is passed on, and a `User-Agent` the agent sets itself (Clef's rules
see both in req.meta); nothing else from the client, so X-Forwarded-For and friends never reach Clef.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from typing import Any

MAX_RESPONSE = 8 * 1024 * 1024
# Clef (Go's net/http) closes idle connections after 120 s; reuse only well before that, so a
# request is almost never written into a connection Clef is closing.
IDLE_REUSE = 60.0


class UpstreamError(Exception):
    """Clef could not be reached or answered with something that is not JSON-RPC."""


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = time.monotonic()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class ClefClient:
    def __init__(self, host: str, port: int, pool_size: int = 8) -> None:
        self.host = host
        self.port = port
        self.pool_size = pool_size
        self._idle: list[_Conn] = []
        self._ids = itertools.count(1)

    def reset(self) -> None:
        """Drop kept-alive connections (Clef restarted)."""
        while self._idle:
            self._idle.pop().close()

    async def _connect(self) -> tuple[_Conn, bool]:
        """A connection and whether it was reused from the pool."""
        while self._idle:
            conn = self._idle.pop()
            fresh = time.monotonic() - conn.idle_since < IDLE_REUSE
            if fresh and not conn.reader.at_eof() and not conn.writer.is_closing():
                return conn, True
            conn.close()
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port, limit=MAX_RESPONSE)
        except OSError as e:
            raise UpstreamError(f"cannot reach Clef: {e.strerror or e}") from None
        return _Conn(reader, writer), False

    async def call(
        self, method: str, params: Any, origin: str | None, user_agent: str | None
    ) -> dict[str, Any]:
        """Clef's response object ({"result": ...} or {"error": {...}}), with Clef's own id."""
        payload: dict[str, Any] = {"jsonrpc": "2.0", "id": next(self._ids), "method": method}
        if params is not None:
            payload["params"] = params
        body = json.dumps(payload, separators=(",", ":")).encode()
        head = [
            "POST / HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
        ]
        if origin is not None:
            head.append(f"Origin: {origin}")
        if user_agent is not None:
            head.append(f"User-Agent: {user_agent}")
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        for attempt in (1, 2):
            conn, reused = await self._connect()
            try:
                conn.writer.write(data)
                await conn.writer.drain()
                status, keep, raw = await self._read_response(conn.reader)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
                conn.close()
                if attempt == 1 and reused:
                    continue  # a kept-alive connection Clef had already closed: retry once fresh
                raise UpstreamError(f"Clef connection failed: {e}") from None
            except BaseException:
                conn.close()  # cancelled or timed out mid-response: the connection is unusable
                raise
            if keep and len(self._idle) < self.pool_size:
                conn.idle_since = time.monotonic()
                self._idle.append(conn)
            else:
                conn.close()
            break
        try:
            obj = json.loads(raw)
        except ValueError:
            raise UpstreamError(f"Clef answered HTTP {status} without JSON") from None
        if not isinstance(obj, dict) or not ("result" in obj or "error" in obj):
            raise UpstreamError(f"Clef answered HTTP {status} without a JSON-RPC response")
        return obj

    async def _read_response(self, reader: asyncio.StreamReader) -> tuple[int, bool, bytes]:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise UpstreamError("malformed status line from Clef")
        status = int(parts[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        keep = headers.get("connection", "").lower() != "close"
        if "content-length" in headers:
            length = int(headers["content-length"])
            if length > MAX_RESPONSE:
                raise UpstreamError("response from Clef too large")
            return status, keep, await reader.readexactly(length)
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = bytearray()
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")  # no trailers from Go's server
                    break
                body += await reader.readexactly(size)
                await reader.readexactly(2)
                if len(body) > MAX_RESPONSE:
                    raise UpstreamError("response from Clef too large")
            return status, keep, bytes(body)
        return status, False, await reader.read(MAX_RESPONSE)
