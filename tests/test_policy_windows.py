"""Spending windows in a real Clef: what was signed is counted in the device's own clock.

Windows of a few seconds run in real time (Clef's rule engine reads the Go clock, which faketime
cannot move); longer spans shift the rules' stored clock mark (what `policy check --at` does).
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from provision import policy, policycheck, rules
from provision.policycheck import HostSigner
from tests.agent_helpers import call, make_clef_state, running_agent, write_agent_config
from tests.test_policy_rules import GWEI, R1, tx

pytestmark = pytest.mark.integration

ETH = 10**18
FEE = 21000 * GWEI  # the worst-case fee of tx(): 21000 gas at maxFeePerGas 1 gwei


@pytest.fixture(scope="module")
def daily(clef_binary: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostSigner]:
    pol = policy.parse(
        {"recipients": [R1], "max_value_eth": "0.2", "limits": [{"window": "24h", "max_eth": "1"}]}
    )
    with policycheck.host_signer(clef_binary, pol, tmp_path_factory.mktemp("daily")) as signer:
        yield signer


def empty_window(signer: HostSigner) -> None:
    """Move the device clock two days past every record (the records themselves are untouched)."""
    clock = json.loads(signer.storage_get("armory.clock") or '{"d": 0}')
    signer.set_device_time(int(clock["d"]) + 2 * 86_400_000)


def test_hidden_overrun_exactly_the_ones_that_fit(daily: HostSigner) -> None:
    """20 transfers of 0.1 ETH, each under the 0.2 cap, against 1 ETH a day: 9 fit with their fees."""
    empty_window(daily)
    signed = [daily.sign_transaction(tx(value=ETH // 10, nonce=i)) for i in range(20)]
    assert [v.approved for v in signed] == [True] * 9 + [False] * 11
    assert "limit of 1000000000000000000 wei per 86400s would be exceeded" in signed[9].reason
    spent = json.loads(daily.storage_get("armory.spent"))
    assert len(spent) == 9 and all(r["s"] == "s" for r in spent)  # confirmed by OnApprovedTx
    assert sum(int(r["c"]) for r in spent) == 9 * (ETH // 10 + FEE)


def test_window_sum_on_both_sides_of_the_limit(clef_binary: Path, tmp_path: Path) -> None:
    pol = policy.parse(
        {"recipients": [R1], "max_value_eth": "2", "limits": [{"window": "24h", "max_eth": "1"}]}
    )
    with policycheck.host_signer(clef_binary, pol, tmp_path / "sum") as signer:
        v = signer.sign_transaction(tx(value=ETH - FEE + 1))  # limit + 1 wei in one transaction
        assert not v.approved and "would be exceeded" in v.reason
        assert signer.sign_transaction(tx(value=ETH - FEE - (FEE + 1))).approved  # limit - FEE - 1
        assert signer.sign_transaction(tx(value=1, nonce=1)).approved  # the window holds exactly the limit
        v = signer.sign_transaction(tx(value=0, nonce=2))  # the fee alone no longer fits
        assert not v.approved and "would be exceeded" in v.reason
        empty_window(signer)
        assert signer.sign_transaction(tx(value=ETH - FEE, nonce=3)).approved  # the limit, in one go


def test_windows_survive_a_clef_restart(daily: HostSigner) -> None:
    empty_window(daily)
    assert daily.sign_transaction(tx(value=ETH // 5)).approved
    before = json.loads(daily.storage_get("armory.clock"))["d"]
    daily.restart()
    spent = json.loads(daily.storage_get("armory.spent"))
    assert any(r["c"] == str(ETH // 5 + FEE) for r in spent)
    for i in range(3):
        assert daily.sign_transaction(tx(value=ETH // 5, nonce=i + 1)).approved
    v = daily.sign_transaction(tx(value=ETH // 5, nonce=9))
    assert not v.approved and "would be exceeded" in v.reason  # 4 * 0.200021 + 0.200021 > 1
    assert json.loads(daily.storage_get("armory.clock"))["d"] >= before  # the clock resumed, not reset


def test_the_clock_never_runs_backwards(daily: HostSigner) -> None:
    """A system clock that jumps back (a power-up starts from the image's epoch) adds nothing."""
    empty_window(daily)
    mark = json.loads(daily.storage_get("armory.clock"))
    daily.storage_put("armory.clock", json.dumps({"d": mark["d"], "w": mark["w"] + 10 * 86_400_000}))
    daily.sign_transaction(tx(value=1))
    after = json.loads(daily.storage_get("armory.clock"))
    assert mark["d"] <= after["d"] < mark["d"] + 5000  # not 10 days back, not forward either


def test_short_windows_in_real_time(clef_binary: Path, tmp_path: Path) -> None:
    pol = policy.parse({"recipients": [R1], "max_value_eth": "1", "limits": [{"window": "4s", "max_tx": 2}]})
    with policycheck.host_signer(clef_binary, pol, tmp_path / "short") as signer:
        start = time.monotonic()
        assert signer.sign_transaction(tx(nonce=0)).approved
        assert signer.sign_transaction(tx(nonce=1)).approved
        v = signer.sign_transaction(tx(nonce=2))
        assert not v.approved and "limit of 2 transactions per 4s reached" in v.reason
        time.sleep(max(0.0, start + 2.5 - time.monotonic()))
        assert not signer.sign_transaction(tx(nonce=3)).approved  # still inside the window
        time.sleep(max(0.0, start + 4.6 - time.monotonic()))
        assert signer.sign_transaction(tx(nonce=4)).approved  # the first two have left it


def clef_tx_intervals(log: str) -> list[tuple[datetime, datetime]]:
    times = re.findall(r"^time=(\S+) level=INFO msg=SignTransaction api=signer type=(\w+)", log, re.M)
    starts = [datetime.fromisoformat(t.replace("Z", "+00:00")) for t, kind in times if kind == "request"]
    ends = [datetime.fromisoformat(t.replace("Z", "+00:00")) for t, kind in times if kind == "response"]
    return list(zip(starts, ends, strict=False))


def test_racing_signatures_cannot_overrun_a_window(clef_binary: Path, tmp_path: Path) -> None:
    """Six concurrent requests through the agent against max_tx 3: the agent lets one signature into
    Clef at a time, so exactly three are signed and Clef's audit log shows no overlap."""
    pol = policy.parse({"recipients": [R1], "max_value_eth": "1", "limits": [{"window": "1h", "max_tx": 3}]})
    state = make_clef_state(clef_binary, tmp_path / "state", rules_text=rules.render(pol))
    config = tmp_path / "agent.json"
    write_agent_config(config, clef_binary, state.state_dir, policy={"sign_queue": 8})
    replies: list[dict[str, Any]] = []
    lock = threading.Lock()
    with running_agent(config) as agent:
        assert agent.unlock_cli(state.master_password).returncode == 0

        def one(i: int) -> None:
            t = {**tx(nonce=i), "from": state.address}
            _, body = call(agent.address, agent.port, "eth_signTransaction", [t])
            with lock:
                replies.append(body)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert sum("result" in r for r in replies) == 3, replies
    assert all(r["error"]["code"] == 4001 for r in replies if "error" in r)
    intervals = clef_tx_intervals((state.state_dir / "clef-audit.log").read_text())
    assert len(intervals) == 6
    for (_, end), (next_start, _) in itertools.pairwise(intervals):
        assert next_start >= end, "two signatures ran inside Clef at once"
