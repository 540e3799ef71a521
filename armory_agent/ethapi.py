"""The wallet methods dapps speak (eth_*, personal_sign), translated to Clef's account_* API.

Most libraries only know eth_accounts / eth_signTransaction / personal_sign /
eth_signTypedData_v4; Clef only answers account_*. Each eth_* call becomes exactly one Clef
call (or none), so the agent's allowlist, Host/Origin policy, signing queue and audit log see
it like any other method. The translate_* and *_result functions are pure; `methods()`
builds the agent's method-table entries from them.

Clef's own checks are kept, and the translation makes honest requests pass them: addresses
are sent EIP-55 checksummed (Clef rejects a lower-case `to`) and well-known 4-byte selectors
travel with their signature so Clef can decode the calldata instead of refusing it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from armory_agent.config import AgentConfig
from armory_agent.keccak import has_valid_checksum, is_address, selector, to_checksum_address
from armory_agent.rpc import METHODS, CallContext, Front, Handler, Method, RpcError

# EIP-1193 provider errors and the JSON-RPC one for bad parameters.
USER_REJECTED = 4001
UNAUTHORIZED = 4100
UNSUPPORTED_METHOD = 4200
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

TX_RESULT_SHAPES = ("raw", "object")

# Method signatures whose selector is passed to Clef as `methodSelector`: the common token
# standards (ERC-20/721/1155, EIP-2612 permit, WETH). Clef v1.17.3's embedded 4byte database
# knows these too; naming them pins the decoding the rules see (4-byte selectors collide).
# Clef refuses calldata whose selector it cannot find, so an operator lists their own
# contracts' methods in [eth] method_signatures.
KNOWN_SIGNATURES = (
    "transfer(address,uint256)",
    "approve(address,uint256)",
    "transferFrom(address,address,uint256)",
    "increaseAllowance(address,uint256)",
    "decreaseAllowance(address,uint256)",
    "permit(address,address,uint256,uint256,uint8,bytes32,bytes32)",
    "safeTransferFrom(address,address,uint256)",
    "safeTransferFrom(address,address,uint256,bytes)",
    "setApprovalForAll(address,bool)",
    "safeTransferFrom(address,address,uint256,uint256,bytes)",
    "safeBatchTransferFrom(address,address,uint256[],uint256[],bytes)",
    "deposit()",
    "withdraw(uint256)",
)

# Transaction fields accepted by eth_signTransaction; anything else is refused rather than
# silently dropped (e.g. an EIP-7702 authorizationList Clef cannot sign).
_TX_FIELDS = frozenset(
    {"from", "to", "gas", "gasPrice", "maxFeePerGas", "maxPriorityFeePerGas", "value", "nonce",
     "data", "input", "accessList", "chainId", "type"}
)  # fmt: skip
_HEX_QUANTITY = re.compile(r"^0x[0-9a-fA-F]+$")
_HEX_BYTES = re.compile(r"^0x([0-9a-fA-F]{2})*$")
_MAX_UINT256 = (1 << 256) - 1


@dataclass(frozen=True)
class ClefCall:
    """The account_* call an eth_* request becomes."""

    method: str
    params: list[Any]


@dataclass(frozen=True)
class EthSettings:
    chain_id: int
    tx_result: str = "raw"  # "raw": the signed tx hex (ethers, viem); "object": {raw, tx} (geth, web3.py)
    method_signatures: tuple[str, ...] = ()  # the operator's own, besides KNOWN_SIGNATURES


def bad_params(message: str) -> RpcError:
    return RpcError(INVALID_PARAMS, message)


SIGNATURE = re.compile(r"^[A-Za-z_$][A-Za-z0-9_$]*\([A-Za-z0-9_\[\](),]*\)$")


def selector_table(signatures: Iterable[str]) -> dict[bytes, str]:
    """selector -> signature; later signatures win, so an operator's list overrides the built-in one."""
    table: dict[bytes, str] = {}
    for sig in signatures:
        if not SIGNATURE.match(sig):
            raise ValueError(f"not a method signature like transfer(address,uint256): {sig!r}")
        table[selector(sig)] = sig
    return table


@cache
def _builtin_selectors() -> dict[bytes, str]:
    return selector_table(KNOWN_SIGNATURES)  # on first use: pure-Python keccak is slow on the device


def method_signature(data: bytes, table: Mapping[bytes, str] | None = None) -> str | None:
    """The known signature for calldata's 4-byte selector, or None."""
    if len(data) < 4:
        return None
    return (_builtin_selectors() if table is None else table).get(data[:4])


# --- parameters ---


def _params(params: Any, name: str, least: int, most: int, shape: str) -> list[Any]:
    items = [] if params is None else params
    if not isinstance(items, list) or not least <= len(items) <= most:
        raise bad_params(f"{name} takes params {shape}")
    return items


def parse_address(value: Any, what: str) -> str:
    """A 20-byte hex address in EIP-55 form; a mixed-case address with a wrong checksum is refused."""
    if not isinstance(value, str) or not is_address(value):
        raise bad_params(f"{what} must be a 0x-prefixed 20-byte hex address")
    if not has_valid_checksum(value):
        raise bad_params(f"{what} has an invalid EIP-55 checksum: {value}")
    return to_checksum_address(value)


def parse_quantity(value: Any, what: str) -> int:
    """A JSON-RPC quantity: 0x-hex string (leading zeros tolerated) or a non-negative integer."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and _HEX_QUANTITY.match(value):
        number = int(value, 16)
    else:
        raise bad_params(f"{what} must be a 0x-hex quantity, not {value!r}")
    if not 0 <= number <= _MAX_UINT256:
        raise bad_params(f"{what} is out of range")
    return number


def _quantity_hex(value: Any, what: str) -> str:
    """Canonical hex (Clef's hexutil refuses leading zeros such as 0x01)."""
    return hex(parse_quantity(value, what))


def parse_hex_bytes(value: Any, what: str) -> bytes:
    if not isinstance(value, str) or not _HEX_BYTES.match(value):
        raise bad_params(f"{what} must be 0x-prefixed hex bytes (even number of digits)")
    return bytes.fromhex(value[2:])


# --- eth_accounts, eth_requestAccounts, eth_chainId ---


def translate_accounts(name: str, params: Any) -> ClefCall:
    _params(params, name, 0, 0, "[]")
    return ClefCall("account_list", [])


def accounts_result(result: Any) -> list[str]:
    """Clef lists lower-case addresses; wallets answer EIP-55 ones."""
    if not isinstance(result, list) or not all(isinstance(a, str) and is_address(a) for a in result):
        raise RpcError(INTERNAL_ERROR, "unexpected account list from Clef")
    return [to_checksum_address(a) for a in result]


def chain_id_result(name: str, params: Any, chain_id: int) -> str:
    _params(params, name, 0, 0, "[]")
    return hex(chain_id)


# --- eth_sign, personal_sign ---


def translate_sign(name: str, params: Any) -> ClefCall:
    """eth_sign [address, data] and personal_sign [data, address] -> text/plain (EIP-191 0x45)."""
    if name == "eth_sign":
        address, data = _params(params, name, 2, 2, "[address, data]")
        message = parse_hex_bytes(data, "eth_sign data")
    else:
        items = _params(params, name, 2, 3, "[data, address] (a third password param is ignored)")
        data, address = items[0], items[1]
        message = _personal_message(data)
    addr = parse_address(address, f"{name} address")
    return ClefCall("account_signData", ["text/plain", addr, "0x" + message.hex()])


def _personal_message(data: Any) -> bytes:
    """personal_sign data is hex bytes; text that is not hex is signed as its UTF-8 bytes."""
    if not isinstance(data, str):
        raise bad_params("personal_sign data must be a string (0x-hex bytes or text)")
    if _HEX_BYTES.match(data):
        return bytes.fromhex(data[2:])
    return data.encode("utf-8")


def signature_result(result: Any) -> str:
    if not isinstance(result, str) or not _HEX_BYTES.match(result) or len(result) != 132:
        raise RpcError(INTERNAL_ERROR, "unexpected signature from Clef")
    return result


# --- eth_signTypedData, _v3, _v4 ---

_DOMAIN_FIELDS = (
    ("name", "string"),
    ("version", "string"),
    ("chainId", "uint256"),
    ("verifyingContract", "address"),
    ("salt", "bytes32"),
)


def translate_typed_data(name: str, params: Any, chain_id: int) -> ClefCall:
    """[address, typedData] -> account_signTypedData [address, object].

    _v3/_v4 carry the typed data as a JSON string, eth_signTypedData as an object; both forms
    are accepted for every name. A domain chainId other than the signer's is refused (Clef
    itself does not compare them).
    """
    address, raw = _params(params, name, 2, 2, "[address, typedData]")
    if isinstance(address, list):
        raise bad_params(f"{name}: the legacy v1 format ([typedData, address]) is not supported")
    addr = parse_address(address, f"{name} address")
    if isinstance(raw, str):
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            raise bad_params(f"{name} typed data is not valid JSON") from None
    else:
        data = raw
    return ClefCall("account_signTypedData", [addr, check_typed_data(data, chain_id, name)])


def check_typed_data(data: Any, chain_id: int, name: str = "typed data") -> dict[str, Any]:
    """The EIP-712 object Clef expects, with EIP712Domain derived from the domain when absent."""
    if not isinstance(data, dict):
        raise bad_params(f"{name} must be an EIP-712 object {{types, primaryType, domain, message}}")
    types, primary, domain, message = (data.get(k) for k in ("types", "primaryType", "domain", "message"))
    if not isinstance(types, dict) or not all(isinstance(v, list) for v in types.values()):
        raise bad_params(f"{name}: types must be an object of field lists")
    if not isinstance(domain, dict) or not isinstance(message, dict):
        raise bad_params(f"{name}: domain and message must be objects")
    if not isinstance(primary, str) or primary not in types:
        raise bad_params(f"{name}: primaryType must name one of the types")
    unknown = set(domain) - {f for f, _ in _DOMAIN_FIELDS}
    if unknown:
        raise bad_params(f"{name}: unknown domain fields: {', '.join(sorted(unknown))}")
    if domain.get("chainId") is not None:
        domain_chain = _domain_chain_id(domain["chainId"], name)
        if domain_chain != chain_id:
            raise bad_params(
                f"{name}: typed data is for chain {domain_chain}, this signer is for chain {chain_id}"
            )
    out = dict(data)
    if "EIP712Domain" not in types:
        domain_type = [{"name": f, "type": t} for f, t in _DOMAIN_FIELDS if f in domain]
        out["types"] = {"EIP712Domain": domain_type, **types}
    return out


def _domain_chain_id(value: Any, name: str) -> int:
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return parse_quantity(value, f"{name} domain.chainId")


# --- eth_signTransaction ---


def translate_transaction(
    name: str, params: Any, chain_id: int, selectors: Mapping[bytes, str] | None = None
) -> ClefCall:
    """[tx] -> account_signTransaction [tx, methodSelector?] with the shape Clef accepts.

    nonce and gas are required: the device has no chain to look them up, and a missing nonce
    would silently become 0. Fees are legacy (gasPrice) or EIP-1559 (both max fees), never both.
    """
    (tx,) = _params(params, name, 1, 1, "[transaction]")
    if not isinstance(tx, dict):
        raise bad_params(f"{name}: the transaction must be an object")
    if "authorizationList" in tx:
        raise bad_params(f"{name}: EIP-7702 (type 4) transactions are not supported by Clef")
    if any(k in tx for k in ("blobVersionedHashes", "maxFeePerBlobGas", "blobs")):
        raise bad_params(f"{name}: blob transactions need account_signTransaction with their sidecar")
    if "gasLimit" in tx:
        raise bad_params(f"{name}: use gas, not gasLimit")
    unknown = sorted(k for k in tx if k not in _TX_FIELDS)
    if unknown:
        raise bad_params(f"{name}: unsupported transaction fields: {', '.join(unknown)}")
    out: dict[str, Any] = {"from": parse_address(tx.get("from"), "transaction from")}
    to = tx.get("to")
    out["to"] = None if to is None else parse_address(to, "transaction to")
    for key in ("gas", "nonce"):
        if tx.get(key) is None:
            raise bad_params(f"{name}: transaction {key} is required (the signer cannot look it up)")
        out[key] = _quantity_hex(tx[key], f"transaction {key}")
    value = tx.get("value")
    out["value"] = _quantity_hex(0 if value is None else value, "transaction value")
    data = _call_data(tx)
    if data is not None:
        out["data"] = "0x" + data.hex()
    kind = _fees(tx, out)
    declared = tx.get("type")
    access_list = tx.get("accessList")
    if declared is not None:
        declared_kind = parse_quantity(declared, "transaction type")
        if declared_kind == 0 and access_list == []:
            access_list = None  # some clients send an empty list with every type
        if declared_kind not in (0, 1, 2):
            raise bad_params(f"{name}: transaction type {declared_kind} is not supported")
        if declared_kind == 1 and access_list is None:
            access_list = []
    if access_list is not None:
        out["accessList"] = _access_list(access_list)
        if kind == 0:
            kind = 1
    if declared is not None and parse_quantity(declared, "transaction type") != kind:
        raise bad_params(f"{name}: the fields make a type {kind} transaction, not type {declared}")
    if tx.get("chainId") is not None:
        requested = parse_quantity(tx["chainId"], "transaction chainId")
        if requested != chain_id:
            raise bad_params(
                f"{name}: transaction is for chain {requested}, this signer is for chain {chain_id}"
            )
    out["chainId"] = hex(chain_id)
    signature = None
    if data is not None and out["to"] is not None:  # a contract call, not a deployment
        signature = method_signature(data, selectors)
    return ClefCall("account_signTransaction", [out] if signature is None else [out, signature])


def _call_data(tx: dict[str, Any]) -> bytes | None:
    data = tx.get("data")
    inp = tx.get("input")
    parsed_data = None if data is None else parse_hex_bytes(data, "transaction data")
    parsed_input = None if inp is None else parse_hex_bytes(inp, "transaction input")
    if parsed_data is not None and parsed_input is not None and parsed_data != parsed_input:
        raise bad_params("transaction data and input differ")
    return parsed_data if parsed_data is not None else parsed_input


def _fees(tx: dict[str, Any], out: dict[str, Any]) -> int:
    """Copy the fee fields; 0 for legacy (gasPrice), 2 for EIP-1559."""
    legacy = tx.get("gasPrice") is not None
    dynamic = tx.get("maxFeePerGas") is not None or tx.get("maxPriorityFeePerGas") is not None
    if legacy and dynamic:
        raise bad_params("transaction has both gasPrice and maxFeePerGas/maxPriorityFeePerGas")
    if legacy:
        out["gasPrice"] = _quantity_hex(tx["gasPrice"], "transaction gasPrice")
        return 0
    if tx.get("maxFeePerGas") is None or tx.get("maxPriorityFeePerGas") is None:
        raise bad_params("transaction needs gasPrice, or both maxFeePerGas and maxPriorityFeePerGas")
    out["maxFeePerGas"] = _quantity_hex(tx["maxFeePerGas"], "transaction maxFeePerGas")
    out["maxPriorityFeePerGas"] = _quantity_hex(
        tx["maxPriorityFeePerGas"], "transaction maxPriorityFeePerGas"
    )
    return 2


def _access_list(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise bad_params("transaction accessList must be a list")
    out = []
    for entry in value:
        if not isinstance(entry, dict) or set(entry) != {"address", "storageKeys"}:
            raise bad_params("accessList entries are {address, storageKeys}")
        keys = entry["storageKeys"]
        if not isinstance(keys, list) or not all(
            isinstance(k, str) and _HEX_BYTES.match(k) and len(k) == 66 for k in keys
        ):
            raise bad_params("accessList storageKeys must be 32-byte hex strings")
        out.append({"address": parse_address(entry["address"], "accessList address"), "storageKeys": keys})
    return out


def transaction_result(result: Any, shape: str) -> Any:
    """Clef answers {raw, tx}: "raw" returns the signed transaction hex, "object" Clef's answer."""
    if not isinstance(result, dict) or not isinstance(result.get("raw"), str):
        raise RpcError(INTERNAL_ERROR, "unexpected transaction result from Clef")
    if not _HEX_BYTES.match(result["raw"]):
        raise RpcError(INTERNAL_ERROR, "unexpected raw transaction from Clef")
    return result["raw"] if shape == "raw" else result


# --- errors ---


def clef_error(code: int, message: str) -> tuple[int, str]:
    """Clef's error for a translated call -> (EIP-1193 / JSON-RPC code, message)."""
    text = message.lower()
    # "User denied" is what wallets say (MetaMask); ethers keys ACTION_REJECTED on that phrase.
    if text == "request denied":
        return USER_REJECTED, "User denied: the signer's rules rejected the request"
    if text.startswith("validation failed"):  # Clef's reject mode: warnings refuse the tx
        return USER_REJECTED, f"User denied: Clef's transaction checks rejected it ({message})"
    if "unknown account" in text or "no such account" in text:
        return UNAUTHORIZED, "the account is not managed by this signer"
    if "does not match the configuration of the signer" in text:
        return INVALID_PARAMS, message
    return code, message


SEND_TRANSACTION_UNSUPPORTED = (
    "eth_sendTransaction is not supported: the signer has no network and cannot broadcast; "
    "sign with eth_signTransaction, then send the raw transaction with eth_sendRawTransaction on a node"
)


# --- the agent's method-table entries ---


def method_table(cfg: AgentConfig) -> dict[str, Method]:
    """The agent's whole table: Clef's account_* methods, plus eth_* when [eth] enabled."""
    table = dict(METHODS)
    if cfg.eth.enabled:
        e = cfg.eth
        table.update(methods(EthSettings(cfg.clef.chain_id, e.sign_transaction_result, e.method_signatures)))
    return table


def methods(settings: EthSettings) -> dict[str, Method]:
    """eth_* entries for rpc.METHODS; the policy allowlist gates each name like any other."""
    if settings.tx_result not in TX_RESULT_SHAPES:
        raise ValueError(f"tx_result must be one of {TX_RESULT_SHAPES}")
    chain = settings.chain_id
    selectors = {**_builtin_selectors(), **selector_table(settings.method_signatures)}

    def sign_tx(name: str, params: Any) -> ClefCall:
        return translate_transaction(name, params, chain, selectors)

    def typed(name: str, params: Any) -> ClefCall:
        return translate_typed_data(name, params, chain)

    def tx_result(result: Any) -> Any:
        return transaction_result(result, settings.tx_result)

    async def chain_id(front: Front, name: str, params: Any, ctx: CallContext) -> Any:
        return chain_id_result(name, params, chain)

    async def send_transaction(front: Front, name: str, params: Any, ctx: CallContext) -> Any:
        raise RpcError(UNSUPPORTED_METHOD, SEND_TRANSACTION_UNSUPPORTED)

    accounts = _via_clef(translate_accounts, accounts_result)
    sign = _via_clef(translate_sign, signature_result)
    typed_data = _via_clef(typed, signature_result)
    return {
        "eth_accounts": Method(accounts, signing=False, denied_code=UNAUTHORIZED),
        "eth_requestAccounts": Method(accounts, signing=False, denied_code=UNAUTHORIZED),
        "eth_chainId": Method(chain_id, signing=False, denied_code=UNAUTHORIZED),
        "eth_signTransaction": Method(_via_clef(sign_tx, tx_result), signing=True, denied_code=UNAUTHORIZED),
        "eth_sign": Method(sign, signing=True, denied_code=UNAUTHORIZED),
        "personal_sign": Method(sign, signing=True, denied_code=UNAUTHORIZED),
        "eth_signTypedData": Method(typed_data, signing=True, denied_code=UNAUTHORIZED),
        "eth_signTypedData_v3": Method(typed_data, signing=True, denied_code=UNAUTHORIZED),
        "eth_signTypedData_v4": Method(typed_data, signing=True, denied_code=UNAUTHORIZED),
        "eth_sendTransaction": Method(send_transaction, signing=False, denied_code=UNAUTHORIZED),
    }


def _via_clef(translate: Callable[[str, Any], ClefCall], convert: Callable[[Any], Any]) -> Handler:
    async def handler(front: Front, name: str, params: Any, ctx: CallContext) -> Any:
        call = translate(name, params)
        try:
            result = await front.forward(call.method, call.params, ctx)
        except RpcError as e:
            if e.status != 200:  # the agent's own trouble (Clef unavailable): not Clef's answer
                raise
            code, message = clef_error(e.code, e.message)
            raise RpcError(code, message) from None
        return convert(result)

    return handler
