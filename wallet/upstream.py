"""JSON-RPC to the node (reads, broadcasts) and to the armory (accounts, signatures), over aiohttp.

Every failure becomes an `RpcFailure` the wallet can hand to its caller as a JSON-RPC error: the
upstream's own error unchanged, or one of the wallet's codes for "unreachable" and "not JSON-RPC".
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

# The wallet's own JSON-RPC error codes (the agent uses -32010..-32019; -32010 is its "locked").
LOCKED = -32010
NODE_UNAVAILABLE = -32020
CHAIN_MISMATCH = -32021
ARMORY_UNAVAILABLE = -32022
SIGNATURE_MISMATCH = -32023
INVALID_PARAMS = -32602
MAX_RESPONSE = 32 * 1024 * 1024


class RpcFailure(Exception):
    """One JSON-RPC error object, ready to be returned to the wallet's caller."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def as_error(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            err["data"] = self.data
        return err


@dataclass(frozen=True)
class Caller:
    """What the wallet passes on about its caller: the armory's rules see the Origin."""

    origin: str | None = None
    user_agent: str | None = None

    def headers(self) -> dict[str, str]:
        out = {}
        if self.origin is not None:
            out["Origin"] = self.origin
        if self.user_agent:
            out["User-Agent"] = self.user_agent
        return out


def failure_from(error: Any) -> RpcFailure:
    """An upstream error object -> RpcFailure (code, message and data kept)."""
    if not isinstance(error, dict):
        return RpcFailure(-32603, f"upstream error: {error!r}"[:300])
    code = error.get("code")
    code = code if isinstance(code, int) and not isinstance(code, bool) else -32603
    return RpcFailure(code, str(error.get("message", "error")), error.get("data"))


class JsonRpcClient:
    """One upstream (the node or the armory) reached over a shared aiohttp session."""

    def __init__(self, url: str, role: str, session: aiohttp.ClientSession, timeout: float,
                 unavailable_code: int) -> None:
        self.url = url
        self.role = role
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.unavailable_code = unavailable_code
        self._ids = itertools.count(1)

    def unavailable(self, why: str) -> RpcFailure:
        return RpcFailure(self.unavailable_code, f"{self.role} at {self.url} {why}")

    async def post(self, body: bytes, headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
        """POST bytes, return (status, bytes) unchanged; RpcFailure only when nothing came back."""
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        try:
            async with self.session.post(self.url, data=body, headers=hdrs, timeout=self.timeout) as resp:
                data = await resp.content.read(MAX_RESPONSE + 1)
                if len(data) > MAX_RESPONSE:
                    raise self.unavailable("answered more than 32 MiB")
                return resp.status, data
        except TimeoutError:
            raise self.unavailable(f"did not answer within {self.timeout.total:.0f} s") from None
        except aiohttp.ClientConnectorError as e:
            raise self.unavailable(f"is unreachable ({(e.os_error.strerror or str(e)).lower()})") from None
        except aiohttp.ClientError as e:
            raise self.unavailable(f"failed ({type(e).__name__}: {e})"[:300]) from None

    def _decode(self, data: bytes) -> Any:
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise self.unavailable("answered something that is not JSON-RPC") from None

    async def call(self, method: str, params: Sequence[Any], caller: Caller | None = None) -> Any:
        """The result of one call; its error (or the upstream's trouble) as RpcFailure."""
        msg_id = next(self._ids)
        body = json.dumps({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": list(params)})
        _status, data = await self.post(body.encode(), caller.headers() if caller else None)
        reply = self._decode(data)
        if isinstance(reply, dict) and "error" in reply and reply.get("id") in (msg_id, None):
            raise failure_from(reply["error"])  # id null: refused before the call was read (HTTP 4xx)
        if not isinstance(reply, dict) or reply.get("id") != msg_id or "result" not in reply:
            raise self.unavailable("answered something that is not JSON-RPC")
        return reply["result"]

    async def batch(self, calls: Sequence[tuple[str, Sequence[Any]]]) -> list[Any]:
        """One round trip for several calls: each entry is the result or an RpcFailure (not raised)."""
        first = next(self._ids)
        ids = list(range(first, first + len(calls)))
        self._ids = itertools.count(first + len(calls))
        body = [{"jsonrpc": "2.0", "id": i, "method": m, "params": list(p)} for i, (m, p) in zip(ids, calls,
                                                                                                   strict=True)]
        _status, data = await self.post(json.dumps(body).encode())
        replies = self._decode(data)
        if not isinstance(replies, list) or not all(isinstance(r, dict) for r in replies):
            if isinstance(replies, dict) and "error" in replies:  # a node without batch support
                raise failure_from(replies["error"])
            raise self.unavailable("answered something that is not JSON-RPC")
        by_id = {r.get("id"): r for r in replies}
        out: list[Any] = []
        for i in ids:
            reply = by_id.get(i)
            if reply is None or not ("result" in reply or "error" in reply):
                raise self.unavailable("answered something that is not JSON-RPC")
            out.append(failure_from(reply["error"]) if "error" in reply else reply["result"])
        return out


class ArmoryClient(JsonRpcClient):
    """The armory's agent: its "locked" becomes the one thing to do about it."""

    async def call(self, method: str, params: Sequence[Any], caller: Caller | None = None) -> Any:
        try:
            return await super().call(method, params, caller)
        except RpcFailure as e:
            if e.code == LOCKED:
                raise RpcFailure(LOCKED, f"locked: run ./do unlock (the armory at {self.url} says: "
                                         f"{e.message})") from None
            raise
