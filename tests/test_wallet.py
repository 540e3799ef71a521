"""`./do wallet` with real parts: anvil and geth --dev as the node, the real agent with real Clef as
the armory, and the clients people use (cast, web3.py, ethers v6, viem), every send checked on the
node by its receipt. Refusals leave nothing signed that was not sent, and the endpoint keeps serving.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.typed_transactions import TypedTransaction
from eth_utils.address import to_checksum_address
from hexbytes import HexBytes
from web3 import HTTPProvider, Web3
from web3.exceptions import Web3RPCError

from clef_armory import config
from clef_armory.config import WalletSettings
from tests.agent_helpers import (
    REPO,
    AgentProcess,
    ClefState,
    attest_rules,
    free_port,
    make_clef_state,
    require_tool,
    rpc,
    running_agent,
    write_agent_config,
)
from tests.wallet_helpers import (
    Node,
    WalletThread,
    npm_tools,
    policy_rules,
    run_node_script,
    running_wallet,
    script_dir,
    wait_receipt,
)
from tests.wallet_helpers import rpc as node_rpc

pytestmark = pytest.mark.integration

Armory = tuple[AgentProcess, ClefState]

CHAIN_ID = 1337  # geth --dev's; anvil is started with it too, so one armory serves both nodes
RECIPIENT = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"
CONTRACT = "0xC0FfEE0000000000000000000000000000C0FfEE"  # the Counter the rules allow calls to
OUTSIDE = "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359"  # a recipient the rules do not allow
CAP_WEI = 10**18
# Caps the sends here fit: web3.py adds 100000 to its gas estimates (a plain send asks 121000, the
# Counter's bump about 145000: above the default max_gas of 100000); Counter's creation about 115000.
# The fees the wallet and the clients pick on anvil and geth --dev stay under 3 gwei.
MAX_GAS = 300_000
MAX_FEE_GWEI = 20

# The armory's signing policy, as a policy.yaml would give it; its rules.js is rendered and its
# signatures reach the agent's eth.method_signatures exactly as `./do provision --policy` does.
POLICY: dict[str, Any] = {
    "version": 2,
    "chain_ids": [CHAIN_ID],
    "recipients": [RECIPIENT],
    "max_value_wei": CAP_WEI,
    "max_fee_per_gas_gwei": str(MAX_FEE_GWEI),
    "max_gas": MAX_GAS,
    "allow_create": True,
    "calls": [{"contract": CONTRACT, "functions": ["bump(uint256)"]}],
    "allow_text_signing": True,
}
RULES, METHOD_SIGNATURES = policy_rules(POLICY, "wallet-test-policy.yaml")


# --- fixtures: tools, the armory, the nodes, the wallet ---


@pytest.fixture(scope="session")
def wallet_tools(settings: config.Settings) -> Path:
    """node_modules with anvil, cast, solc-js, ethers and viem (`npm ci` once per lockfile, cached)."""
    return npm_tools(settings.cache_path)


@pytest.fixture(scope="module")
def scripts(wallet_tools: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return script_dir(wallet_tools, tmp_path_factory.mktemp("wallet-js") / "js")


@pytest.fixture(scope="module")
def counter(scripts: Path) -> dict[str, Any]:
    """Counter.sol compiled by solc-js: abi, creation bytecode, runtime bytecode."""
    return dict(run_node_script(scripts, "compile.mjs"))


@contextlib.contextmanager
def an_armory(clef_binary: Path, root: Path, shape: str) -> Iterator[Armory]:
    """The real agent with real Clef on loopback, for chain 1337, with POLICY's rendered rules, unlocked;
    `shape` is its [eth] sign_transaction_result."""
    state = make_clef_state(clef_binary, root / "state", rules_text=None)
    attest_rules(clef_binary, state.state_dir, RULES, state.master_password)
    cfg_path = root / "agent.json"
    cfg = write_agent_config(cfg_path, clef_binary, state.state_dir)
    cfg["clef"]["chain_id"] = CHAIN_ID
    cfg["eth"] = {"sign_transaction_result": shape, "method_signatures": METHOD_SIGNATURES}
    cfg_path.write_text(json.dumps(cfg, indent=2))
    with running_agent(cfg_path) as agent:
        assert agent.unlock_cli(state.master_password).returncode == 0
        yield agent, state


@pytest.fixture(scope="module")
def armory(clef_binary: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Armory]:
    with an_armory(clef_binary, tmp_path_factory.mktemp("wallet-armory"), "raw") as both:
        yield both


def armory_url(agent: AgentProcess) -> str:
    return f"http://{agent.address}:{agent.port}"


@pytest.fixture(scope="module")
def anvil(wallet_tools: Path, counter: dict[str, Any], armory: Armory,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    node = Node.anvil(wallet_tools, CHAIN_ID, tmp_path_factory.mktemp("anvil") / "anvil.log")
    try:
        node_rpc(node.url, "anvil_setBalance", [armory[1].address, hex(100 * 10**18)])
        node_rpc(node.url, "anvil_setCode", [CONTRACT, counter["runtime"]])
        yield node
    finally:
        node.stop()


def settings_for(node_url: str, agent: AgentProcess, **extra: Any) -> WalletSettings:
    return WalletSettings(rpc=node_url, listen=f"127.0.0.1:{free_port()}", armory=armory_url(agent), **extra)


@pytest.fixture(scope="module")
def wallet(anvil: Node, armory: Armory) -> Iterator[WalletThread]:
    with running_wallet(settings_for(anvil.url, armory[0])) as w:
        yield w


def cast(tools: Path, *args: str) -> dict[str, Any]:
    proc = subprocess.run([str(tools / ".bin" / "cast"), *args, "--json"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


def checked_receipt(node: Node, tx_hash: str, sender: str) -> dict[str, Any]:
    """The receipt on the node: mined, successful, sent by the armory's account."""
    receipt = wait_receipt(node.url, tx_hash)
    assert receipt["status"] == "0x1", receipt
    assert receipt["from"].lower() == sender.lower()
    return receipt


def nonce_of(node: Node, tx_hash: str) -> int:
    return int(node_rpc(node.url, "eth_getTransactionByHash", [tx_hash])["nonce"], 16)


def signed_calls(agent: AgentProcess) -> int:
    """eth_signTransaction requests the armory has audited (each one reached Clef or was refused there)."""
    time.sleep(0.3)  # the audit writer is a background thread
    return sum(1 for x in agent.rpc_lines() if x["method"] == "eth_signTransaction")


def rpc_error(url: str, method: str, params: list[Any], **kw: Any) -> dict[str, Any]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    payload = {"jsonrpc": "2.0", "id": 7, "method": method, "params": params}
    _status, body = rpc(host, int(port), payload, **kw)
    assert "error" in body, body
    return dict(body["error"])


# --- the clients ---


def test_cast_send_unlocked(wallet: WalletThread, anvil: Node, armory: Armory,
                            wallet_tools: Path) -> None:
    me = armory[1].address
    receipt = cast(wallet_tools, "send", "--unlocked", "--from", me, "--rpc-url", wallet.url, RECIPIENT,
                   "--value", "0.01ether")
    checked = checked_receipt(anvil, receipt["transactionHash"], me)
    assert checked["to"].lower() == RECIPIENT.lower()
    assert any(r.tx_hash == receipt["transactionHash"] and "sent" in r.verdict for r in wallet.records)
    assert any(text.startswith(f"send {me} -> {RECIPIENT}, 0.01 ETH, fee cap ") and
               text.endswith(receipt["transactionHash"]) for text in wallet.lines)


def test_cast_send_create_with_solc_js(wallet: WalletThread, anvil: Node, armory: Armory,
                                       wallet_tools: Path, counter: dict[str, Any]) -> None:
    me = armory[1].address
    receipt = cast(wallet_tools, "send", "--unlocked", "--from", me, "--rpc-url", wallet.url, "--create",
                   counter["bytecode"])
    checked = checked_receipt(anvil, receipt["transactionHash"], me)
    code = node_rpc(anvil.url, "eth_getCode", [checked["contractAddress"], "latest"])
    assert code == counter["runtime"]


def test_web3_send_transaction_and_contract_transact(wallet: WalletThread, anvil: Node,
                                                     armory: Armory,
                                                     counter: dict[str, Any]) -> None:
    me = armory[1].address
    w3 = Web3(HTTPProvider(wallet.url, request_kwargs={"timeout": 120}))
    assert w3.eth.accounts == [me] and w3.eth.chain_id == CHAIN_ID
    tx_hash = w3.eth.send_transaction({"from": me, "to": RECIPIENT, "value": w3.to_wei(0.02, "ether")})
    checked_receipt(anvil, "0x" + bytes(tx_hash).hex(), me)

    contract = w3.eth.contract(address=to_checksum_address(CONTRACT), abi=counter["abi"])
    before = contract.functions.count().call()  # a read, forwarded to the node
    tx_hash = contract.functions.bump(5).transact({"from": me})
    receipt = checked_receipt(anvil, "0x" + bytes(tx_hash).hex(), me)
    assert receipt["to"].lower() == CONTRACT.lower() and len(receipt["logs"]) == 1
    assert contract.functions.count().call() == before + 5


def test_ethers_and_viem(wallet: WalletThread, anvil: Node, armory: Armory,
                         scripts: Path) -> None:
    me = armory[1].address
    report = run_node_script(scripts, "clients.mjs", {"url": wallet.url, "from": me, "to": RECIPIENT,
                                                       "chainId": CHAIN_ID, "ethers": 1, "viem": 1})
    assert "fatal" not in report, report["fatal"]
    assert len(report["ethers"]) == 1 and len(report["viem"]) == 1
    for tx_hash in report["ethers"] + report["viem"]:
        checked_receipt(anvil, tx_hash, me)


def test_five_parallel_sends_from_two_clients(wallet: WalletThread, anvil: Node,
                                              armory: Armory, scripts: Path) -> None:
    me = armory[1].address
    w3 = Web3(HTTPProvider(wallet.url, request_kwargs={"timeout": 120}))

    def web3_send(i: int) -> str:
        return "0x" + bytes(w3.eth.send_transaction({"from": me, "to": RECIPIENT, "value": 100 + i})).hex()

    with ThreadPoolExecutor(4) as pool:
        web3_hashes = [pool.submit(web3_send, i) for i in range(3)]
        node_report = pool.submit(run_node_script, scripts, "clients.mjs",
                                  {"url": wallet.url, "from": me, "to": RECIPIENT, "chainId": CHAIN_ID,
                                   "ethers": 2})
        hashes = [f.result() for f in web3_hashes]
        report = node_report.result()
    assert "fatal" not in report, report["fatal"]
    hashes += report["ethers"]
    assert len(set(hashes)) == 5
    nonces = sorted(nonce_of(anvil, h) for h in hashes)
    assert nonces == list(range(nonces[0], nonces[0] + 5)), nonces
    for h in hashes:
        checked_receipt(anvil, h, me)


def test_sign_transaction_fills_but_neither_sends_nor_reserves_the_nonce(wallet: WalletThread, anvil: Node,
                                                                        armory: Armory) -> None:
    _agent, state = armory
    host, port = wallet.url.removeprefix("http://").rsplit(":", 1)
    pending = int(node_rpc(anvil.url, "eth_getTransactionCount", [state.address, "pending"]), 16)
    call = {"jsonrpc": "2.0", "id": 1, "method": "eth_signTransaction",
            "params": [{"from": state.address, "to": RECIPIENT, "value": "0x5"}]}
    _status, body = rpc(host, int(port), call)
    raw = body["result"]  # the armory's shape, here sign_transaction_result = "raw"
    assert Account.recover_transaction(raw) == state.address
    decoded = TypedTransaction.from_bytes(HexBytes(raw)).as_dict()  # what the wallet filled in
    assert decoded["nonce"] == pending and decoded["chainId"] == CHAIN_ID
    assert decoded["gas"] == 21000 and decoded["maxFeePerGas"] > decoded["maxPriorityFeePerGas"] > 0
    assert anvil.pending_transactions() == 0
    assert wallet.lines[-1].endswith("not sent")
    w3 = Web3(HTTPProvider(wallet.url, request_kwargs={"timeout": 120}))
    sent = w3.eth.send_transaction({"from": state.address, "to": RECIPIENT, "value": 6})
    assert nonce_of(anvil, "0x" + bytes(sent).hex()) == pending


def test_batches_mix_node_and_armory_calls(wallet: WalletThread, anvil: Node, armory: Armory) -> None:
    _agent, state = armory
    host, port = wallet.url.removeprefix("http://").rsplit(":", 1)
    batch = [{"jsonrpc": "2.0", "id": "a", "method": "eth_blockNumber", "params": []},
             {"jsonrpc": "2.0", "id": "b", "method": "eth_accounts", "params": []},
             {"jsonrpc": "2.0", "id": "c", "method": "eth_chainId", "params": []},
             {"jsonrpc": "2.0", "id": "d", "method": "eth_getBalance", "params": [state.address, "latest"]},
             {"jsonrpc": "2.0", "method": "eth_blockNumber", "params": []},  # a notification: no answer
             {"jsonrpc": "2.0", "id": "e", "method": "no_such_method", "params": []}]
    _status, body = rpc(host, int(port), batch)
    by_id = {r["id"]: r for r in body}
    assert sorted(by_id) == ["a", "b", "c", "d", "e"]
    assert by_id["b"]["result"] == [state.address] and by_id["c"]["result"] == hex(CHAIN_ID)
    assert int(by_id["d"]["result"], 16) > 0 and by_id["a"]["result"].startswith("0x")
    assert by_id["e"]["error"]["code"] == -32601  # the node's own answer


# --- refusals: one clear error each, nothing signed that was not sent, the endpoint keeps serving ---


def _word(value: int | str) -> str:
    return (value[2:].lower() if isinstance(value, str) else f"{value:x}").rjust(64, "0")


MAX_FEE_WEI = MAX_FEE_GWEI * 10**9
# transfer(address,uint256): a selector Clef decodes (so the rules run), not listed for the Counter
UNLISTED_CALL = "0xa9059cbb" + _word(RECIPIENT) + _word(1)
REFUSALS = {  # what is sent -> the rendered rules' reason (Clef's log: "clef-armory: Reject: ...")
    "recipient": ({"to": OUTSIDE, "value": 1}, f"recipient {OUTSIDE.lower()} is not listed"),
    "cap": ({"to": RECIPIENT, "value": CAP_WEI + 1}, f"value {CAP_WEI + 1} wei above the cap of {CAP_WEI}"),
    "gas": ({"to": RECIPIENT, "value": 1, "gas": MAX_GAS + 1},
            f"gas {MAX_GAS + 1} above the cap of {MAX_GAS}"),
    "fee": ({"to": RECIPIENT, "value": 1, "maxFeePerGas": MAX_FEE_WEI + 1, "maxPriorityFeePerGas": 10**9},
            f"fee per gas {MAX_FEE_WEI + 1} wei above the cap of {MAX_FEE_WEI}"),
    "call": ({"to": to_checksum_address(CONTRACT), "value": 0, "gas": 60_000, "data": UNLISTED_CALL},
             f"function 0xa9059cbb of {CONTRACT.lower()} is not listed"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_policy_refusal_is_4001_and_nothing_is_broadcast(wallet: WalletThread, anvil: Node,
                                                         armory: Armory, case: str) -> None:
    agent, state = armory
    sent, reason = REFUSALS[case]
    w3 = Web3(HTTPProvider(wallet.url, request_kwargs={"timeout": 120}))
    nonce = w3.eth.get_transaction_count(state.address, "pending")
    block = w3.eth.block_number
    log_mark = len(agent.log_text())
    with pytest.raises(Web3RPCError) as e:
        w3.eth.send_transaction({"from": state.address, **sent})  # type: ignore[typeddict-item]
    assert e.value.rpc_response is not None
    assert e.value.rpc_response["error"]["code"] == 4001
    assert "rules rejected" in e.value.rpc_response["error"]["message"]
    assert anvil.pending_transactions() == 0
    assert w3.eth.get_transaction_count(state.address, "pending") == nonce and w3.eth.block_number == block
    assert wallet.lines[-1].endswith("refused by the armory (User denied: the signer's rules rejected the "
                                     "request)")
    # it was the rendered rules that refused, for this reason (Clef's log, through the agent's)
    agent.wait_for(lambda: f"clef-armory: Reject: {reason}" in agent.log_text()[log_mark:], 10,
                   f"the rules' reason {reason!r} in the agent's log")
    # the next allowed send takes the nonce the refused one would have had: no gap
    tx_hash = w3.eth.send_transaction({"from": state.address, "to": RECIPIENT, "value": 1})
    assert nonce_of(anvil, "0x" + bytes(tx_hash).hex()) == nonce


def test_chain_id_mismatch_signs_nothing(wallet: WalletThread, anvil: Node,
                                         armory: Armory) -> None:
    agent, state = armory
    before = signed_calls(agent)
    node_rpc(anvil.url, "anvil_setChainId", [31337])
    try:
        err = rpc_error(wallet.url, "eth_sendTransaction", [{"from": state.address, "to": RECIPIENT,
                                                              "value": "0x1"}])
        assert err["code"] == -32021
        assert "node at" in err["message"] and "chain 31337" in err["message"]
        assert "the armory signs for chain 1337" in err["message"]
        assert rpc_error(wallet.url, "eth_chainId", [])["code"] == -32021
    finally:
        node_rpc(anvil.url, "anvil_setChainId", [CHAIN_ID])
    assert signed_calls(agent) == before
    assert anvil.pending_transactions() == 0


def test_locked_armory(wallet: WalletThread, anvil: Node, armory: Armory) -> None:
    agent, state = armory
    agent.control({"cmd": "lock"})
    try:
        agent.wait_for(lambda: agent.status()["state"] == "locked", 30, "agent locked")
        err = rpc_error(wallet.url, "eth_sendTransaction", [{"from": state.address, "to": RECIPIENT,
                                                              "value": "0x1"}])
        assert err["code"] == -32010 and err["message"].startswith("locked: run ./do unlock")
        assert anvil.pending_transactions() == 0
        host, port = wallet.url.removeprefix("http://").rsplit(":", 1)  # reads still work
        _status, body = rpc(host, int(port), {"jsonrpc": "2.0", "id": 1, "method": "eth_blockNumber",
                                              "params": []})
        assert body["result"].startswith("0x")
    finally:
        assert agent.unlock_cli(state.master_password).returncode == 0
    w3 = Web3(HTTPProvider(wallet.url, request_kwargs={"timeout": 120}))
    checked_receipt(anvil, "0x" + bytes(w3.eth.send_transaction({"from": state.address, "to": RECIPIENT,
                                                                 "value": 3})).hex(), state.address)


def test_unreachable_node(wallet_tools: Path, armory: Armory, tmp_path: Path) -> None:
    agent, state = armory
    node = Node.anvil(wallet_tools, CHAIN_ID, tmp_path / "anvil.log")
    before = signed_calls(agent)
    with running_wallet(settings_for(node.url, agent)) as w:
        node.stop()
        send = {"from": state.address, "to": RECIPIENT, "value": "0x1"}
        err = rpc_error(w.url, "eth_sendTransaction", [send])
        assert err["code"] == -32020 and f"node at {node.url} is unreachable" in err["message"]
        assert rpc_error(w.url, "eth_blockNumber", [])["code"] == -32020
        host, port = w.url.removeprefix("http://").rsplit(":", 1)  # the armory's side still answers
        accounts = {"jsonrpc": "2.0", "id": 1, "method": "eth_accounts", "params": []}
        _status, body = rpc(host, int(port), accounts)
        assert body["result"] == [state.address]
    assert signed_calls(agent) == before


class _Garbage(http.server.BaseHTTPRequestHandler):
    """A node that answers eth_chainId (so the wallet starts) and garbage to everything else."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if isinstance(body, dict) and body.get("method") == "eth_chainId":
            out = json.dumps({"jsonrpc": "2.0", "id": body["id"], "result": hex(CHAIN_ID)}).encode()
        else:
            out = b"<html>502 upstream gone</html>"
        self.send_response(200)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: Any) -> None:
        pass


def test_garbage_node(armory: Armory) -> None:
    agent, state = armory
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Garbage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    before = signed_calls(agent)
    try:
        with running_wallet(settings_for(f"http://127.0.0.1:{server.server_address[1]}", agent)) as w:
            for method, params in (("eth_sendTransaction", [{"from": state.address, "to": RECIPIENT}]),
                                   ("eth_getBalance", [state.address, "latest"])):
                err = rpc_error(w.url, method, params)
                assert err["code"] == -32020 and "answered something that is not JSON-RPC" in err["message"]
    finally:
        server.shutdown()
    assert signed_calls(agent) == before


def test_start_refuses_a_node_on_another_chain(wallet_tools: Path, armory: Armory,
                                              tmp_path: Path) -> None:
    from clef_armory.errors import WalletError

    node = Node.anvil(wallet_tools, 31337, tmp_path / "anvil.log")
    try:
        with pytest.raises(WalletError, match=r"on chain 31337, the armory signs for chain 1337"):
            WalletThread(settings_for(node.url, armory[0]))
    finally:
        node.stop()


# --- the guard: requests as a browser page would send them ---


def test_browser_requests_are_refused(wallet: WalletThread, armory: Armory) -> None:
    agent, state = armory
    host, port = wallet.url.removeprefix("http://").rsplit(":", 1)
    call = {"jsonrpc": "2.0", "id": 1, "method": "eth_sendTransaction",
            "params": [{"from": state.address, "to": RECIPIENT, "value": "0x1"}]}
    before = signed_calls(agent)
    # a form/fetch "simple request": text/plain needs no CORS preflight
    status, body = rpc(host, int(port), call, headers={"Content-Type": "text/plain;charset=UTF-8",
                                                        "Origin": "null"})
    assert status == 403 and body["error"]["message"] == "Origin not allowed"
    status, body = rpc(host, int(port), call, headers={"Content-Type": "text/plain;charset=UTF-8"})
    assert status == 415
    # DNS rebinding: the page's own host name in Host
    status, body = rpc(host, int(port), call, host_header=f"attacker.example:{port}")
    assert status == 403 and body["error"]["message"] == "Host not allowed"
    # a page with JSON (after a preflight it would not get): its Origin is refused
    status, body = rpc(host, int(port), call, headers={"Origin": "https://evil.example"})
    assert status == 403
    status, body = rpc(host, int(port), call, host_header=f"localhost:{port}",
                       headers={"Origin": f"http://localhost:{port}"})
    assert status == 403
    assert signed_calls(agent) == before


def test_allowed_origin_is_forwarded_to_the_armory(anvil: Node, armory: Armory) -> None:
    """The wallet may allow an origin; the armory still sees it (and its own policy refuses it here)."""
    agent, state = armory
    with running_wallet(settings_for(anvil.url, agent, origins=("https://app.example",))) as w:
        host, port = w.url.removeprefix("http://").rsplit(":", 1)
        call = {"jsonrpc": "2.0", "id": 1, "method": "personal_sign", "params": ["0x68690a", state.address]}
        status, body = rpc(host, int(port), call, headers={"Origin": "https://app.example"})
        assert status == 200 and body["error"] == {"code": -32003, "message": "Origin not allowed"}
        agent.wait_for(lambda: any(x["origin"] == "https://app.example" for x in agent.rpc_lines()), 10,
                       "the armory audited the forwarded Origin")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)  # a browser's CORS preflight
        conn.request("OPTIONS", "/", headers={"Host": f"{host}:{port}", "Origin": "https://app.example",
                                              "Access-Control-Request-Method": "POST"})
        preflight = conn.getresponse()
        assert preflight.status == 204
        assert preflight.getheader("Access-Control-Allow-Origin") == "https://app.example"
        conn.close()
        status, body = rpc(host, int(port), call)  # without one, the signature is made
        assert status == 200 and len(body["result"]) == 132


def test_an_armory_answering_objects(clef_binary: Path, anvil: Node, tmp_path: Path) -> None:
    """sign_transaction_result = "object" (geth's {raw, tx}): sends work the same, and web3.py's own
    sign_transaction, which expects that shape, gets it through the wallet."""
    with an_armory(clef_binary, tmp_path, "object") as (agent, state):
        node_rpc(anvil.url, "anvil_setBalance", [state.address, hex(10**19)])
        with running_wallet(settings_for(anvil.url, agent)) as w:
            w3 = Web3(HTTPProvider(w.url, request_kwargs={"timeout": 120}))
            sent = w3.eth.send_transaction({"from": state.address, "to": RECIPIENT, "value": 7})
            checked_receipt(anvil, "0x" + bytes(sent).hex(), state.address)
            signed = w3.eth.sign_transaction({"from": state.address, "to": RECIPIENT, "value": 8})  # type: ignore[typeddict-item]
            assert Account.recover_transaction(bytes(signed["raw"])) == state.address
            assert signed["tx"]["nonce"] == 1 and anvil.pending_transactions() == 0


def test_legacy_fees_on_a_chain_without_base_fee(wallet_tools: Path, armory: Armory, tmp_path: Path) -> None:
    agent, state = armory
    node = Node.anvil(wallet_tools, CHAIN_ID, tmp_path / "anvil.log", hardfork="berlin")
    try:
        assert "baseFeePerGas" not in node_rpc(node.url, "eth_getBlockByNumber", ["latest", False])
        node_rpc(node.url, "anvil_setBalance", [state.address, hex(10**19)])
        with running_wallet(settings_for(node.url, agent)) as w:  # no fee fields: the wallet picks them
            host, port = w.url.removeprefix("http://").rsplit(":", 1)
            _status, body = rpc(host, int(port), {"jsonrpc": "2.0", "id": 1, "method": "eth_sendTransaction",
                                                  "params": [{"from": state.address, "to": RECIPIENT}]})
            sent = body["result"]
            checked_receipt(node, sent, state.address)
        tx = node_rpc(node.url, "eth_getTransactionByHash", [sent])
        assert tx["type"] == "0x0" and int(tx["gasPrice"], 16) > 0 and "maxFeePerGas" not in tx
    finally:
        node.stop()


# --- geth --dev as the node ---


def test_geth_dev(geth_binary: Path, wallet_tools: Path, armory: Armory,
                  counter: dict[str, Any], tmp_path: Path) -> None:
    agent, state = armory
    node = Node.geth_dev(geth_binary, tmp_path / "geth", tmp_path / "geth.log")
    try:
        assert node.chain_id == CHAIN_ID
        dev = node_rpc(node.url, "eth_accounts")[0]
        funding = node_rpc(node.url, "eth_sendTransaction", [{"from": dev, "to": state.address,
                                                               "value": hex(10**19)}])
        wait_receipt(node.url, funding)
        with running_wallet(settings_for(node.url, agent)) as w:
            w3 = Web3(HTTPProvider(w.url, request_kwargs={"timeout": 120}))
            first = "0x" + bytes(w3.eth.send_transaction({"from": state.address, "to": RECIPIENT,
                                                          "value": 10**15})).hex()
            # cast fills the nonce itself from eth_getTransactionCount(..., "latest") and the wallet keeps a
            # given nonce: on geth, which mines a moment after the send returns, cast must wait for the
            # first transaction to be mined (it would take nonce 0 again; CI saw "nonce too low").
            wait_receipt(node.url, first)
            created = cast(wallet_tools, "send", "--unlocked", "--from", state.address, "--rpc-url", w.url,
                           "--create", counter["bytecode"])["transactionHash"]
            receipts = [checked_receipt(node, h, state.address) for h in (first, created)]
            assert [nonce_of(node, h) for h in (first, created)] == [0, 1]
            assert node_rpc(node.url, "eth_getCode", [receipts[1]["contractAddress"], "latest"]) == \
                counter["runtime"]
    finally:
        node.stop()


# --- docs/clients.md's commands as written (only the node, wallet and armory addresses differ) ---

DOC_NODE, DOC_WALLET = "http://127.0.0.1:8545", "http://127.0.0.1:8552"


def doc_blocks() -> dict[str, list[str]]:
    """The fenced blocks of the `./do wallet` section of docs/clients.md, by sub-heading."""
    text = (REPO / "docs" / "clients.md").read_text()
    section = text[text.index("## Sending through `./do wallet`"):]
    out: dict[str, list[str]] = {}
    heading = ""
    for part in re.split(r"^(### .+)$", section, flags=re.MULTILINE):
        if part.startswith("### "):
            heading = part[4:].strip()
            continue
        out.setdefault(heading, []).extend(re.findall(r"^```(?:sh|python|js)\n(.*?)^```", part,
                                                      flags=re.MULTILINE | re.DOTALL))
    return out


def _hash(output: str) -> str:
    found = re.findall(r"0x[0-9a-f]{64}", output)
    assert found, output
    return found[-1]


def test_docs_commands_as_written(anvil: Node, armory: Armory, wallet_tools: Path, scripts: Path,
                                  counter: dict[str, Any]) -> None:
    agent, state = armory
    blocks = doc_blocks()
    start = shlex.split(blocks[""][0].strip())
    assert start[:2] == ["./do", "wallet"]
    wallet_url = f"http://127.0.0.1:{free_port()}"
    argv = [sys.executable, "-m", "invoke", *start[1:], "--listen", wallet_url.removeprefix("http://"),
            "--armory", armory_url(agent)]
    argv = [a.replace(DOC_NODE, anvil.url) for a in argv]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        while not any(x.startswith("wallet: ") for x in lines):
            lines.append(proc.stdout.readline())
            assert lines[-1] or proc.poll() is None, "".join(lines)

        def ours(text: str) -> str:
            return (text.replace(DOC_WALLET, wallet_url).replace("0xYOURADDRESS", state.address)
                    .replace("0xBYTECODE", counter["bytecode"]))

        hashes = []
        for command in blocks["cast"][0].strip().splitlines():
            cast_argv = shlex.split(ours(command))
            assert cast_argv[0] == "cast"
            done = subprocess.run([str(wallet_tools / ".bin" / "cast"), *cast_argv[1:]], capture_output=True,
                                  text=True, timeout=120, check=False)
            assert done.returncode == 0, done.stderr
            hashes.append(_hash(done.stdout))
        done = subprocess.run([sys.executable, "-c", ours(blocks["web3.py"][0])], capture_output=True,
                              text=True, timeout=120, check=False, cwd=REPO)
        assert done.returncode == 0 and done.stdout.startswith("1 0x"), done.stderr
        hashes.append(_hash(done.stdout))
        for name, heading, ok in (("doc_ethers.mjs", "ethers.js (v6)", "1 0x"), ("doc_viem.mjs", "viem",
                                                                                  "success 0x")):
            (scripts / name).write_text(ours(blocks[heading][0]))
            done = subprocess.run([require_tool("node"), str(scripts / name)], capture_output=True, text=True,
                                  timeout=120, check=False, cwd=scripts)
            assert done.returncode == 0 and done.stdout.startswith(ok), done.stderr
            hashes.append(_hash(done.stdout))
        receipts = [checked_receipt(anvil, h, state.address) for h in hashes]
        assert receipts[1]["contractAddress"] and receipts[0]["to"].lower() == RECIPIENT.lower()
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
    output = "".join(lines) + rest
    assert proc.returncode == 0, output
    assert output.count(", sent 0x") == 5 and output.rstrip().endswith("wallet stopped"), output


# --- every transaction the armory's account made on anvil, by any wallet in this module: no gaps ---


def test_anvil_nonces_have_no_gaps(anvil: Node, armory: Armory) -> None:
    me = armory[1].address.lower()
    nonces = []
    for number in range(int(node_rpc(anvil.url, "eth_blockNumber"), 16) + 1):
        block = node_rpc(anvil.url, "eth_getBlockByNumber", [hex(number), True])
        nonces += [int(tx["nonce"], 16) for tx in block["transactions"] if tx["from"].lower() == me]
    count = int(node_rpc(anvil.url, "eth_getTransactionCount", [me, "latest"]), 16)
    assert nonces == list(range(count)) and count >= 5, nonces
