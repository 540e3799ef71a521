"""Pure unit tests of the eth_* -> account_* translation (armory_agent.ethapi, armory_agent.keccak).

Digests and checksums are checked against published vectors and against eth-utils /
eth-account (pycryptodome's Keccak), an implementation independent of ours.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from typing import Any

import pytest
from eth_account.messages import encode_typed_data
from eth_utils import keccak as reference_keccak
from eth_utils import to_checksum_address as reference_checksum
from hypothesis import given, settings
from hypothesis import strategies as st

from armory_agent import ethapi
from armory_agent.clefclient import ClefClient
from armory_agent.config import DEFAULT_METHODS, ConfigError, PolicyConfig, from_mapping
from armory_agent.ethapi import ClefCall, EthSettings
from armory_agent.keccak import has_valid_checksum, keccak256, selector, to_checksum_address
from armory_agent.rpc import CLEF_UNAVAILABLE, METHOD_NOT_FOUND, METHODS, CallContext, Front, RpcError

ME = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"
TO = "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359"
CTX = CallContext("10.0.0.2", None, "test")


# --- keccak-256 ---


@pytest.mark.parametrize(
    ("data", "digest"),
    [
        (b"", "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"),
        (b"abc", "4e03657aea45a94fc7d47ba826c8d667c0d1e6e33a64a036ec44f58fa12d6c45"),
        (
            b"The quick brown fox jumps over the lazy dog",
            "4d741b6f1eb29cb2a9b9911c82f56fa8d73b04959d3d9d222895df6c0b28aa15",
        ),
    ],
)
def test_keccak256_vectors(data: bytes, digest: str) -> None:
    assert keccak256(data).hex() == digest


def test_keccak_is_not_hashlib_sha3() -> None:
    """The reason the module exists: FIPS SHA3-256 pads differently."""
    assert keccak256(b"abc") != hashlib.sha3_256(b"abc").digest()


@pytest.mark.parametrize("length", [0, 1, 135, 136, 137, 271, 272, 273, 1000])
def test_keccak256_block_boundaries(length: int) -> None:
    data = bytes(range(256)) * 4
    assert keccak256(data[:length]) == reference_keccak(data[:length])


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=600))
def test_keccak256_matches_reference(data: bytes) -> None:
    assert keccak256(data) == reference_keccak(data)


# --- EIP-55 ---

EIP55_VECTORS = [
    "0x52908400098527886E0F7030069857D2E4169EE7",
    "0x8617E340B3D01FA5F11F306F4090FD50E238070D",
    "0xde709f2102306220921060314715629080e2fb77",
    "0x27b1fdb04752bbc536007a920d24acb045561c26",
    "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed",
    "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359",
    "0xdbF03B407c01E7cD3CBea99509d93f8DDDC8C6FB",
    "0xD1220A0cf47c7B9Be7A2E6BA89F429762e7b9aDb",
]


@pytest.mark.parametrize("address", EIP55_VECTORS[4:])
def test_checksum_vectors(address: str) -> None:
    assert to_checksum_address(address.lower()) == address
    assert to_checksum_address(address.upper().replace("0X", "0x")) == address
    assert has_valid_checksum(address)


@pytest.mark.parametrize("address", EIP55_VECTORS[:4])
def test_all_one_case_addresses_carry_no_checksum(address: str) -> None:
    assert has_valid_checksum(address)


def test_wrong_mixed_case_checksum_is_detected() -> None:
    assert not has_valid_checksum(ME.replace("aA", "Aa", 1))
    with pytest.raises(ValueError, match="20-byte"):
        to_checksum_address("0x1234")


@settings(max_examples=40, deadline=None)
@given(st.binary(min_size=20, max_size=20))
def test_checksum_matches_reference(raw: bytes) -> None:
    assert to_checksum_address("0x" + raw.hex()) == reference_checksum("0x" + raw.hex())


# --- selectors ---


def test_known_selectors() -> None:
    assert selector("transfer(address,uint256)").hex() == "a9059cbb"
    assert selector("approve(address,uint256)").hex() == "095ea7b3"
    assert selector("transferFrom(address,address,uint256)").hex() == "23b872dd"
    for sig in ethapi.KNOWN_SIGNATURES:
        assert selector(sig) == reference_keccak(text=sig)[:4], sig
    assert ethapi.method_signature(bytes.fromhex("a9059cbb") + bytes(64)) == "transfer(address,uint256)"
    assert ethapi.method_signature(bytes.fromhex("deadbeef")) is None
    assert ethapi.method_signature(b"\xa9\x05") is None


def test_selector_table_rejects_non_signatures() -> None:
    with pytest.raises(ValueError, match="method signature"):
        ethapi.selector_table(["transfer(address, uint256)"])
    with pytest.raises(ValueError, match="method signature"):
        ethapi.selector_table(["transfer"])


# --- accounts, chain id ---


def test_accounts() -> None:
    assert ethapi.translate_accounts("eth_accounts", []) == ClefCall("account_list", [])
    assert ethapi.translate_accounts("eth_requestAccounts", None) == ClefCall("account_list", [])
    assert ethapi.accounts_result([ME.lower(), TO.lower()]) == [ME, TO]
    with pytest.raises(RpcError) as e:
        ethapi.translate_accounts("eth_accounts", [1])
    assert e.value.code == -32602
    with pytest.raises(RpcError) as e:
        ethapi.accounts_result("nope")
    assert e.value.code == -32603


def test_chain_id() -> None:
    assert ethapi.chain_id_result("eth_chainId", [], 1) == "0x1"
    assert ethapi.chain_id_result("eth_chainId", None, 11155111) == "0xaa36a7"


# --- eth_sign, personal_sign ---


def test_eth_sign_and_personal_sign_have_opposite_parameter_orders() -> None:
    want = ClefCall("account_signData", ["text/plain", ME, "0x68656c6c6f"])
    assert ethapi.translate_sign("eth_sign", [ME.lower(), "0x68656c6c6f"]) == want
    assert ethapi.translate_sign("personal_sign", ["0x68656c6c6f", ME.lower()]) == want
    assert ethapi.translate_sign("personal_sign", ["0x68656c6c6f", ME, "ignored-password"]) == want


def test_personal_sign_text_is_signed_as_utf8() -> None:
    call = ethapi.translate_sign("personal_sign", ["héllo", ME])
    assert call.params[2] == "0x" + "héllo".encode().hex()


@pytest.mark.parametrize(
    ("name", "params", "fragment"),
    [
        ("personal_sign", [ME, "0x68656c6c6f"], "address"),  # reversed order is refused
        ("eth_sign", ["0x68656c6c6f", ME], "address"),
        ("eth_sign", [ME, "hello"], "hex bytes"),  # eth_sign data must be hex
        ("eth_sign", [ME, "0x123"], "hex bytes"),
        ("eth_sign", [ME], "params"),
        ("personal_sign", ["0x00", ME.replace("aA", "Aa", 1)], "checksum"),
        ("personal_sign", [7, ME], "string"),
    ],
)
def test_sign_bad_params(name: str, params: list[Any], fragment: str) -> None:
    with pytest.raises(RpcError) as e:
        ethapi.translate_sign(name, params)
    assert e.value.code == -32602 and fragment in e.value.message


def test_signature_result() -> None:
    sig = "0x" + "ab" * 65
    assert ethapi.signature_result(sig) == sig
    with pytest.raises(RpcError):
        ethapi.signature_result("0x1234")


# --- typed data ---

MAIL: dict[str, Any] = {
    "types": {
        "EIP712Domain": [
            {"name": "name", "type": "string"},
            {"name": "version", "type": "string"},
            {"name": "chainId", "type": "uint256"},
            {"name": "verifyingContract", "type": "address"},
        ],
        "Person": [{"name": "name", "type": "string"}, {"name": "wallet", "type": "address"}],
        "Mail": [
            {"name": "from", "type": "Person"},
            {"name": "to", "type": "Person"},
            {"name": "contents", "type": "string"},
        ],
    },
    "primaryType": "Mail",
    "domain": {
        "name": "Ether Mail",
        "version": "1",
        "chainId": 1,
        "verifyingContract": "0xCcCCccccCCCCcCCCCCCcCcCccCcCCCcCcccccccC",
    },
    "message": {
        "from": {"name": "Cow", "wallet": "0xCD2a3d9F938E13CD947Ec05AbC7FE734Df8DD826"},
        "to": {"name": "Bob", "wallet": "0xbBbBBBBbbBBBbbbBbbBbbbbBBbBbbbbBbBbbBBbB"},
        "contents": "Hello, Bob!",
    },
}


def test_typed_data_v4_string_becomes_object() -> None:
    call = ethapi.translate_typed_data("eth_signTypedData_v4", [ME.lower(), json.dumps(MAIL)], 1)
    assert call == ClefCall("account_signTypedData", [ME, MAIL])


def test_typed_data_object_form() -> None:
    call = ethapi.translate_typed_data("eth_signTypedData", [ME, MAIL], 1)
    assert call == ClefCall("account_signTypedData", [ME, MAIL])


def test_missing_eip712domain_is_derived_with_the_same_hash() -> None:
    bare = {**MAIL, "types": {k: v for k, v in MAIL["types"].items() if k != "EIP712Domain"}}
    (_, sent) = ethapi.translate_typed_data("eth_signTypedData", [ME, bare], 1).params
    assert sent["types"]["EIP712Domain"] == MAIL["types"]["EIP712Domain"]
    assert encode_typed_data(full_message=sent) == encode_typed_data(full_message=MAIL)


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ([[{"type": "string", "name": "m", "value": "x"}], ME], "legacy v1"),
        ([ME, "{not json"], "JSON"),
        ([ME, {**MAIL, "primaryType": "Nope"}], "primaryType"),
        ([ME, {**MAIL, "domain": {**MAIL["domain"], "chainId": 5}}], "chain 5"),
        ([ME, {**MAIL, "domain": {**MAIL["domain"], "chainId": "0x5"}}], "chain 5"),
        ([ME, {**MAIL, "domain": {**MAIL["domain"], "evil": 1}}], "unknown domain fields"),
        ([ME, {**MAIL, "message": "x"}], "objects"),
        ([ME, [1]], "EIP-712 object"),
        ([ME], "params"),
    ],
)
def test_typed_data_bad_params(params: list[Any], fragment: str) -> None:
    with pytest.raises(RpcError) as e:
        ethapi.translate_typed_data("eth_signTypedData_v4", params, 1)
    assert e.value.code == -32602 and fragment in e.value.message


def test_typed_data_domain_chain_as_decimal_string() -> None:
    data = {**MAIL, "domain": {**MAIL["domain"], "chainId": "1"}}
    assert ethapi.translate_typed_data("eth_signTypedData_v4", [ME, data], 1).params[1] == data


# --- transactions ---

LEGACY = {
    "from": ME.lower(),
    "to": TO.lower(),
    "gas": "0x5208",
    "gasPrice": "0x01",
    "value": "0x1",
    "nonce": "0x0",
}


def sign_tx(tx: dict[str, Any], chain: int = 1, **kw: Any) -> ClefCall:
    return ethapi.translate_transaction("eth_signTransaction", [tx], chain, **kw)


def test_legacy_transaction_is_checksummed_and_canonical() -> None:
    call = sign_tx(LEGACY)
    assert call.method == "account_signTransaction"
    assert call.params == [
        {
            "from": ME,
            "to": TO,
            "gas": "0x5208",
            "nonce": "0x0",
            "value": "0x1",
            "gasPrice": "0x1",
            "chainId": "0x1",
        }
    ]


def test_integer_quantities_and_missing_value() -> None:
    tx = {"from": ME, "to": TO, "gas": 21000, "nonce": 3, "maxFeePerGas": 10**10, "maxPriorityFeePerGas": 1}
    (sent,) = sign_tx(tx, chain=5).params
    assert sent["gas"] == "0x5208" and sent["nonce"] == "0x3" and sent["value"] == "0x0"
    assert sent["maxFeePerGas"] == "0x2540be400" and sent["chainId"] == "0x5"
    assert "gasPrice" not in sent


def test_erc20_transfer_carries_its_method_signature() -> None:
    data = "0xa9059cbb" + "00" * 12 + TO[2:].lower() + f"{10**18:064x}"
    call = sign_tx({**LEGACY, "data": data, "value": "0x0"})
    assert call.params[1] == "transfer(address,uint256)"
    assert call.params[0]["data"] == data


def test_unknown_selector_and_deployments_carry_none() -> None:
    assert len(sign_tx({**LEGACY, "data": "0xdeadbeef"}).params) == 1
    deploy = {**LEGACY, "to": None, "data": "0xa9059cbb" + "00" * 64}
    call = sign_tx(deploy)
    assert len(call.params) == 1 and call.params[0]["to"] is None


def test_operator_signatures_are_used() -> None:
    table = ethapi.selector_table([*ethapi.KNOWN_SIGNATURES, "armoryPing(uint256)"])
    data = "0x" + selector("armoryPing(uint256)").hex() + "00" * 32
    assert sign_tx({**LEGACY, "data": data}, selectors=table).params[1] == "armoryPing(uint256)"


def test_input_and_data() -> None:
    assert sign_tx({**LEGACY, "input": "0x1234"}).params[0]["data"] == "0x1234"
    assert sign_tx({**LEGACY, "input": "0x1234", "data": "0x1234"}).params[0]["data"] == "0x1234"


def test_transaction_types() -> None:
    assert sign_tx({**LEGACY, "type": "0x0", "accessList": []}).params[0].get("accessList") is None
    typed1 = sign_tx({**LEGACY, "type": "0x1"}).params[0]
    assert typed1["accessList"] == []
    al = [{"address": TO.lower(), "storageKeys": ["0x" + "00" * 32]}]
    dyn = {**LEGACY, "gasPrice": None, "maxFeePerGas": "0x2", "maxPriorityFeePerGas": "0x1", "type": "0x2"}
    sent = sign_tx({**dyn, "accessList": al}).params[0]
    assert sent["accessList"] == [{"address": TO, "storageKeys": ["0x" + "00" * 32]}]


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"nonce": None}, "nonce is required"),
        ({"gas": None}, "gas is required"),
        ({"maxFeePerGas": "0x1"}, "both gasPrice"),
        ({"gasPrice": None, "maxFeePerGas": "0x1"}, "both maxFeePerGas and maxPriorityFeePerGas"),
        ({"gasPrice": None}, "needs gasPrice"),
        ({"data": "0x12", "input": "0x34"}, "differ"),
        ({"data": "0x123"}, "hex bytes"),
        ({"value": "12"}, "quantity"),
        ({"value": -1}, "out of range"),
        ({"value": True}, "quantity"),
        ({"chainId": "0x5"}, "chain 5"),
        ({"type": "0x2"}, "type 0"),
        ({"type": "0x4"}, "not supported"),
        ({"type": "0x0", "accessList": [{"address": TO, "storageKeys": []}]}, "type 1"),
        ({"authorizationList": []}, "EIP-7702"),
        ({"blobVersionedHashes": []}, "blob"),
        ({"gasLimit": "0x5208"}, "use gas"),
        ({"hash": "0x00"}, "unsupported transaction fields: hash"),
        ({"from": None}, "from must be"),
        ({"to": "0x1234"}, "to must be"),
        ({"to": TO.replace("fB", "Fb")}, "checksum"),
        ({"accessList": [{"address": TO}]}, "accessList entries"),
        ({"accessList": [{"address": TO, "storageKeys": ["0x00"]}]}, "32-byte"),
    ],
)
def test_transaction_bad_params(change: dict[str, Any], fragment: str) -> None:
    with pytest.raises(RpcError) as e:
        sign_tx({**LEGACY, **change})
    assert e.value.code == -32602
    assert fragment in e.value.message


def test_transaction_params_shape() -> None:
    for params in ([], [LEGACY, LEGACY], ["0x00"]):
        with pytest.raises(RpcError) as e:
            ethapi.translate_transaction("eth_signTransaction", params, 1)
        assert e.value.code == -32602


def test_transaction_result_shapes() -> None:
    answer = {"raw": "0xf86c", "tx": {"nonce": "0x0"}}
    assert ethapi.transaction_result(answer, "raw") == "0xf86c"
    assert ethapi.transaction_result(answer, "object") == answer
    for bad in ("0xf86c", {"tx": {}}, {"raw": "nothex"}):
        with pytest.raises(RpcError):
            ethapi.transaction_result(bad, "raw")


# --- errors ---


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("request denied", 4001),
        ("validation failed: Transaction recipient is the zero address", 4001),
        ("unknown account", 4100),
        ("requested chainid 5 does not match the configuration of the signer", -32602),
        ("domain is undefined", -32000),
    ],
)
def test_clef_errors_map_to_eip1193(message: str, code: int) -> None:
    assert ethapi.clef_error(-32000, message)[0] == code


# --- method table and handlers (with a stand-in for the Front: pure logic only) ---


class RecordingFront:
    def __init__(self, answer: Any = None, error: RpcError | None = None) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.answer = answer
        self.error = error

    async def forward(self, method: str, params: Any, ctx: CallContext) -> Any:
        self.calls.append((method, params))
        if self.error is not None:
            raise self.error
        return self.answer


def run(table: dict[str, Any], name: str, params: Any, front: RecordingFront) -> Any:
    return asyncio.run(table[name].handler(front, name, params, CTX))  # type: ignore[arg-type]


def test_method_table() -> None:
    table = ethapi.methods(EthSettings(chain_id=1))
    assert set(table) == {
        "eth_accounts", "eth_requestAccounts", "eth_chainId", "eth_signTransaction", "eth_sign",
        "personal_sign", "eth_signTypedData", "eth_signTypedData_v3", "eth_signTypedData_v4",
        "eth_sendTransaction",
    }  # fmt: skip
    assert set(table) <= set(DEFAULT_METHODS)
    signing = {n for n, m in table.items() if m.signing}
    assert signing == {n for n in table if "sign" in n and n != "eth_sendTransaction"}
    assert all(m.denied_code == 4100 for m in table.values())
    with pytest.raises(ValueError):
        ethapi.methods(EthSettings(chain_id=1, tx_result="json"))
    with pytest.raises(ValueError):
        ethapi.methods(EthSettings(chain_id=1, method_signatures=("nope",)))


def test_handlers_translate_both_ways() -> None:
    table = ethapi.methods(EthSettings(chain_id=1, tx_result="raw"))
    front = RecordingFront({"raw": "0xf86c", "tx": {}})
    assert run(table, "eth_signTransaction", [LEGACY], front) == "0xf86c"
    assert front.calls[0][0] == "account_signTransaction"
    assert front.calls[0][1][0]["to"] == TO
    front = RecordingFront([ME.lower()])
    assert run(table, "eth_requestAccounts", [], front) == [ME]
    assert run(table, "eth_chainId", [], RecordingFront()) == "0x1"


def test_handlers_map_clef_errors() -> None:
    table = ethapi.methods(EthSettings(chain_id=1))
    front = RecordingFront(error=RpcError(-32000, "request denied"))
    with pytest.raises(RpcError) as e:
        run(table, "personal_sign", ["0x00", ME], front)
    assert e.value.code == 4001
    unavailable = RpcError(CLEF_UNAVAILABLE, "Clef unavailable: gone", 502)
    with pytest.raises(RpcError) as e:
        run(table, "personal_sign", ["0x00", ME], RecordingFront(error=unavailable))
    assert e.value is unavailable  # the agent's own errors pass through untouched


def test_bad_params_never_reach_clef() -> None:
    table = ethapi.methods(EthSettings(chain_id=1))
    front = RecordingFront()
    with pytest.raises(RpcError):
        run(table, "eth_signTransaction", [{**LEGACY, "nonce": None}], front)
    assert front.calls == []


def test_send_transaction_says_why() -> None:
    table = ethapi.methods(EthSettings(chain_id=1))
    front = RecordingFront()
    with pytest.raises(RpcError) as e:
        run(table, "eth_sendTransaction", [LEGACY], front)
    assert e.value.code == 4200 and "eth_sendRawTransaction" in e.value.message
    assert front.calls == []


# --- the allowlist in the real Front: disallowed eth_* is 4100, unknown names -32601 ---


def front_reply(methods: tuple[str, ...], name: str) -> dict[str, Any]:
    table = {**ethapi.methods(EthSettings(chain_id=1))}
    return front_reply_with(table, name, methods)


def front_reply_with(
    table: dict[str, Any], name: str, methods: tuple[str, ...] = DEFAULT_METHODS
) -> dict[str, Any]:
    front = Front(
        PolicyConfig(methods=methods), ClefClient("127.0.0.1", 9), lambda: True, lambda: "ready", table
    )
    request = {"jsonrpc": "2.0", "id": 1, "method": name, "params": []}
    _, reply, _ = asyncio.run(front.call_one(request, CTX))
    assert reply is not None
    return reply


def test_allowlist_applies_to_eth_methods() -> None:
    assert front_reply(("eth_chainId",), "eth_chainId")["result"] == "0x1"
    assert front_reply(("eth_chainId",), "eth_accounts")["error"]["code"] == 4100
    assert (
        front_reply(("eth_chainId", "eth_getBalance"), "eth_getBalance")["error"]["code"] == METHOD_NOT_FOUND
    )


# --- config ---


def test_eth_config() -> None:
    cfg = from_mapping({})
    assert cfg.eth.enabled and cfg.eth.sign_transaction_result == "raw" and cfg.eth.method_signatures == ()
    cfg = from_mapping({"eth": {"enabled": False, "sign_transaction_result": "object",
                                "method_signatures": ["mint(address,uint256)"]}})  # fmt: skip
    assert not cfg.eth.enabled and cfg.eth.sign_transaction_result == "object"
    assert cfg.eth.method_signatures == ("mint(address,uint256)",)
    with pytest.raises(ConfigError, match="sign_transaction_result"):
        from_mapping({"eth": {"sign_transaction_result": "hex"}})
    with pytest.raises(ConfigError, match="method_signatures"):
        from_mapping({"eth": {"method_signatures": ["mint"]}})
    with pytest.raises(ConfigError, match=r"unknown key eth\.chain_id"):
        from_mapping({"eth": {"chain_id": 5}})


# --- any input: a clean RpcError or a Clef call, never a crash (a crash would be a 500) ---

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)
    | st.sampled_from([ME, ME.lower(), "0x", "0x00", "0x5208", "0xa9059cbb", json.dumps(MAIL)]),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(
        st.sampled_from(["from", "to", "gas", "nonce", "value", "data", "input", "type", "chainId",
                         "gasPrice", "maxFeePerGas", "maxPriorityFeePerGas", "accessList", "types",
                         "domain", "message", "primaryType", "address", "storageKeys"])
        | st.text(max_size=6),
        children,
        max_size=6,
    ),
    max_leaves=16,
)  # fmt: skip
ETH_NAMES = sorted(ethapi.methods(EthSettings(chain_id=1)))


@settings(max_examples=400, deadline=None)
@given(name=st.sampled_from(ETH_NAMES), params=json_values, answer=json_values)
def test_any_input_gives_a_clean_answer(name: str, params: Any, answer: Any) -> None:
    table = ethapi.methods(EthSettings(chain_id=1))
    try:
        run(table, name, params, RecordingFront(answer))
    except RpcError as e:
        assert isinstance(e.code, int) and e.message and "\n" not in e.message


def test_deeply_nested_typed_data_json_is_bad_params() -> None:
    # The agent runs with Python's default limit; eth-account (imported here) raises it to
    # 100000, where the C JSON scanner overflows the C stack instead of raising RecursionError.
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    try:
        with pytest.raises(RpcError) as e:
            ethapi.translate_typed_data("eth_signTypedData_v4", [ME, "[" * 100000], 1)
    finally:
        sys.setrecursionlimit(limit)
    assert e.value.code == -32602


def test_method_table_follows_the_eth_switch() -> None:
    on = ethapi.method_table(from_mapping({"clef": {"chain_id": 5}}))
    assert set(METHODS) < set(on) and "personal_sign" in on
    assert front_reply_with(on, "eth_chainId")["result"] == "0x5"
    off = ethapi.method_table(from_mapping({"eth": {"enabled": False}}))
    assert off == METHODS
    assert front_reply_with(off, "eth_chainId")["error"]["code"] == METHOD_NOT_FOUND
