"""Pure logic of the wallet endpoint: settings, the guard, filling a transaction, the nonce book."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

import pytest

from clef_armory import config
from clef_armory.config import REPO_ROOT
from clef_armory.errors import ConfigError
from wallet import fill, server
from wallet.guard import Guard, GuardError
from wallet.nonces import NonceBook
from wallet.upstream import RpcFailure

ME = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"
TO = "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359"
GWEI = 10**9


# --- settings ---


def test_wallet_defaults_come_from_invoke_yaml() -> None:
    s = config.load_wallet(overrides={"rpc": "http://127.0.0.1:8545"})
    assert s.listen == "127.0.0.1:8552" and s.armory == "http://10.0.0.1:8550" and not s.public
    assert s.listen_address[1] not in (8545, 8546, 8550, 8551)
    assert s.allowed_hosts >= {"127.0.0.1:8552", "localhost:8552"}
    assert "127.0.0.1" not in s.allowed_hosts and "localhost" not in s.allowed_hosts


@pytest.mark.parametrize(("values", "fragment"), [
    ({}, "pass --rpc URL"),
    ({"rpc": "127.0.0.1:8545"}, "http:// or https://"),
    ({"rpc": "http://x", "listen": "0.0.0.0:8552"}, "add --public"),
    ({"rpc": "http://x", "listen": "192.168.1.5:8552"}, "add --public"),
    ({"rpc": "http://x", "listen": "8552"}, "HOST:PORT"),
    ({"rpc": "http://x", "origins": ["app.example"]}, "https://app.example"),
    ({"rpc": "http://x", "public": "yes"}, "wrong type"),
    ({"rpc": "http://x", "colour": "red"}, "unknown wallet setting"),
])
def test_bad_wallet_settings(values: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        config.wallet_from_mapping(values)


def test_public_listen_is_explicit() -> None:
    s = config.wallet_from_mapping({"rpc": "http://x", "listen": "192.168.1.5:9000", "public": True,
                                    "hosts": "wallet.lan:9000"})
    assert {"192.168.1.5:9000", "wallet.lan:9000", "127.0.0.1:9000"} <= s.allowed_hosts
    ipv6 = config.wallet_from_mapping({"rpc": "http://x", "listen": "[::1]:9000"})
    assert ipv6.listen_address == ("::1", 9000)


# --- guard ---

GUARD = Guard(frozenset({"127.0.0.1:8552", "localhost:8552"}), frozenset({"https://app.example"}))


@pytest.mark.parametrize(("headers", "status", "message"), [
    ({"Host": "127.0.0.1:8552", "Content-Type": "text/plain;charset=UTF-8"}, 415, "Content-Type"),
    ({"Host": "127.0.0.1:8552"}, 415, "Content-Type"),
    ({"Host": "evil.example:8552", "Content-Type": "application/json"}, 403, "Host not allowed"),
    ({"Host": "127.0.0.1", "Content-Type": "application/json"}, 403, "Host not allowed"),
    ({"Content-Type": "application/json"}, 403, "Host not allowed"),
    ({"Host": "127.0.0.1:8552", "Content-Type": "application/json", "Origin": "null"}, 403, "Origin"),
    ({"Host": "127.0.0.1:8552", "Content-Type": "application/json", "Origin": "https://evil.example"}, 403,
     "Origin"),
])
def test_guard_refuses(headers: dict[str, str], status: int, message: str) -> None:
    with pytest.raises(GuardError) as e:
        GUARD.check("POST", headers)
    assert e.value.status == status and message in e.value.message


def test_guard_allows_tools_and_listed_origins() -> None:
    GUARD.check("POST", {"Host": "localhost:8552", "Content-Type": "application/json; charset=utf-8"})
    allowed = {"Host": "127.0.0.1:8552", "Content-Type": "application/json", "Origin": "https://app.example"}
    GUARD.check("POST", allowed)
    assert GUARD.cors_headers(allowed, preflight=False)["Access-Control-Allow-Origin"] == "https://app.example"
    assert GUARD.cors_headers({"Origin": "https://evil.example"}, preflight=True) == {}


# --- filling ---

FACTS = fill.NodeFacts(chain_id=1337, pending_nonce=4, base_fee=10 * GWEI, priority_fee=GWEI,
                       gas_price=12 * GWEI, gas_estimate=50_000)


def test_parse_accepts_what_clients_send() -> None:
    req = fill.parse([{"from": ME.lower(), "to": TO, "value": "0x10", "input": "0x", "data": "0x",
                       "gasLimit": "0x5208", "maxFeePerGas": None, "chainId": "0x539"}])
    assert req.sender == ME and req.to == TO and req.value == 16 and req.data == b"" and req.gas == 21000
    assert req.max_fee is None and req.chain_id == 1337
    assert fill.parse([{"from": ME, "to": None, "input": "0x6080"}]).to is None


@pytest.mark.parametrize(("tx", "fragment"), [
    ({"to": TO}, "from is required"),
    ({"from": ME, "to": TO.replace("fB", "Fb")}, "checksum"),
    ({"from": ME, "value": "12"}, "0x-hex quantity"),
    ({"from": ME, "data": "0x12", "input": "0x34"}, "differ"),
    ({"from": ME, "authorizationList": []}, "unsupported"),
])
def test_parse_refuses(tx: dict[str, Any], fragment: str) -> None:
    with pytest.raises(RpcFailure) as e:
        fill.parse([tx])
    assert e.value.code == -32602 and fragment in e.value.message


def test_complete_eip1559_from_the_node() -> None:
    tx = fill.complete(fill.parse([{"from": ME, "to": TO, "data": "0x1234"}]), FACTS, 4, 20)
    assert tx == {"from": ME, "to": TO, "value": "0x0", "gas": hex(60_000), "nonce": "0x4",
                  "chainId": "0x539", "data": "0x1234",
                  "maxFeePerGas": hex(21 * GWEI), "maxPriorityFeePerGas": hex(GWEI)}


def test_complete_keeps_what_the_caller_gave() -> None:
    req = fill.parse([{"from": ME, "to": TO, "gas": "0x5208", "maxFeePerGas": hex(5 * GWEI), "nonce": "0x9",
                       "maxPriorityFeePerGas": hex(7 * GWEI)}])
    tx = fill.complete(req, FACTS, 9, 20)
    assert tx["gas"] == "0x5208" and tx["nonce"] == "0x9"
    assert tx["maxFeePerGas"] == hex(5 * GWEI) and tx["maxPriorityFeePerGas"] == hex(5 * GWEI)  # capped


def test_complete_legacy_on_a_chain_without_base_fee() -> None:
    legacy = fill.NodeFacts(1337, 0, None, RpcFailure(-32601, "no such method"), 3 * GWEI, 21000)
    tx = fill.complete(fill.parse([{"from": ME, "to": TO, "value": "0x1"}]), legacy, 0, 20)
    assert tx["gasPrice"] == hex(3 * GWEI) and tx["gas"] == hex(21000) and "maxFeePerGas" not in tx
    with pytest.raises(RpcFailure, match="no base fee"):
        fill.complete(fill.parse([{"from": ME, "to": TO, "type": "0x2"}]), legacy, 0, 20)


def test_complete_refuses_another_chain_and_passes_estimate_errors() -> None:
    with pytest.raises(RpcFailure, match="chain 1, the node is on chain 1337"):
        fill.complete(fill.parse([{"from": ME, "to": TO, "chainId": "0x1"}]), FACTS, 0, 20)
    reverted = fill.NodeFacts(1337, 0, GWEI, GWEI, GWEI, RpcFailure(3, "execution reverted", "0x08c379a0"))
    with pytest.raises(RpcFailure) as e:
        fill.complete(fill.parse([{"from": ME, "to": TO}]), reverted, 0, 20)
    assert e.value.code == 3 and e.value.data == "0x08c379a0"
    with pytest.raises(RpcFailure) as e:
        fill.check_chain(31337, 1337, "http://node")
    assert e.value.code == -32021 and "nothing was signed" in e.value.message


class _ScriptedNode:
    """Pure stand-in for gather's one batch: answers each call from a table (no network)."""

    def __init__(self, answers: dict[tuple[str, str], Any]) -> None:
        self.answers = answers

    async def batch(self, calls: list[tuple[str, list[Any]]]) -> list[Any]:
        return [self.answers[(m, str(p[-1]) if p else "")] for m, p in calls]

    def unavailable(self, why: str) -> RpcFailure:
        return RpcFailure(-32099, f"node {why}")


@pytest.mark.parametrize(("pending", "mined", "expected"), [("0x0", "0x1", 1), ("0x3", "0x1", 3)])
def test_gather_never_goes_below_the_mined_count(pending: str, mined: str, expected: int) -> None:
    """geth --dev answered "pending" 0 just after mining nonce 0 (a CI failure): the mined count wins."""
    node = _ScriptedNode({("eth_chainId", ""): "0x539",
                          ("eth_getBlockByNumber", "False"): {"baseFeePerGas": "0x7"},
                          ("eth_maxPriorityFeePerGas", ""): "0x1", ("eth_gasPrice", ""): "0x8",
                          ("eth_getTransactionCount", "pending"): pending,
                          ("eth_getTransactionCount", "latest"): mined})
    req = fill.parse([{"from": ME, "to": TO, "gas": "0x5208"}])
    facts = asyncio.run(fill.gather(node, req))  # type: ignore[arg-type]
    assert facts.pending_nonce == expected


# --- nonces ---


def test_nonce_book_uses_the_larger_and_recovers_from_a_lost_transaction() -> None:
    async def scenario() -> list[int]:
        book = NonceBook()
        known = {"0xaa": True}

        async def node_knows(h: str) -> bool:
            return known.get(h, False)

        out = [await book.next_nonce(ME, 3, node_knows)]
        book.sent(ME, 3, "0xaa")
        out.append(await book.next_nonce(ME, 3, node_knows))  # the node lags: ours
        out.append(await book.next_nonce(ME, 7, node_knows))  # the node is ahead: its
        known["0xaa"] = False
        out.append(await book.next_nonce(ME.lower(), 2, node_knows))  # the node lost ours: its again
        return out

    assert asyncio.run(scenario()) == [3, 4, 7, 2]


def test_sends_from_one_account_take_turns() -> None:
    async def scenario() -> list[str]:
        book, order = NonceBook(), []

        async def send(name: str, hold: float) -> None:
            async with book.turn(ME):
                order.append(f"{name} in")
                await asyncio.sleep(hold)
                order.append(f"{name} out")

        await asyncio.gather(send("a", 0.05), send("b", 0))
        return order

    assert asyncio.run(scenario()) == ["a in", "a out", "b in", "b out"]


# --- the armory's answer, the terminal line ---


def test_either_sign_transaction_result_shape() -> None:
    assert server._raw_of("0x02ab") == "0x02ab"  # sign_transaction_result = "raw"
    assert server._raw_of({"raw": "0x02ab", "tx": {}}) == "0x02ab"  # = "object"
    with pytest.raises(RpcFailure):
        server._raw_of({"tx": {}})


def test_one_line_per_send() -> None:
    record = server.SendRecord(ME, None, 10**16, 21 * GWEI, "signed in 5 ms, sent", "0xabc", 9.0, 5.0)
    assert server.line(record, True) == (f"send {ME} -> a new contract, 0.01 ETH, fee cap 21 gwei: "
                                         "signed in 5 ms, sent 0xabc")


# --- the task: one line, exit 1 ---


@pytest.mark.parametrize(("flags", "message"), [
    ([], "error: the wallet needs a node: pass --rpc URL (e.g. http://127.0.0.1:8545)"),
    (["--rpc", "http://127.0.0.1:9", "--listen", "0.0.0.0:8552"],
     "error: --listen 0.0.0.0:8552 is not a loopback address: add --public to serve other machines (anyone "
     "who reaches it can ask the armory to sign)"),
    (["--rpc", "http://127.0.0.1:9"], "error: node at http://127.0.0.1:9 is unreachable (connect call failed "
     "('127.0.0.1', 9)): start the node or pass --rpc URL"),
])
def test_wallet_task_errors_are_one_line(flags: list[str], message: str) -> None:
    result = subprocess.run([sys.executable, "-m", "invoke", "wallet", *flags], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1 and result.stderr.strip() == message and result.stdout == ""
