"""The qubes: section in a real Clef: the agent names the qube in User-Agent, the rules narrow.

Requests go straight to Clef with the User-Agent the agent sets ("clef-armory-agent qube=NAME").
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from provision import policy, policycheck
from provision.policycheck import HostSigner
from tests.policy_model import Model
from tests.test_policy_rules import (
    FEE_CAP,
    GAS_CAP,
    GWEI,
    R1,
    R2,
    SPENDER,
    STRANGER,
    TOKEN,
    TOKEN_CAP,
    erc20_call,
    tx,
)

pytestmark = pytest.mark.integration

AGENT = "clef-armory-agent"
QUBES = {
    "recipients": [R1, R2],
    "max_value_eth": "0.05",
    "allow_text_signing": False,
    "qubes": {
        "work": {"recipients": [R1], "max_value_eth": "0.01", "limits": [{"window": "24h", "max_tx": 2}]},
        "vault": None,
        "greedy": {"max_value_eth": "5", "allow_text_signing": True, "max_gas": 30_000_000},
    },
}


@pytest.fixture(scope="module")
def qubes(clef_binary: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostSigner]:
    with policycheck.host_signer(
        clef_binary, policy.parse(QUBES), tmp_path_factory.mktemp("qubes")
    ) as signer:
        yield signer


def test_unnamed_or_unknown_qubes_are_refused(qubes: HostSigner) -> None:
    for ua in (None, AGENT, f"{AGENT} qube=other", f"{AGENT} qube=work extra", "curl/8.0"):
        v = qubes.sign_transaction(tx(value=1), user_agent=ua)
        assert not v.approved and "is not named in the policy" in v.reason, ua
    _, error, reason = qubes.call("account_list", [], user_agent=AGENT)
    assert error is not None and "is not named" in reason


def test_a_qube_section_narrows(qubes: HostSigner) -> None:
    work = f"{AGENT} qube=work"
    v = qubes.sign_transaction(tx(to=R2, value=1), user_agent=work)
    assert not v.approved and "recipient" in v.reason
    v = qubes.sign_transaction(tx(value=10**16 + 1), user_agent=work)
    assert not v.approved and "above the cap of 10000000000000000" in v.reason
    assert qubes.sign_transaction(tx(value=10**16, nonce=1), user_agent=work).approved
    assert qubes.sign_transaction(tx(value=1, nonce=2), user_agent=work).approved
    v = qubes.sign_transaction(tx(value=1, nonce=3), user_agent=work)
    assert not v.approved and "limit of 2 transactions" in v.reason
    # The work qube's window is its own: the vault qube (no section keys: the global rules) still signs.
    assert qubes.sign_transaction(tx(to=R2, value=5 * 10**16), user_agent=f"{AGENT} qube=vault").approved
    result, error, _ = qubes.call("account_list", [], user_agent=f"{AGENT} qube=vault")
    assert error is None and result == [qubes.address.lower()]


def test_a_qube_section_cannot_widen(qubes: HostSigner) -> None:
    greedy = f"{AGENT} qube=greedy"
    v = qubes.sign_transaction(tx(value=5 * 10**16 + 1), user_agent=greedy)
    assert not v.approved and "above the cap of 50000000000000000" in v.reason
    v = qubes.sign_transaction(tx(gas=400_000), user_agent=greedy)
    assert not v.approved and "gas 400000 above the cap of 300000" in v.reason
    v = qubes.sign_message("hi", user_agent=greedy)
    assert not v.approved and "text signing is not allowed" in v.reason


# --- random transactions: the real Clef against the Python model -----------------------------------

PROPERTY = {
    "recipients": [R1, R2],
    "max_value_eth": "0.05",
    "max_fee_per_gas_gwei": "100",
    "max_gas": GAS_CAP,
    "limits": [{"window": "24h", "max_eth": "0.3"}],
    "calls": [{"erc20": {"token": TOKEN, "decimals": 6, "transfer_to": [R1], "max_amount": "100",
                         "approve": [{"spender": SPENDER, "max_amount": "50"}]}}],
}  # fmt: skip
CAP = 5 * 10**16


@pytest.fixture(scope="module")
def modelled(
    clef_binary: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[HostSigner, Model]]:
    pol = policy.parse(PROPERTY)
    with policycheck.host_signer(clef_binary, pol, tmp_path_factory.mktemp("prop")) as signer:
        yield signer, Model(pol)


def around(x: int) -> st.SearchStrategy[int]:
    return st.sampled_from([0, 1, x - 1, x, x + 1]).filter(lambda v: v >= 0)


datas = st.one_of(
    st.just(None),
    st.builds(lambda a, who: erc20_call("transfer(address,uint256)", who, a), around(TOKEN_CAP),
              st.sampled_from([R1, STRANGER])),
    st.builds(lambda a, who: erc20_call("approve(address,uint256)", who, a), around(50 * 10**6),
              st.sampled_from([SPENDER, STRANGER])),
)  # fmt: skip


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    to=st.sampled_from([R1, R2, STRANGER, TOKEN, None]),
    value=around(CAP),
    gas=st.sampled_from([21000, 60000, GAS_CAP, GAS_CAP + 1]),
    fee=st.sampled_from([1, GWEI, FEE_CAP, FEE_CAP + 1]),
    legacy=st.booleans(),
    data=datas,
    chain=st.sampled_from(["0x1", "0x1", "0x1", "0x5"]),
)
def test_random_transactions_match_the_model(
    modelled: tuple[HostSigner, Model], to: str | None, value: int, gas: int, fee: int, legacy: bool,
    data: str | None, chain: str,
) -> None:  # fmt: skip
    signer, model = modelled
    fees: dict[str, Any] = (
        {"gasPrice": fee, "maxFeePerGas": None, "maxPriorityFeePerGas": None}
        if legacy
        else {"maxFeePerGas": fee, "maxPriorityFeePerGas": 1}
    )
    t = tx(to=to, value=value, gas=gas, data=data, chainId=chain, **fees)
    want = model.verdict(t)
    got = signer.sign_transaction(t)
    assert got.approved is want, (t, got.reason)


def test_the_random_run_signed_what_the_model_counted(modelled: tuple[HostSigner, Model]) -> None:
    """After the property test: the rules' own record of spending equals the model's (not vacuous)."""
    signer, model = modelled
    if not model.spent:
        pytest.skip("run together with test_random_transactions_match_the_model")
    records = json.loads(signer.storage_get("armory.spent"))
    assert sorted(int(r["c"]) for r in records) == sorted(model.spent)
