"""`python3 -m armory_agent serve` that cannot start says why in one line and exits non-zero.

Each case provokes the failure for real: an audit log path under a regular file, a control socket
path under a regular file, and a port another socket is listening on.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.agent_helpers import REPO, write_agent_config

pytestmark = pytest.mark.integration


def _serve(config: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "armory_agent", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, check=False, cwd=REPO, env=env)


def _one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _config(tmp_path: Path, clef_binary: Path, **changes: dict[str, object]) -> Path:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    path = tmp_path / "agent.json"
    cfg = write_agent_config(path, clef_binary, state)
    for section, values in changes.items():
        cfg[section].update(values)
    path.write_text(json.dumps(cfg))
    return path


def test_unusable_audit_log(tmp_path: Path, clef_binary: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = _config(tmp_path, clef_binary, audit={"path": str(blocker / "audit.jsonl")})
    _one_line_error(_serve(config), f"cannot open the audit log {blocker}/audit.jsonl: File exists",
                    "[audit] path")


def test_unusable_control_socket(tmp_path: Path, clef_binary: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = _config(tmp_path, clef_binary, control={"socket": str(blocker / "control.sock")})
    _one_line_error(_serve(config), "cannot create the control socket", "[control] socket")


def test_port_in_use(tmp_path: Path, clef_binary: Path) -> None:
    """Another process holds the port: the agent stops (Clef too) instead of running deaf."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        config = _config(tmp_path, clef_binary, listen={"port": port})
        result = _serve(config)
    _one_line_error(result, f"cannot listen on 127.0.0.1:{port}", "Address already in use")
    control = Path(json.loads(config.read_text())["control"]["socket"])
    assert not control.exists()  # cleaned up on the way out
    clefs = subprocess.run(["pgrep", "-f", f"--configdir {tmp_path}/state/clef"], capture_output=True,
                           text=True, check=False)
    assert clefs.stdout.strip() == "", "Clef outlived the agent"
