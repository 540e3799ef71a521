"""The JSON-RPC front: validation, the method table, signing serialization, forwarding to Clef.

`METHODS` is the one place that says which method is handled how. A later translation layer
(eth_accounts, personal_sign, ...) adds entries whose handler calls `front.forward(...)` with
translated parameters; the policy allowlist (config policy.methods) still gates every name.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from armory_agent.clefclient import ClefClient, UpstreamError
from armory_agent.config import PolicyConfig

# JSON-RPC error codes: the standard ones, then the agent's own (-32010..-32019).
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
LOCKED = -32010
BUSY = -32011
CLEF_TIMEOUT = -32012
CLEF_UNAVAILABLE = -32013


class RpcError(Exception):
    """A JSON-RPC error for one call; `status` is the HTTP status when it is the only call."""

    def __init__(self, code: int, message: str, status: int = 200) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


@dataclass(frozen=True)
class CallContext:
    peer: str
    origin: str | None
    user_agent: str | None  # the agent's own (policy.clef_user_agent), never the client's


Handler = Callable[["Front", str, Any, CallContext], Awaitable[Any]]


@dataclass(frozen=True)
class Method:
    handler: Handler
    signing: bool  # runs scrypt inside Clef: one at a time
    denied_code: int = METHOD_NOT_FOUND  # code when policy.methods leaves it out (eth_*: EIP-1193 4100)


async def forward(front: Front, method: str, params: Any, ctx: CallContext) -> Any:
    """Pass the call to Clef unchanged (Clef's own method of the same name)."""
    return await front.forward(method, params, ctx)


METHODS: dict[str, Method] = {
    "account_list": Method(forward, signing=False),
    "account_version": Method(forward, signing=False),
    "account_ecRecover": Method(forward, signing=False),
    "account_signTransaction": Method(forward, signing=True),
    "account_signData": Method(forward, signing=True),
    "account_signTypedData": Method(forward, signing=True),
    "account_signGnosisSafeTx": Method(forward, signing=True),
    "account_new": Method(forward, signing=True),
}


class SigningGate:
    """At most one signing request inside Clef (scrypt takes 256 MiB); a bounded queue behind it."""

    def __init__(self, queue: int, wait: float) -> None:
        self.queue = queue
        self.wait = wait
        self.waiting = 0
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        if self._lock.locked() and self.waiting >= self.queue:
            raise RpcError(BUSY, "signer busy: too many signing requests waiting", 503)
        self.waiting += 1
        try:
            await asyncio.wait_for(self._lock.acquire(), self.wait)
        except TimeoutError:
            raise RpcError(BUSY, "signer busy: timed out waiting for a signing slot", 503) from None
        finally:
            self.waiting -= 1

    def release(self) -> None:
        self._lock.release()


class Front:
    """Validates a JSON-RPC body and answers it; knows nothing about HTTP framing."""

    def __init__(
        self,
        policy: PolicyConfig,
        clef: ClefClient,
        is_ready: Callable[[], bool],
        state: Callable[[], str],
        methods: dict[str, Method] | None = None,
    ) -> None:
        self.policy = policy
        self.clef = clef
        self.is_ready = is_ready
        self.state = state
        self.methods = METHODS if methods is None else methods
        self.allowed = frozenset(m for m in policy.methods if m in self.methods)
        self.gate = SigningGate(policy.sign_queue, policy.sign_wait)

    async def forward(self, method: str, params: Any, ctx: CallContext) -> Any:
        try:
            reply = await self.clef.call(method, params, ctx.origin, ctx.user_agent)
        except UpstreamError as e:
            raise RpcError(CLEF_UNAVAILABLE, f"Clef unavailable: {e}", 502) from None
        if "error" in reply:
            err = reply["error"] if isinstance(reply["error"], dict) else {}
            raw = err.get("code")
            code = raw if isinstance(raw, int) and not isinstance(raw, bool) else -32000
            raise RpcError(code, str(err.get("message", "error from Clef")))
        return reply["result"]

    async def _run_signing(self, method: Method, name: str, params: Any, ctx: CallContext) -> Any:
        await self.gate.acquire()
        # The slot is held until Clef has really answered, even if the client stops waiting:
        # otherwise a second scrypt could start beside the first.
        inner = asyncio.ensure_future(
            asyncio.wait_for(method.handler(self, name, params, ctx), self.policy.clef_timeout + 30)
        )
        inner.add_done_callback(lambda _: self.gate.release())
        try:
            return await asyncio.wait_for(asyncio.shield(inner), self.policy.clef_timeout)
        except TimeoutError:
            inner.add_done_callback(lambda t: t.cancelled() or t.exception())
            raise RpcError(CLEF_TIMEOUT, "timed out waiting for Clef", 504) from None

    async def call_one(self, obj: Any, ctx: CallContext) -> tuple[str | None, dict[str, Any] | None, int]:
        """(method, response object or None for a notification, HTTP status if alone)."""
        if not isinstance(obj, dict):
            return None, _err(None, INVALID_REQUEST, "invalid request"), 400
        msg_id = obj.get("id")
        has_id = "id" in obj
        bad_id = has_id and not (msg_id is None or isinstance(msg_id, (str, int)))
        if bad_id or isinstance(msg_id, bool):
            return None, _err(None, INVALID_REQUEST, "invalid request: bad id"), 400
        name = obj.get("method")
        if obj.get("jsonrpc") != "2.0" or not isinstance(name, str):
            return None, _err(msg_id, INVALID_REQUEST, "invalid request"), 400
        shown = name if len(name) <= 64 and name.isprintable() else _printable(name[:64])
        params = obj.get("params")
        if name not in self.allowed:
            denied = self.methods[name].denied_code if name in self.methods else METHOD_NOT_FOUND
            return shown, _err(msg_id, denied, "method not allowed"), 200
        if params is not None and not isinstance(params, list):
            return shown, _err(msg_id, INVALID_PARAMS, "params must be an array"), 200
        if not self.is_ready():
            return shown, _err(msg_id, LOCKED, f"signer is locked ({self.state()})"), 503
        method = self.methods[name]
        try:
            if method.signing:
                result = await self._run_signing(method, name, params, ctx)
            else:
                try:
                    async with asyncio.timeout(self.policy.clef_timeout):
                        result = await method.handler(self, name, params, ctx)
                except TimeoutError:
                    raise RpcError(CLEF_TIMEOUT, "timed out waiting for Clef", 504) from None
        except RpcError as e:
            return shown, _err(msg_id, e.code, e.message), e.status
        if not has_id:
            return shown, None, 200
        return shown, {"jsonrpc": "2.0", "id": msg_id, "result": result}, 200

    async def handle(self, body: bytes, ctx: CallContext) -> tuple[int, bytes, Any, Any]:
        """(HTTP status, response body, method(s) for the audit, error code(s) for the audit)."""
        try:
            parsed = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return 400, _dump(_err(None, PARSE_ERROR, "parse error")), None, PARSE_ERROR
        if isinstance(parsed, list):
            if not parsed:
                return 400, _dump(_err(None, INVALID_REQUEST, "empty batch")), [], INVALID_REQUEST
            if len(parsed) > self.policy.max_batch:
                msg = f"batch larger than {self.policy.max_batch}"
                return 400, _dump(_err(None, INVALID_REQUEST, msg)), [], INVALID_REQUEST
            results = await asyncio.gather(*(self.call_one(o, ctx) for o in parsed))
            replies = [r for _, r, _ in results if r is not None]
            codes = [_code(r) for _, r, _ in results]
            methods = [m for m, _, _ in results]
            status = 503 if all(s == 503 for _, _, s in results) else 200
            return status, _dump(replies) if replies else b"", methods, codes
        name, reply, status = await self.call_one(parsed, ctx)
        if reply is None:
            return 200, b"", name, None
        return status, _dump(reply), name, _code(reply)


def _err(msg_id: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": msg_id, "error": {"code": code, "message": message}}


def _printable(text: str) -> str:
    return text.encode("unicode_escape").decode("ascii")


def _code(reply: dict[str, Any] | None) -> int | None:
    if reply is None or "error" not in reply:
        return None
    code = reply["error"].get("code")
    return code if isinstance(code, int) else None


def _dump(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()
