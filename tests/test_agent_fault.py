"""Faults: Clef killed under the agent; rules missing, unattested or unreadable are reported."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.agent_helpers import (
    TEST_RULES,
    call,
    clef_pid,
    get_health,
    make_clef_state,
    running_agent,
    write_agent_config,
)

pytestmark = pytest.mark.integration


def test_clef_killed_restarts_locked_then_works(clef_binary: Path, tmp_path: Path) -> None:
    state = make_clef_state(clef_binary, tmp_path / "state")
    config = tmp_path / "agent.json"
    write_agent_config(config, clef_binary, state.state_dir)
    with running_agent(config) as agent:
        assert agent.unlock_cli(state.master_password).returncode == 0
        assert call(agent.address, agent.port, "account_list", [])[0] == 200
        first = clef_pid(agent)

        os.kill(first, signal.SIGKILL)
        agent.wait_for(lambda: agent.status()["restarts"] >= 1, 30, "restart counted")
        status, body = call(agent.address, agent.port, "account_list", [])
        assert status == 503 and body["error"]["code"] == -32010
        agent.wait_for(lambda: agent.status()["state"] == "locked", 60, "locked again")
        assert clef_pid(agent) != first
        assert get_health(agent.address, agent.port)["state"] == "locked"
        events = [x for x in agent.audit_lines() if x.get("kind") == "event"]
        assert any(e["event"] == "clef_exit" and e["code"] == -9 for e in events)
        assert "Clef exited with code -9" in agent.log_text()

        assert agent.unlock_cli(state.master_password).returncode == 0
        status, body = call(agent.address, agent.port, "account_list", [])
        assert status == 200 and body["result"] == [state.address.lower()]


@pytest.mark.parametrize(
    ("setup", "verdict"),
    [
        ("none", "disabled: no rules file"),
        ("unattested", "disabled: rules not attested"),
        ("attested", "enabled"),
    ],
)
def test_rules_state_is_reported(
    clef_binary: Path, tmp_path: Path, setup: str, verdict: str
) -> None:
    rules = None if setup == "none" else TEST_RULES
    state = make_clef_state(
        clef_binary, tmp_path / "state", rules_text=rules, attest=setup == "attested"
    )
    config = tmp_path / "agent.json"
    write_agent_config(config, clef_binary, state.state_dir)
    with running_agent(config) as agent:
        reply = agent.control({"cmd": "unlock", "password": state.master_password})
        assert reply["state"] == "ready"
        assert reply["rules"] == verdict
        assert get_health(agent.address, agent.port)["rules"] == verdict
        status, body = call(agent.address, agent.port, "account_list", [])
        if verdict == "enabled":
            assert body["result"] == [state.address.lower()]
        else:  # no rules: the agent's own policy answers the listing prompt, and it says no
            assert status == 200 and body["error"]["message"] == "request denied"


def test_listing_allowed_by_config_without_rules(clef_binary: Path, tmp_path: Path) -> None:
    state = make_clef_state(clef_binary, tmp_path / "state", rules_text=None)
    config = tmp_path / "agent.json"
    write_agent_config(config, clef_binary, state.state_dir, policy={"approve_listing": True})
    with running_agent(config) as agent:
        agent.control({"cmd": "unlock", "password": state.master_password})
        _, body = call(agent.address, agent.port, "account_list", [])
        assert body["result"] == [state.address.lower()]
        # Signing stays rejected by the agent's policy when no rules decide.
        _, body = call(
            agent.address, agent.port, "account_signData", ["text/plain", state.address, "0x01"]
        )
        assert body["error"]["message"] == "request denied"


def test_clef_without_master_seed_is_an_error(clef_binary: Path, tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    config = tmp_path / "agent.json"
    write_agent_config(config, clef_binary, state_dir)
    with running_agent(config) as agent:
        agent.wait_for(lambda: agent.status()["state"] == "error", 60, "error state")
        assert "no master seed" in agent.status()["detail"]
        result = agent.unlock_cli("whatever-password")
        assert result.returncode == 1 and "not waiting for the master password" in result.stderr
        assert call(agent.address, agent.port, "account_list", [])[0] == 503


def test_clef_dies_with_a_killed_agent(clef_binary: Path, tmp_path: Path) -> None:
    """No unlocked Clef may outlive the agent (it would sign for anyone on loopback)."""
    state = make_clef_state(clef_binary, tmp_path / "state")
    config = tmp_path / "agent.json"
    write_agent_config(config, clef_binary, state.state_dir)
    with running_agent(config) as agent:
        assert agent.unlock_cli(state.master_password).returncode == 0
        pid = clef_pid(agent)
        assert agent.proc is not None
        agent.proc.kill()
        agent.proc.wait(10)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and _state(pid) != "Z" and time.monotonic() < deadline:
            time.sleep(0.1)
        alive = Path(f"/proc/{pid}").exists() and _state(pid) != "Z"
        if alive:
            os.kill(pid, signal.SIGKILL)
        assert not alive, "Clef outlived the agent"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"
