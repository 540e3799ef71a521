"""Signing is serialized: one request inside Clef at a time, a bounded queue, then "busy".

The rules make every text signature take a while inside Clef (a busy loop in ApproveSignData),
so overlapping requests really do overlap at the agent. Clef's own audit log, with its request
and response timestamps, shows whether two signatures ever ran inside Clef at once.
"""

from __future__ import annotations

import itertools
import re
import threading
from datetime import datetime
from pathlib import Path

import pytest

from tests.agent_helpers import call, make_clef_state, running_agent, write_agent_config

pytestmark = pytest.mark.integration

SLOW_RULES = """\
function ApproveListing(req) { return "Approve" }
function ApproveSignData(req) {
  var start = Date.now();
  while (Date.now() - start < DELAY_MS) {}
  return "Approve"
}
"""


def clef_sign_intervals(log: str) -> list[tuple[datetime, datetime]]:
    """(request, response) times of Clef's SignData calls, in log order."""
    times = re.findall(r"^time=(\S+) level=INFO msg=SignData api=signer type=(\w+)", log, re.M)
    starts = [datetime.fromisoformat(t.replace("Z", "+00:00")) for t, kind in times if kind == "request"]
    ends = [datetime.fromisoformat(t.replace("Z", "+00:00")) for t, kind in times if kind == "response"]
    return list(zip(starts, ends, strict=False))


def sign_concurrently(agent_address: str, port: int, address: str, n: int) -> list[dict[str, object]]:
    replies: list[dict[str, object]] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        status, body = call(
            agent_address, port, "account_signData", ["text/plain", address, "0x" + bytes([i]).hex()]
        )
        with lock:
            replies.append({"status": status, **body})

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return replies


def test_one_signature_at_a_time_and_busy_past_the_queue(clef_binary: Path, tmp_path: Path) -> None:
    rules = SLOW_RULES.replace("DELAY_MS", "400")
    state = make_clef_state(clef_binary, tmp_path / "state", rules_text=rules)
    config = tmp_path / "agent.json"
    write_agent_config(config, clef_binary, state.state_dir, policy={"sign_queue": 2})
    with running_agent(config) as agent:
        assert agent.unlock_cli(state.master_password).returncode == 0
        replies = sign_concurrently(agent.address, agent.port, state.address, 8)
        ok = [r for r in replies if "result" in r]
        busy = [r for r in replies if "error" in r]
        assert len(ok) >= 3  # the one inside Clef and the two queued behind it
        assert busy and all(r["error"]["code"] == -32011 and r["status"] == 503 for r in busy)  # type: ignore[index]
        assert all("busy" in r["error"]["message"] for r in busy)  # type: ignore[index]
        # Non-signing calls are not held up by the queue.
        assert call(agent.address, agent.port, "account_version", [])[1]["result"] == "6.1.0"

        intervals = clef_sign_intervals((state.state_dir / "clef-audit.log").read_text())
        assert len(intervals) == len(ok)
        for (_, end), (next_start, _) in itertools.pairwise(intervals):
            assert next_start >= end, "two signatures ran inside Clef at once"


def test_clef_timeout_keeps_the_slot_until_clef_answers(clef_binary: Path, tmp_path: Path) -> None:
    rules = SLOW_RULES.replace("DELAY_MS", "2500")
    state = make_clef_state(clef_binary, tmp_path / "state", rules_text=rules)
    config = tmp_path / "agent.json"
    write_agent_config(config, clef_binary, state.state_dir, policy={"clef_timeout": 1.0})
    with running_agent(config) as agent:
        assert agent.unlock_cli(state.master_password).returncode == 0
        replies = sign_concurrently(agent.address, agent.port, state.address, 2)
        assert {r["status"] for r in replies} == {504}
        assert all(r["error"]["code"] == -32012 for r in replies)  # type: ignore[index]
        # The agent answered the clients early, but the second signature still waited for the
        # first to leave Clef: no overlap inside Clef.
        agent.wait_for(
            lambda: len(clef_sign_intervals((state.state_dir / "clef-audit.log").read_text())) == 2,
            30, "both signatures finished in Clef",
        )  # fmt: skip
        (_, first_end), (second_start, _) = clef_sign_intervals(
            (state.state_dir / "clef-audit.log").read_text()
        )
        assert second_start >= first_end
        status, body = call(agent.address, agent.port, "account_list", [])
        assert status == 200 and body["result"] == [state.address.lower()]
