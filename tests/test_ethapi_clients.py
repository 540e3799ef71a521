"""Real wallet clients against the agent and the real Clef: web3.py and ethers.js v6 (from npm).

Each client uses its ordinary API (no hand-written JSON-RPC where the library has a call),
and every signature is verified independently: by eth-account here, and by ethers' own
recovery inside the node script. Two agents run: one answering eth_signTransaction with the
signed transaction hex (ethers, the default) and one with geth's {raw, tx} object (web3.py).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import rlp  # type: ignore[import-untyped]
from eth_account import Account
from eth_account.messages import encode_defunct, encode_typed_data
from eth_utils import keccak, to_checksum_address
from web3 import HTTPProvider, Web3
from web3.exceptions import Web3RPCError

from armory_agent.config import DEFAULT_METHODS
from tests.agent_helpers import (
    REPO,
    AgentProcess,
    ClefState,
    call,
    make_clef_state,
    require_tool,
    running_agent,
    write_agent_config,
)

pytestmark = pytest.mark.integration

JS_DIR = REPO / "tests" / "js"
CHAIN_ID = 11155111  # not mainnet, so chain-id handling is really exercised
TOKEN = "0x07a565b7ed7d7a678680a4c162885bedbb695fe0"  # lower case on purpose
RECIPIENT = "0xbBbBBBBbbBBBbbbBbbBbbbbBBbBbbbbBbBbbBBbB"
OPERATOR_SIGNATURE = "armoryPing(uint256)"  # not in Clef's 4byte database

# Test-only rules: approve listing, text and typed data, and every transaction except value 42.
RULES = """\
function ApproveListing(req) { return "Approve" }
function ApproveTx(req) {
  if (req.transaction.value == "0x2a") { return "Reject" }
  return "Approve"
}
function ApproveSignData(req) {
  if (req.content_type == "text/plain" || req.content_type == "data/typed") { return "Approve" }
  return "Reject"
}
function OnSignerStartup(info) {}
function OnApprovedTx(resp) {}
"""

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
        "chainId": CHAIN_ID,
        "verifyingContract": "0xCcCCccccCCCCcCCCCCCcCcCccCcCCCcCcccccccC",
    },
    "message": {
        "from": {"name": "Cow", "wallet": "0xCD2a3d9F938E13CD947Ec05AbC7FE734Df8DD826"},
        "to": {"name": "Bob", "wallet": RECIPIENT},
        "contents": "Hello, Bob!",
    },
}


def start_agent(
    clef_binary: Path, root: Path, shape: str, policy: dict[str, Any] | None = None
) -> tuple[ClefState, Path]:
    state = make_clef_state(clef_binary, root / "state", rules_text=RULES)
    config = root / "agent.json"
    cfg = write_agent_config(config, clef_binary, state.state_dir, policy=policy)
    cfg["clef"]["chain_id"] = CHAIN_ID
    cfg["eth"] = {"sign_transaction_result": shape, "method_signatures": [OPERATOR_SIGNATURE]}
    config.write_text(json.dumps(cfg, indent=2))
    return state, config


@pytest.fixture(scope="module")
def raw_agent(
    clef_binary: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[AgentProcess, ClefState]]:
    state, config = start_agent(clef_binary, tmp_path_factory.mktemp("eth-raw"), "raw")
    with running_agent(config) as agent:
        assert agent.unlock_cli(state.master_password).returncode == 0
        yield agent, state


@pytest.fixture(scope="module")
def object_agent(
    clef_binary: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[AgentProcess, ClefState]]:
    # eth_signTypedData_v3 left out of the allowlist: it must be refused with 4100.
    methods = [m for m in DEFAULT_METHODS if m != "eth_signTypedData_v3"]
    root = tmp_path_factory.mktemp("eth-object")
    state, config = start_agent(clef_binary, root, "object", {"methods": methods})
    with running_agent(config) as agent:
        assert agent.unlock_cli(state.master_password).returncode == 0
        yield agent, state


def web3_for(agent: AgentProcess) -> Web3:
    return Web3(HTTPProvider(f"http://{agent.address}:{agent.port}", request_kwargs={"timeout": 60}))


def clef_audit_size(state: ClefState) -> int:
    return (state.state_dir / "clef-audit.log").stat().st_size


def audit_has(agent: AgentProcess, predicate: Any, what: str) -> None:
    """Wait for the agent's audit writer (a background thread) to show a matching rpc line."""
    agent.wait_for(lambda: any(predicate(x) for x in agent.rpc_lines()), 10, what)


def decode_legacy(raw: bytes) -> dict[str, Any]:
    nonce, gas_price, gas, to, value, data, v, _r, _s = rlp.decode(raw)
    return {
        "nonce": int.from_bytes(nonce, "big"),
        "gasPrice": int.from_bytes(gas_price, "big"),
        "gas": int.from_bytes(gas, "big"),
        "to": to_checksum_address(to),
        "value": int.from_bytes(value, "big"),
        "data": bytes(data),
        "chainId": (int.from_bytes(v, "big") - 35) // 2,
    }


# --- web3.py ---


def test_web3_accounts_and_chain(object_agent: tuple[AgentProcess, ClefState]) -> None:
    agent, state = object_agent
    w3 = web3_for(agent)
    assert w3.eth.accounts == [state.address]
    assert w3.eth.chain_id == CHAIN_ID


def test_web3_eth_sign_and_personal_sign(object_agent: tuple[AgentProcess, ClefState]) -> None:
    agent, state = object_agent
    w3 = web3_for(agent)
    signature = w3.eth.sign(state.address, text="clef-armory eth_sign from web3.py")
    message = encode_defunct(text="clef-armory eth_sign from web3.py")
    assert Account.recover_message(message, signature=signature) == state.address

    data = "0x" + b"personal_sign from web3.py".hex()
    reply = w3.provider.make_request("personal_sign", [data, state.address.lower()])  # type: ignore[arg-type]
    message = encode_defunct(text="personal_sign from web3.py")
    assert Account.recover_message(message, signature=reply["result"]) == state.address


def test_web3_sign_typed_data(object_agent: tuple[AgentProcess, ClefState]) -> None:
    agent, state = object_agent
    w3 = web3_for(agent)
    signature = w3.eth.sign_typed_data(state.address, MAIL)
    assert Account.recover_message(encode_typed_data(full_message=MAIL), signature=signature) == state.address


def test_web3_sign_transaction_legacy(object_agent: tuple[AgentProcess, ClefState]) -> None:
    agent, state = object_agent
    w3 = web3_for(agent)
    tx = {
        "from": state.address,
        "to": to_checksum_address(TOKEN),
        "value": 10**15,
        "gas": 21000,
        "gasPrice": 2 * 10**9,
        "nonce": 3,
    }
    signed = w3.eth.sign_transaction(tx)  # type: ignore[arg-type]
    raw = bytes(signed["raw"])
    assert Account.recover_transaction(raw) == state.address
    fields = decode_legacy(raw)
    assert fields == {
        "nonce": 3,
        "gasPrice": 2 * 10**9,
        "gas": 21000,
        "to": to_checksum_address(TOKEN),
        "value": 10**15,
        "data": b"",
        "chainId": CHAIN_ID,
    }
    assert bytes(signed["tx"]["hash"]) == keccak(raw)


def test_web3_sign_transaction_eip1559_with_operator_selector(
    object_agent: tuple[AgentProcess, ClefState],
) -> None:
    """A selector only the operator's [eth] method_signatures knows: signed via eth_*, refused raw."""
    agent, state = object_agent
    w3 = web3_for(agent)
    data = keccak(text=OPERATOR_SIGNATURE)[:4] + (77).to_bytes(32, "big")
    tx = {
        "from": state.address,
        "to": to_checksum_address(TOKEN),
        "value": 0,
        "gas": 50000,
        "maxFeePerGas": 3 * 10**10,
        "maxPriorityFeePerGas": 10**9,
        "nonce": 4,
        "chainId": CHAIN_ID,
        "data": data,
    }
    # Straight to account_signTransaction, without the signature, Clef refuses the calldata ...
    plain = {k: hex(v) if isinstance(v, int) else v for k, v in tx.items()}
    plain["data"] = "0x" + data.hex()
    _, body = call(agent.address, agent.port, "account_signTransaction", [plain])
    assert "signature could not be found" in body["error"]["message"]

    # ... through eth_signTransaction the agent sends it as methodSelector and Clef signs.
    signed = w3.eth.sign_transaction(tx)  # type: ignore[arg-type]
    raw = bytes(signed["raw"])
    assert raw[0] == 2
    assert Account.recover_transaction(raw) == state.address
    assert bytes(signed["tx"]["input"]) == data


def test_web3_errors(object_agent: tuple[AgentProcess, ClefState]) -> None:
    agent, state = object_agent
    w3 = web3_for(agent)
    base = {
        "from": state.address,
        "to": to_checksum_address(TOKEN),
        "gas": 21000,
        "gasPrice": 10**9,
        "nonce": 5,
    }
    with pytest.raises(Web3RPCError) as e:  # rejected by the rules
        w3.eth.sign_transaction({**base, "value": 42})  # type: ignore[arg-type]
    assert e.value.rpc_response is not None and e.value.rpc_response["error"]["code"] == 4001

    before = clef_audit_size(state)
    with pytest.raises(Web3RPCError) as e:  # another chain than the signer's: bad params
        w3.eth.sign_transaction({**base, "chainId": 1, "value": 1})  # type: ignore[arg-type]
    assert e.value.rpc_response is not None and e.value.rpc_response["error"]["code"] == -32602
    reply = w3.provider.make_request("eth_signTypedData_v3", [state.address, MAIL])  # type: ignore[arg-type]
    assert reply["error"]["code"] == 4100  # not in this agent's allowlist
    reply = w3.provider.make_request("eth_sendTransaction", [{**base, "value": "0x1"}])  # type: ignore[arg-type]
    assert reply["error"]["code"] == 4200 and "eth_sendRawTransaction" in reply["error"]["message"]
    reply = w3.provider.make_request("eth_getBalance", [state.address, "latest"])  # type: ignore[arg-type]
    assert reply["error"]["code"] == -32601
    assert clef_audit_size(state) == before  # none of these reached Clef

    other = "0x" + "11" * 20
    with pytest.raises(Web3RPCError) as e:  # Clef itself says it has no such key
        w3.eth.sign(other, text="x")
    assert e.value.rpc_response is not None and e.value.rpc_response["error"]["code"] == 4100
    assert clef_audit_size(state) > before

    for name in ("eth_accounts", "eth_chainId", "eth_sign", "personal_sign", "eth_signTypedData"):
        audit_has(agent, lambda x, n=name: x["method"] == n, f"{name} audited")
    audit_has(  # the rejection is in the audit log with its EIP-1193 code
        agent, lambda x: x["method"] == "eth_signTransaction" and x["error"] == 4001, "4001 audited"
    )
    audit_has(agent, lambda x: x["method"] == "eth_sendTransaction" and x["error"] == 4200, "4200")


def test_policy_applies_to_eth_methods(object_agent: tuple[AgentProcess, ClefState]) -> None:
    agent, state = object_agent
    before = clef_audit_size(state)
    status, body = call(
        agent.address,
        agent.port,
        "personal_sign",
        ["0x00", state.address],
        headers={"Origin": "http://evil.test"},
    )
    assert status == 403 and body["error"]["message"] == "Origin not allowed"
    status, _ = call(agent.address, agent.port, "eth_accounts", [], host_header="attacker.test:8550")
    assert status == 403
    assert clef_audit_size(state) == before
    audit_has(agent, lambda x: x["origin"] == "http://evil.test" and x["status"] == 403, "Origin")
    audit_has(agent, lambda x: x["error"] == "Host not allowed", "Host denial audited")


# --- ethers.js v6 ---


def ensure_node_modules() -> None:
    """`npm ci` from the lockfile when a fresh clone has no node_modules yet."""
    if (JS_DIR / "node_modules" / "ethers" / "package.json").exists():
        return
    npm = require_tool("npm")
    subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"], cwd=JS_DIR, check=True, timeout=600, capture_output=True
    )


def test_ethers_v6_signer(raw_agent: tuple[AgentProcess, ClefState]) -> None:
    agent, state = raw_agent
    node = require_tool("node")
    ensure_node_modules()
    request = {
        "url": f"http://{agent.address}:{agent.port}",
        "address": state.address,
        "chainId": CHAIN_ID,
        "token": to_checksum_address(TOKEN),
        "recipient": RECIPIENT,
    }
    proc = subprocess.run(
        [node, str(JS_DIR / "ethers_client.mjs")],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=JS_DIR,
        env={"PATH": os.environ.get("PATH", "")},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert "fatal" not in report, report["fatal"]

    assert report["chainId"] == str(CHAIN_ID)
    assert report["accounts"] == [state.address] and report["signer"] == state.address

    # ethers' own verification ...
    assert report["messageRecovered"] == state.address
    assert report["typedRecovered"] == state.address
    assert report["legacy"]["from"] == state.address
    assert report["erc20"]["from"] == state.address
    # ... and an independent one with eth-account.
    message = encode_defunct(text=report["message"])
    assert Account.recover_message(message, signature=report["messageSignature"]) == state.address
    for kind in ("legacy", "erc20"):
        assert Account.recover_transaction(report[kind]["raw"]) == state.address

    legacy = report["legacy"]
    assert legacy["to"] == to_checksum_address(TOKEN) and legacy["value"] == "1000"
    assert legacy["nonce"] == 7 and legacy["chainId"] == str(CHAIN_ID) and legacy["type"] == 0
    erc20 = report["erc20"]
    assert erc20["type"] == 2 and erc20["chainId"] == str(CHAIN_ID)
    assert erc20["data"].startswith("0xa9059cbb")

    assert report["rejected"] == {"code": "ACTION_REJECTED", "rpcCode": 4001}
    assert report["send"]["rpcCode"] == 4200

    def names(line: dict[str, Any]) -> list[Any]:  # ethers batches calls: method may be a list
        return line["method"] if isinstance(line["method"], list) else [line["method"]]

    for name in (
        "eth_chainId",
        "eth_accounts",
        "personal_sign",
        "eth_signTypedData_v4",
        "eth_signTransaction",
    ):
        audit_has(agent, lambda x, n=name: n in names(x), f"{name} audited")
