"""Whole flow against the real Clef: state dir, agent, unlock, listing and signing, recovery."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from eth_account import Account
from eth_account.messages import encode_defunct

from tests.agent_helpers import (
    REPO,
    AgentProcess,
    ClefState,
    call,
    clef_cmdline,
    get_health,
    make_clef_state,
    require_tool,
    running_agent,
    write_agent_config,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def clef_state(clef_binary: Path, tmp_path_factory: pytest.TempPathFactory) -> ClefState:
    return make_clef_state(clef_binary, tmp_path_factory.mktemp("flow") / "state")


@pytest.fixture(scope="module")
def agent(clef_binary: Path, clef_state: ClefState) -> Iterator[AgentProcess]:
    config = clef_state.state_dir.parent / "agent.json"
    write_agent_config(config, clef_binary, clef_state.state_dir)
    with running_agent(config) as a:
        yield a


def test_locked_before_unlock(agent: AgentProcess) -> None:
    if agent.status()["state"] == "ready":
        agent.control({"cmd": "lock"})
    status, body = call(agent.address, agent.port, "account_list", [])
    assert status == 503
    assert body["error"]["code"] == -32010
    assert "locked" in body["error"]["message"]
    assert get_health(agent.address, agent.port)["state"] == "locked"


def test_wrong_password_is_refused_and_stays_locked(agent: AgentProcess) -> None:
    result = agent.unlock_cli("not-the-master-password")
    assert result.returncode == 1
    assert "wrong master password" in result.stderr
    agent.wait_for(lambda: agent.status()["state"] == "locked", 60, "locked again")
    status, _ = call(agent.address, agent.port, "account_list", [])
    assert status == 503


def test_unlock_list_sign_recover(agent: AgentProcess, clef_state: ClefState) -> None:
    result = agent.unlock_cli(clef_state.master_password)
    assert result.returncode == 0, result.stderr
    status_line = json.loads(result.stdout)
    assert status_line["state"] == "ready"
    assert status_line["rules"] == "enabled"
    health = get_health(agent.address, agent.port)
    assert health["state"] == "ready" and health["clef"].startswith("1.17.3")

    status, body = call(agent.address, agent.port, "account_list", [])
    assert status == 200, body
    assert body["result"] == [clef_state.address.lower()]

    message = b"clef-armory whole flow"
    status, body = call(
        agent.address,
        agent.port,
        "account_signData",
        ["text/plain", clef_state.address, "0x" + message.hex()],
        headers={"User-Agent": "flow-test/1"},
    )
    assert status == 200, body
    recovered = Account.recover_message(encode_defunct(primitive=message), signature=body["result"])
    assert recovered == clef_state.address

    # Text signing approved, but a transaction is left undecided by the rules: the agent rejects.
    tx = {
        "from": clef_state.address,
        "to": "0x07a565b7ed7d7a678680a4c162885bedbb695fe0",
        "gas": "0x5208",
        "gasPrice": "0x1",
        "value": "0x1",
        "nonce": "0x0",
    }
    status, body = call(agent.address, agent.port, "account_signTransaction", [tx])
    assert "error" in body

    lines = agent.rpc_lines()
    assert any(x["method"] == "account_signData" and x["error"] is None for x in lines)
    audit_text = agent.audit_path.read_text()
    for secret in (clef_state.master_password, "not-the-master-password", clef_state.account_password):
        assert secret not in audit_text
        assert secret not in agent.log_text()
    assert stat.S_IMODE(agent.audit_path.stat().st_mode) == 0o600


def test_lock_then_locked(agent: AgentProcess, clef_state: ClefState) -> None:
    if agent.status()["state"] != "ready":
        assert agent.unlock_cli(clef_state.master_password).returncode == 0
    reply = agent.control({"cmd": "lock"})
    assert reply["state"] == "locked"
    status, body = call(agent.address, agent.port, "account_list", [])
    assert status == 503 and body["error"]["code"] == -32010


def test_clef_command_line_keeps_files_private(agent: AgentProcess, clef_state: ClefState) -> None:
    cmdline = clef_cmdline(agent)
    assert "--stdio-ui" in cmdline and "--ipcdisable" in cmdline
    assert cmdline[cmdline.index("--http.addr") + 1] == "127.0.0.1"
    assert cmdline[cmdline.index("--http.port") + 1] != "8550"
    assert cmdline[cmdline.index("--auditlog") + 1] == str(clef_state.state_dir / "clef-audit.log")
    assert cmdline[cmdline.index("--rules") + 1] == str(clef_state.state_dir / "rules.js")
    assert clef_state.master_password not in " ".join(cmdline)




def test_control_socket_refuses_other_users(clef_binary: Path, tmp_path: Path) -> None:
    """Mode 0600 in a 0700 dir keeps other users out; SO_PEERCRED refuses them even if the
    modes were loosened."""
    setpriv = require_tool("setpriv")
    state = make_clef_state(clef_binary, tmp_path / "state", rules_text=None)
    public = Path(tempfile.mkdtemp(prefix="agent-ctl-", dir="/tmp"))
    try:
        public.chmod(0o711)
        config = public / "agent.json"
        write_agent_config(config, clef_binary, state.state_dir, control_socket=public / "run" / "c.sock")
        config.chmod(0o644)
        with running_agent(config) as agent:
            sock = public / "run" / "c.sock"
            assert stat.S_IMODE(sock.stat().st_mode) == 0o600
            assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700

            def as_nobody() -> subprocess.CompletedProcess[str]:
                return subprocess.run(
                    [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3",
                     "-m", "armory_agent", "status", "--config", str(config)],
                    capture_output=True, text=True, timeout=60, check=False,
                    env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}, cwd="/",
                )  # fmt: skip

            result = as_nobody()
            assert result.returncode == 1 and "permission denied" in result.stderr, result
            sock.parent.chmod(0o711)
            sock.chmod(0o666)
            result = as_nobody()
            assert result.returncode == 1 and "error: not allowed" in result.stderr, result
            assert agent.status()["state"] in ("locked", "error")
    finally:
        shutil.rmtree(public, ignore_errors=True)
