"""The wallet's HTTP door: guard, then each JSON-RPC call to the node, the armory, or the send path.

Reads go to the node unchanged (batches too). Accounts and signatures go to the armory with the
caller's Origin. eth_sendTransaction is filled from the node, signed by the armory, checked
(signed by the account that was asked for) and broadcast; one line per send tells the user.
"""

from __future__ import annotations

import asyncio
import collections
import json
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from eth_account import Account

from clef_armory.config import WalletSettings
from clef_armory.errors import WalletError
from wallet import fill
from wallet.guard import Guard, GuardError
from wallet.nonces import NonceBook
from wallet.upstream import (
    ARMORY_UNAVAILABLE,
    LOCKED,
    NODE_UNAVAILABLE,
    SIGNATURE_MISMATCH,
    ArmoryClient,
    Caller,
    JsonRpcClient,
    RpcFailure,
)

Say = Callable[[str], None]

SIGN_METHODS = frozenset({"personal_sign", "eth_sign", "eth_signTypedData", "eth_signTypedData_v3",
                          "eth_signTypedData_v4"})
LOCAL_METHODS = SIGN_METHODS | {"eth_accounts", "eth_requestAccounts", "eth_chainId", "eth_sendTransaction",
                                "eth_signTransaction"}
MAX_BODY = 4 * 1024 * 1024
MAX_BATCH = 100
INVALID_REQUEST = -32600
PARSE_ERROR = -32700
_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


@dataclass(frozen=True)
class SendRecord:
    """One send or sign through the wallet, as the terminal line shows it (kept for the bench)."""

    sender: str
    to: str | None
    value: int
    fee_cap: int | None
    verdict: str
    tx_hash: str | None
    total_ms: float
    armory_ms: float


def _eth(wei: int) -> str:
    return f"{wei / 10**18:.6g} ETH" if wei else "0 ETH"


def line(record: SendRecord, broadcast: bool) -> str:
    fee = "?" if record.fee_cap is None else f"{record.fee_cap / 10**9:.6g} gwei"
    to = record.to or "a new contract"
    head = f"{'send' if broadcast else 'sign'} {record.sender} -> {to}, {_eth(record.value)}, fee cap {fee}"
    tail = f" {record.tx_hash}" if record.tx_hash else ""
    return f"{head}: {record.verdict}{tail}"


def _reply(msg_id: Any, result: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": msg_id, "result": result}


def _error(msg_id: Any, failure: RpcFailure) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": msg_id, "error": failure.as_error()}


def _raw_of(signed: Any) -> str:
    """The armory's eth_signTransaction answer in either of its shapes (sign_transaction_result)."""
    raw = signed.get("raw") if isinstance(signed, dict) else signed
    if not isinstance(raw, str) or not raw.startswith("0x"):
        raise RpcFailure(-32603, "the armory answered eth_signTransaction without a raw transaction")
    return raw


class Wallet:
    """The JSON-RPC logic; `app()` puts it behind the guard in an aiohttp application."""

    def __init__(self, settings: WalletSettings, session: aiohttp.ClientSession, say: Say) -> None:
        self.settings = settings
        self.say = say
        self.node = JsonRpcClient(settings.rpc, "node", session, settings.node_timeout, NODE_UNAVAILABLE)
        self.armory = ArmoryClient(settings.armory, "armory", session, settings.sign_timeout,
                                   ARMORY_UNAVAILABLE)
        self.guard = Guard(settings.allowed_hosts, frozenset(settings.origins))
        self.nonces = NonceBook()
        self.records: collections.deque[SendRecord] = collections.deque(maxlen=10000)
        self._device_chain: int | None = None

    # --- chain ids ---

    async def device_chain(self, caller: Caller | None) -> int:
        """The armory's chain id (asked once; it changes only with a new provisioning)."""
        if self._device_chain is None:
            answer = await self.armory.call("eth_chainId", [], caller)
            self._device_chain = fill.quantity(answer, "chain id from the armory")
        return self._device_chain

    async def node_chain(self) -> int:
        answer = await self.node.call("eth_chainId", [])
        if not isinstance(answer, str) or not answer.startswith("0x"):
            raise self.node.unavailable("answered eth_chainId with something that is not a quantity")
        return int(answer, 16)

    async def check_start(self) -> list[str]:
        """Lines for the terminal; WalletError when the node or the armory cannot be used at all."""
        try:
            node_chain = await self.node_chain()
        except RpcFailure as e:
            raise WalletError(f"{e.message}: start the node or pass --rpc URL") from None
        try:
            accounts = await self.armory.call("eth_accounts", [])
            device = await self.device_chain(None)
        except RpcFailure as e:
            if e.code != LOCKED:
                raise WalletError(f"{e.message}: plug the armory in, or pass --armory URL") from None
            return [f"node {self.settings.rpc}: chain {node_chain}",
                    f"armory {self.settings.armory}: locked: run ./do unlock (chain id checked on each send)"]
        if device != node_chain:
            raise WalletError(f"the node at {self.settings.rpc} is on chain {node_chain}, the armory signs "
                              f"for chain {device}: pass --rpc for a chain {device} node")
        shown = ", ".join(accounts) if isinstance(accounts, list) and accounts else "no accounts"
        return [f"node {self.settings.rpc}: chain {node_chain}",
                f"armory {self.settings.armory}: {shown}"]

    # --- calls ---

    async def call_local(self, name: str, params: Any, caller: Caller) -> Any:
        if params is not None and not isinstance(params, list):
            raise RpcFailure(-32602, "params must be an array")
        if name in ("eth_accounts", "eth_requestAccounts"):
            return await self.armory.call("eth_accounts", [], caller)
        if name == "eth_chainId":
            node_chain = await self.node_chain()
            fill.check_chain(node_chain, await self.device_chain(caller), self.settings.rpc)
            return hex(node_chain)
        if name in SIGN_METHODS:
            return await self.armory.call(name, params or [], caller)
        return await self.send(params, caller, broadcast=name == "eth_sendTransaction")

    async def send(self, params: Any, caller: Caller, broadcast: bool) -> Any:
        """Fill from the node, sign on the armory, check, broadcast; one line on the terminal."""
        started = time.perf_counter()
        req = fill.parse(params)
        tx: dict[str, Any] | None = None
        armory_ms = 0.0
        verdict, tx_hash = "", None
        try:
            device = await self.device_chain(caller)
            async with self.nonces.turn(req.sender):
                facts = await fill.gather(self.node, req)
                fill.check_chain(facts.chain_id, device, self.settings.rpc)
                nonce = req.nonce
                if nonce is None:
                    pending = facts.pending_nonce or 0
                    nonce = await self.nonces.next_nonce(req.sender, pending, self._node_knows)
                tx = fill.complete(req, facts, nonce, self.settings.gas_margin_percent)
                signing = time.perf_counter()
                try:
                    signed = await self.armory.call("eth_signTransaction", [tx], caller)
                finally:
                    armory_ms = (time.perf_counter() - signing) * 1000
                raw = _raw_of(signed)
                if Account.recover_transaction(raw) != req.sender:
                    raise RpcFailure(SIGNATURE_MISMATCH, "the armory's signature is not from the account "
                                     "asked for; nothing was sent")
                if not broadcast:
                    verdict = f"signed in {armory_ms:.0f} ms, not sent"
                    return signed
                verdict = f"signed in {armory_ms:.0f} ms, broadcast failed"
                answer = await self.node.call("eth_sendRawTransaction", [raw])
                tx_hash = str(answer)
                self.nonces.sent(req.sender, nonce, tx_hash)
                verdict = f"signed in {armory_ms:.0f} ms, sent"
                return answer
        except RpcFailure as e:
            verdict = f"{verdict + ': ' if verdict else ''}{_verdict(e)}"
            raise
        finally:
            record = SendRecord(req.sender, req.to, req.value, None if tx is None else fill.fee_cap(tx),
                                verdict, tx_hash, (time.perf_counter() - started) * 1000, armory_ms)
            self.records.append(record)
            self.say(line(record, broadcast))

    async def _node_knows(self, tx_hash: str) -> bool:
        return await self.node.call("eth_getTransactionByHash", [tx_hash]) is not None

    async def call_one(self, obj: Any, caller: Caller) -> dict[str, Any] | None:
        if not isinstance(obj, dict) or obj.get("jsonrpc") != "2.0" or not isinstance(obj.get("method"), str):
            return _error(obj.get("id") if isinstance(obj, dict) else None,
                          RpcFailure(INVALID_REQUEST, "invalid request"))
        msg_id = obj.get("id")
        try:
            result = await self.call_local(obj["method"], obj.get("params"), caller)
        except RpcFailure as e:
            return _error(msg_id, e) if "id" in obj else None
        return _reply(msg_id, result) if "id" in obj else None

    async def forward_some(self, objs: list[Any]) -> dict[int, dict[str, Any]]:
        """Several reads for the node in one batch; position in `objs` -> the node's reply."""
        body = json.dumps(objs).encode()
        try:
            _status, data = await self.node.post(body)
            replies = json.loads(data)
        except RpcFailure as e:
            return {i: _error(o.get("id"), e) for i, o in enumerate(objs) if "id" in o}
        except (ValueError, UnicodeDecodeError, RecursionError):
            replies = None
        if not isinstance(replies, list):
            garbage = self.node.unavailable("answered something that is not JSON-RPC")
            return {i: _error(o.get("id"), garbage) for i, o in enumerate(objs) if "id" in o}
        by_id = {json.dumps(r.get("id")): r for r in replies if isinstance(r, dict)}
        missing = self.node.unavailable("left a call in the batch unanswered")
        return {i: by_id.get(json.dumps(o.get("id")), _error(o.get("id"), missing))
                for i, o in enumerate(objs) if "id" in o}

    async def handle_body(self, body: bytes, caller: Caller) -> tuple[int, bytes]:
        """(HTTP status, response bytes) for a JSON-RPC body; reads alone pass through byte for byte."""
        try:
            parsed = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return 400, _dump(_error(None, RpcFailure(PARSE_ERROR, "parse error")))
        calls = parsed if isinstance(parsed, list) else [parsed]
        if not calls or len(calls) > MAX_BATCH:
            too_big = RpcFailure(INVALID_REQUEST, f"a batch holds 1 to {MAX_BATCH} calls")
            return 400, _dump(_error(None, too_big))
        local = [not _well_formed(c) or c.get("method") in LOCAL_METHODS for c in calls]
        if not any(local):
            try:
                status, answer = await self.node.post(body)
                if answer.strip():  # (notifications alone get an empty answer)
                    json.loads(answer)  # the node's bytes go back unchanged, but only if they are JSON
                return status, answer
            except (ValueError, UnicodeDecodeError, RecursionError):
                failure = self.node.unavailable("answered something that is not JSON-RPC")
            except RpcFailure as e:
                failure = e
            errors = [_error(c.get("id"), failure) for c in calls]
            return 502, _dump(errors if isinstance(parsed, list) else errors[0])
        reads = [c for c, is_local in zip(calls, local, strict=True) if not is_local]
        forwarded, answered = await asyncio.gather(
            self.forward_some(reads) if reads else _none(),
            asyncio.gather(*(self.call_one(c, caller) for c, is_local in zip(calls, local, strict=True)
                             if is_local)),
        )
        replies: list[dict[str, Any]] = []
        read_i = local_i = 0
        for is_local in local:
            if is_local:
                reply = answered[local_i]
                local_i += 1
            else:
                reply = forwarded.get(read_i)
                read_i += 1
            if reply is not None:
                replies.append(reply)
        if not isinstance(parsed, list):
            return 200, _dump(replies[0]) if replies else b""
        return 200, _dump(replies) if replies else b""

    # --- HTTP ---

    async def http(self, request: web.Request) -> web.StreamResponse:
        headers = request.headers
        try:
            self.guard.check(request.method, headers)
            cors = self.guard.cors_headers(headers, preflight=request.method == "OPTIONS")
            if request.method == "OPTIONS":
                return web.Response(status=204, headers={**_HEADERS, **cors})
            if request.method != "POST":
                raise GuardError(405, "only POST (JSON-RPC) is served")
            if request.path != "/":
                raise GuardError(404, "JSON-RPC is served at /")
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise GuardError(413, f"request body larger than {MAX_BODY} bytes") from None
        except GuardError as e:
            err = _dump(_error(None, RpcFailure(-32003 if e.status == 403 else INVALID_REQUEST, e.message)))
            return web.Response(status=e.status, body=err, content_type="application/json", headers=_HEADERS)
        caller = Caller(headers.get("Origin"), headers.get("User-Agent"))
        status, out = await self.handle_body(body, caller)
        return web.Response(status=status, body=out, content_type="application/json",
                            headers={**_HEADERS, **cors})

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_route("*", "/{tail:.*}", self.http)
        return app


def _verdict(e: RpcFailure) -> str:
    if e.code == 4001:
        return f"refused by the armory ({e.message})"
    return f"error {e.code}: {e.message}"


def _well_formed(call: Any) -> bool:
    return isinstance(call, dict) and call.get("jsonrpc") == "2.0" and isinstance(call.get("method"), str)


async def _none() -> dict[int, dict[str, Any]]:
    return {}


def _dump(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


@dataclass
class Running:
    """A started wallet: `url` to point clients at, `close()` to stop it."""

    wallet: Wallet
    runner: web.AppRunner
    session: aiohttp.ClientSession
    url: str

    async def close(self) -> None:
        await self.runner.cleanup()
        await self.session.close()


async def start(settings: WalletSettings, say: Say) -> Running:
    """Check the node and the armory, then listen; WalletError (one line) when that cannot be done."""
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64, keepalive_timeout=30))
    try:
        wallet = Wallet(settings, session, say)
        for text in await wallet.check_start():
            say(text)
        runner = web.AppRunner(wallet.app(), access_log=None, handle_signals=False)
        await runner.setup()
        host, port = settings.listen_address
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as e:
            await runner.cleanup()
            raise WalletError(f"cannot listen on {settings.listen}: {e.strerror}; pass --listen "
                              f"127.0.0.1:OTHER-PORT") from None
    except BaseException:
        await session.close()
        raise
    shown = f"[{host}]" if ":" in host else host
    return Running(wallet, runner, session, f"http://{shown}:{port}")


async def _serve(settings: WalletSettings, say: Say) -> None:
    running = await start(settings, say)
    if settings.public:
        say(f"listening on {settings.listen} for other machines too (--public)")
    say(f"wallet: {running.url} (point cast, web3.py, ethers, viem here); Ctrl-C stops it")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await running.close()
    say("wallet stopped")


def run(settings: WalletSettings, say: Say) -> None:
    """`./do wallet`: serve until Ctrl-C or SIGTERM."""
    asyncio.run(_serve(settings, say))
