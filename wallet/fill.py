"""Completing a transaction from the node, as a node with a local unlocked account would.

`parse` checks what the caller sent; `gather` asks the node everything still missing in one
batch (chain id, pending nonce, latest block, fee suggestions, gas estimate); `complete` is pure
and makes the full transaction the armory's eth_signTransaction requires.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from eth_utils.address import is_address, is_checksum_address, to_checksum_address

from wallet.upstream import CHAIN_MISMATCH, INVALID_PARAMS, JsonRpcClient, RpcFailure

_FIELDS = frozenset({"from", "to", "gas", "gasLimit", "gasPrice", "maxFeePerGas", "maxPriorityFeePerGas",
                     "value", "nonce", "data", "input", "accessList", "chainId", "type"})
_HEX_QUANTITY = re.compile(r"^0x[0-9a-fA-F]{1,64}$")
_HEX_BYTES = re.compile(r"^0x([0-9a-fA-F]{2})*$")
PLAIN_TRANSFER_GAS = 21000


def bad(message: str) -> RpcFailure:
    return RpcFailure(INVALID_PARAMS, message)


@dataclass(frozen=True)
class TxRequest:
    """An eth_sendTransaction / eth_signTransaction parameter, checked; None = to be filled."""

    sender: str
    to: str | None
    value: int
    data: bytes | None
    gas: int | None = None
    gas_price: int | None = None
    max_fee: int | None = None
    max_priority: int | None = None
    nonce: int | None = None
    chain_id: int | None = None
    access_list: list[Any] | None = None
    tx_type: int | None = None


def quantity(value: Any, what: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and _HEX_QUANTITY.match(value):
        return int(value, 16)
    raise bad(f"transaction {what} must be a 0x-hex quantity, not {value!r}")


def address(value: Any, what: str) -> str:
    if not isinstance(value, str) or not is_address(value.lower()):
        raise bad(f"transaction {what} must be a 0x-prefixed 20-byte hex address")
    if value[2:] != value[2:].lower() and value[2:] != value[2:].upper() and not is_checksum_address(value):
        raise bad(f"transaction {what} has an invalid EIP-55 checksum: {value}")
    return str(to_checksum_address(value))


def parse(params: Any) -> TxRequest:
    """[tx] -> TxRequest; null fields count as absent (several clients send them)."""
    if not isinstance(params, list) or len(params) != 1 or not isinstance(params[0], dict):
        raise bad("takes params [transaction]")
    tx = {k: v for k, v in params[0].items() if v is not None}
    unknown = sorted(set(tx) - _FIELDS)
    if unknown:
        raise bad(f"unsupported transaction fields: {', '.join(unknown)}")
    if "from" not in tx:
        raise bad("transaction from is required (the armory's address, see eth_accounts)")
    data, inp = tx.get("data"), tx.get("input")
    for v, name in ((data, "data"), (inp, "input")):
        if v is not None and (not isinstance(v, str) or not _HEX_BYTES.match(v)):
            raise bad(f"transaction {name} must be 0x-prefixed hex bytes")
    if data is not None and inp is not None and data.lower() != inp.lower():
        raise bad("transaction data and input differ")
    raw = data if data is not None else inp
    gas = tx.get("gas", tx.get("gasLimit"))

    def opt(name: str, value: Any = None) -> int | None:
        v = tx.get(name) if value is None else value
        return None if v is None else quantity(v, name)

    return TxRequest(
        sender=address(tx["from"], "from"),
        to=None if tx.get("to") is None else address(tx["to"], "to"),
        value=quantity(tx.get("value", 0), "value"),
        data=None if raw is None else bytes.fromhex(raw[2:]),
        gas=opt("gas", gas), gas_price=opt("gasPrice"), max_fee=opt("maxFeePerGas"),
        max_priority=opt("maxPriorityFeePerGas"), nonce=opt("nonce"), chain_id=opt("chainId"),
        access_list=tx.get("accessList"), tx_type=opt("type"),
    )


@dataclass(frozen=True)
class NodeFacts:
    """What the node said; a value the node refused is kept as its RpcFailure until it is needed."""

    chain_id: int
    pending_nonce: int | None
    base_fee: int | None  # None: the latest block has none (a pre-London / legacy chain)
    priority_fee: int | RpcFailure | None
    gas_price: int | RpcFailure | None
    gas_estimate: int | RpcFailure | None


def estimate_call(req: TxRequest) -> dict[str, Any]:
    call: dict[str, Any] = {"from": req.sender, "value": hex(req.value)}
    if req.to is not None:
        call["to"] = req.to
    if req.data is not None:
        call["data"] = "0x" + req.data.hex()
    if req.access_list is not None:
        call["accessList"] = req.access_list
    return call


def _as_int(value: Any, what: str, node: JsonRpcClient) -> int:
    if isinstance(value, str) and _HEX_QUANTITY.match(value):
        return int(value, 16)
    raise node.unavailable(f"answered {what} with something that is not a quantity")


def _kept(value: Any, what: str, node: JsonRpcClient) -> int | RpcFailure:
    return value if isinstance(value, RpcFailure) else _as_int(value, what, node)


async def gather(node: JsonRpcClient, req: TxRequest) -> NodeFacts:
    """One batch round trip to the node for everything `complete` may need."""
    calls: dict[str, tuple[str, list[Any]]] = {  # what we call each answer -> the call
        "chain": ("eth_chainId", []),
        "block": ("eth_getBlockByNumber", ["latest", False]),
        "priority": ("eth_maxPriorityFeePerGas", []),
        "gas_price": ("eth_gasPrice", []),
    }
    if req.nonce is None:
        calls["pending"] = ("eth_getTransactionCount", [req.sender, "pending"])
        calls["mined"] = ("eth_getTransactionCount", [req.sender, "latest"])
    if req.gas is None:
        calls["estimate"] = ("eth_estimateGas", [estimate_call(req)])
    answers = dict(zip(calls, await node.batch(list(calls.values())), strict=True))
    for must in ("chain", "block", "pending", "mined"):
        failure = answers.get(must)
        if isinstance(failure, RpcFailure):
            raise node.unavailable(f"refused {calls[must][0]}: {failure.message}")
    block = answers["block"]
    if not isinstance(block, dict):
        raise node.unavailable("answered eth_getBlockByNumber with something that is not a block")
    base = block.get("baseFeePerGas")
    pending, mined, gas = answers.get("pending"), answers.get("mined"), answers.get("estimate")
    return NodeFacts(
        chain_id=_as_int(answers["chain"], "eth_chainId", node),
        # geth's pool answers "pending" from its own state, which trails a block it has just mined by
        # a moment; the pending count is never lower than the mined one, so take the larger.
        pending_nonce=None if pending is None or mined is None else max(
            _as_int(pending, "eth_getTransactionCount", node),
            _as_int(mined, "eth_getTransactionCount", node)),
        base_fee=None if base is None else _as_int(base, "baseFeePerGas", node),
        priority_fee=_kept(answers["priority"], "eth_maxPriorityFeePerGas", node),
        gas_price=_kept(answers["gas_price"], "eth_gasPrice", node),
        gas_estimate=None if gas is None else _kept(gas, "eth_estimateGas", node),
    )


def check_chain(node_chain: int, device_chain: int, node_url: str) -> None:
    if node_chain != device_chain:
        raise RpcFailure(CHAIN_MISMATCH, f"chain id mismatch: the node at {node_url} is on chain "
                         f"{node_chain}, the armory signs for chain {device_chain}; nothing was signed")


def _need(value: int | RpcFailure | None, what: str) -> int:
    if isinstance(value, RpcFailure):
        raise value
    if value is None:
        raise RpcFailure(-32603, f"the node gave no {what}")
    return value


def with_margin(estimate: int, margin_percent: int) -> int:
    """Estimates are exact for the state they ran on; a plain transfer's 21000 cannot change."""
    if estimate == PLAIN_TRANSFER_GAS:
        return estimate
    return estimate + estimate * margin_percent // 100


def complete(req: TxRequest, facts: NodeFacts, nonce: int, margin_percent: int) -> dict[str, Any]:
    """The full transaction for the armory (hex quantities), fees EIP-1559 where the chain has them."""
    if req.chain_id is not None and req.chain_id != facts.chain_id:
        raise bad(f"transaction is for chain {req.chain_id}, the node is on chain {facts.chain_id}")
    gas = req.gas if req.gas is not None else with_margin(_need(facts.gas_estimate, "gas estimate"),
                                                           margin_percent)
    tx: dict[str, Any] = {"from": req.sender}
    if req.to is not None:
        tx["to"] = req.to
    tx.update(value=hex(req.value), gas=hex(gas), nonce=hex(nonce), chainId=hex(facts.chain_id))
    if req.data is not None:
        tx["data"] = "0x" + req.data.hex()
    if req.access_list is not None:
        tx["accessList"] = req.access_list
    if req.tx_type is not None:
        tx["type"] = hex(req.tx_type)
    dynamic_given = req.max_fee is not None or req.max_priority is not None or req.tx_type == 2
    no_base_fee = not dynamic_given and facts.base_fee is None
    if req.gas_price is not None or req.tx_type in (0, 1) or no_base_fee:
        price = req.gas_price if req.gas_price is not None else _need(facts.gas_price, "gas price")
        tx["gasPrice"] = hex(price)
        return tx
    if facts.base_fee is None and req.max_fee is None:
        raise bad("the node's chain has no base fee (no EIP-1559): give gasPrice instead of max fees")
    priority = req.max_priority if req.max_priority is not None else _need(facts.priority_fee, "priority fee")
    max_fee = req.max_fee if req.max_fee is not None else 2 * _need(facts.base_fee, "base fee") + priority
    tx["maxFeePerGas"] = hex(max_fee)
    tx["maxPriorityFeePerGas"] = hex(min(priority, max_fee))
    return tx


def fee_cap(tx: dict[str, Any]) -> int:
    return int(tx.get("maxFeePerGas") or tx.get("gasPrice") or "0x0", 16)
