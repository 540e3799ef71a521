"""`./do policy check`, provision's sample table, the master-password reset, and the rules' own
strict decoding with nothing in front of them (node runs the rendered rules.js directly)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from armory_agent import device_admin
from armory_agent.keccak import selector
from clef_armory import config
from provision import policy, policycheck, rules
from tests.agent_helpers import require_tool
from tests.test_policy_rules import GWEI, R1, RICH, STRANGER, TOKEN, erc20_call, tx, word_address

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent


def test_policy_check_task_runs_samples_in_order_at_device_times(tmp_path: Path) -> None:
    pol = tmp_path / "policy.yaml"
    pol.write_text(
        json.dumps(
            {"recipients": [R1], "max_value_eth": "0.05", "limits": [{"window": "24h", "max_eth": "0.06"}]}
        )
    )
    one = {k: v for k, v in tx(value=5 * 10**16).items() if k != "chainId"}
    (tmp_path / "txs.json").write_text(json.dumps([one, {**one, "nonce": "0x1", "at": "1h"},
                                                   {**one, "nonce": "0x2", "at": "25h"}]))  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-m", "invoke", "policy", "check", str(pol), "--tx", str(tmp_path / "txs.json"),
         "--message", "hello"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    rows = {line.split()[0]: line for line in run.stdout.splitlines() if line.startswith(("txs", "message"))}
    assert "Approve" in rows["txs.json[0]"]
    assert "Reject" in rows["txs.json[1]"] and "would be exceeded" in rows["txs.json[1]"]
    assert "Approve" in rows["txs.json[2]"]  # 25 h of device time later the window is empty again
    assert "Reject" in rows["message"] and "text signing is not allowed" in rows["message"]
    assert "limit: 0.06 ETH per 24h of the device being on" in run.stdout  # the policy in words
    bad = subprocess.run([sys.executable, "-m", "invoke", "policy", "check", str(tmp_path / "nope.yaml")],
                         cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
                         env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert bad.returncode != 0 and "cannot read policy file" in bad.stderr + bad.stdout
    assert "Traceback" not in bad.stderr


def test_policy_check_runs_clef_on_the_devices_chain(tmp_path: Path) -> None:
    """--chain-id is the chain the device's Clef signs for: the throw-away Clef runs on it too, so a
    sample for that chain gets the policy's verdict (before, Clef ran on the policy's first chain)."""
    pol = tmp_path / "policy.yaml"
    pol.write_text(json.dumps({"chain_ids": [1, 1337], "recipients": [R1], "max_value_eth": "0.05"}))
    (tmp_path / "tx.json").write_text(json.dumps({**tx(value=10**16), "chainId": hex(1337)}))
    verdicts = {}
    for extra in (["--chain-id", "1337"], []):
        run = subprocess.run(
            [sys.executable, "-m", "invoke", "policy", "check", str(pol), "--tx", str(tmp_path / "tx.json"),
             *extra],
            cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        (row,) = [line for line in run.stdout.splitlines() if line.startswith("tx.json")]
        verdicts[" ".join(extra) or "policy's first chain"] = row
    assert "Approve" in verdicts["--chain-id 1337"], verdicts
    assert "Approve" not in verdicts["policy's first chain"], verdicts


def test_provision_sample_table(clef_binary: Path) -> None:
    pol = policy.parse(RICH)
    text = policycheck.sample_table(clef_binary, pol, "policy.yaml")
    rows = {line[:35].strip(): line[35:] for line in text.splitlines()[2:]}
    assert rows["allowed transfer"].startswith("Approve")
    for name, why in [
        ("above the value cap", "above the cap"),
        ("fee bomb (30M gas at 655360 gwei)", "gas 30000000 above the cap"),
        ("ERC-20 transfer to a stranger", "not a listed recipient"),
        ("unlimited ERC-20 approve", "not a listed spender"),
        ("Permit (typed data)", "is not listed"),
        ("contract creation", "contract creation is not allowed"),
    ]:
        assert rows[name].startswith("Reject") and why in rows[name], (name, rows[name])


def test_reset_windows_needs_the_master_password(clef_binary: Path, tmp_path: Path) -> None:
    pol = policy.parse({"recipients": [R1], "max_value_eth": "1", "limits": [{"window": "24h", "max_tx": 1}]})
    with policycheck.host_signer(clef_binary, pol, tmp_path / "state") as signer:
        assert signer.sign_transaction(tx()).approved
        assert not signer.sign_transaction(tx(nonce=1)).approved
        record = tmp_path / "rules.sha256"
        record.write_text(rules.sha256(signer.rules_text) + "\n")
        layout = {"as_clef_user": [], "clef": str(clef_binary), "keystore": str(signer.dir / "keystore"),
                  "configdir": str(signer.dir / "clef"), "state_dir": str(signer.dir), "lightkdf": True,
                  "rules_record": str(record)}  # fmt: skip
        with pytest.raises(device_admin.AdminError, match="master password is wrong"):
            device_admin.cmd_reset_windows({"layout": layout, "secrets": {"master": "not-the-password"}})
        assert not signer.sign_transaction(tx(nonce=1)).approved  # nothing was reset
        result = device_admin.cmd_reset_windows({"layout": layout, "secrets": {"master": signer.password}})
        assert result["changed"]
        assert signer.sign_transaction(tx(nonce=1)).approved  # the same running Clef: windows empty
        assert not signer.sign_transaction(tx(nonce=2)).approved


# --- the rules alone (node, with Clef's bignumber.js): what Clef's validator would refuse first -------

NODE_RUNNER = r"""
const vm = require("vm"), fs = require("fs");
const [bn, rulesText, casesText, storeText] = process.argv.slice(2).map(f => fs.readFileSync(f, "utf8"));
const store = JSON.parse(storeText);
const ctx = {console: {log: () => {}}, storage: {get: k => store[k] || "", put: (k, v) => { store[k] = v; }}};
vm.createContext(ctx);
vm.runInContext(bn, ctx);
vm.runInContext(rulesText, ctx);
const out = JSON.parse(casesText).map(c => vm.runInContext("ApproveTx(" + JSON.stringify(c) + ")", ctx));
console.log(JSON.stringify(out));
"""


def run_rules_in_node(
    rules_text: str, requests: list[dict[str, Any]], tmp_path: Path, store: dict[str, str] | None = None
) -> list[str]:
    settings = config.load()
    bn = settings.cache_path / (
        f"go/mod/github.com/ethereum/go-ethereum@v{settings.clef_version}/internal/jsre/deps/bignumber.js"
    )
    if not bn.exists():
        pytest.fail(f"Clef's bignumber.js is missing at {bn} (the clef_binary fixture builds it)")
    (tmp_path / "run.js").write_text(NODE_RUNNER)
    (tmp_path / "rules.js").write_text(rules_text)
    (tmp_path / "cases.json").write_text(json.dumps(requests))
    (tmp_path / "store.json").write_text(json.dumps(store or {}))
    files = [tmp_path / "run.js", bn, tmp_path / "rules.js", tmp_path / "cases.json", tmp_path / "store.json"]
    out = subprocess.run(
        [require_tool("node"), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return list(json.loads(out.stdout))


def test_rules_decode_strictly_on_their_own(clef_binary: Path, tmp_path: Path) -> None:
    text = rules.render(policy.parse(RICH))

    def req(data: str, to: str = TOKEN) -> dict[str, Any]:
        t = tx(to=to, value=0, gas=60000, data=data)
        return {"transaction": {**t, "from": R1}, "meta": {"Origin": "", "User-Agent": ""}}

    sig = "transfer(address,uint256)"
    deposit = "0x" + selector("deposit(uint256,address)").hex() + f"{5:064x}"
    cases = [
        (erc20_call(sig, R1, 1), "Approve"),
        (erc20_call(sig, R1, 1, dirty=True), "Reject"),  # high bytes in the address word
        (erc20_call(sig, R1, 1, extra="00" * 32), "Reject"),  # 4 + 96 bytes
        (erc20_call(sig, R1, 1)[:-2], "Reject"),  # short-address form, 4 + 63 bytes
        (erc20_call(sig, R1, 1) + "0", "Reject"),  # odd hex
        (deposit + word_address(R1), "Approve"),
        (deposit + word_address(R1, dirty=True), "Reject"),
        (deposit + word_address(R1) + "00" * 32, "Reject"),
    ]
    requests = [req(d, to=TOKEN if i < 5 else "0x" + "7a" * 20) for i, (d, _) in enumerate(cases)]
    assert run_rules_in_node(text, requests, tmp_path) == [want for _, want in cases]
    stranger = req(erc20_call(sig, STRANGER, 1))
    fee_bomb = {"transaction": {**tx(value=1, gas=30_000_000, maxFeePerGas=655_360 * GWEI), "from": R1},
                "meta": {}}  # fmt: skip
    assert run_rules_in_node(text, [stranger, fee_bomb], tmp_path) == ["Reject", "Reject"]


def test_the_record_is_bounded(clef_binary: Path, tmp_path: Path) -> None:
    """With only an ETH limit, tiny transactions could grow the record without end: 2000 is the most."""
    text = rules.render(policy.parse({"recipients": [R1], "limits": [{"window": "24h", "max_eth": "1"}]}))
    req = {"transaction": {**tx(value=0, maxFeePerGas=1, maxPriorityFeePerGas=1), "from": R1}, "meta": {}}
    record = {"t": 0, "c": "21000", "q": "", "s": "s", "k": "x"}
    frozen = {"d": 1000, "w": int(time.time() * 1000) + 3_600_000}  # a wall clock ahead: device time stays
    full = {"armory.clock": json.dumps(frozen), "armory.spent": json.dumps([record] * 2000)}
    almost = {**full, "armory.spent": json.dumps([record] * 1999)}
    assert run_rules_in_node(text, [req], tmp_path, full) == ["Reject"]
    assert run_rules_in_node(text, [req], tmp_path, almost) == ["Approve"]
