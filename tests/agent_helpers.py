"""Shared helpers for tests that run the agent against a real Clef (also used by provisioning tests).

`make_clef_state` builds a real Clef state dir (master seed, one account, stored password,
attested rules) with --lightkdf; `AgentProcess` runs `python -m armory_agent serve` on it.
Passwords go to Clef on stdin only.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MASTER_PASSWORD = "master-password-for-tests"
ACCOUNT_PASSWORD = "account-password-for-tests"

# Approves listing and text/plain signing, rejects other data; transactions stay undecided.
TEST_RULES = """\
function ApproveListing(req) { return "Approve" }
function ApproveSignData(req) {
  if (req.content_type == "text/plain") { return "Approve" }
  return "Reject"
}
function OnSignerStartup(info) {}
function OnApprovedTx(resp) {}
"""


@dataclass(frozen=True)
class ClefState:
    state_dir: Path
    address: str  # checksummed
    master_password: str
    account_password: str
    rules: Path | None


def _clef(clef_binary: Path, state: Path, args: Sequence[str], stdin: str) -> str:
    argv = [
        str(clef_binary),
        "--configdir", str(state / "clef"),
        "--keystore", str(state / "keystore"),
        "--suppress-bootwarn",
        "--lightkdf",
        *args,
    ]  # fmt: skip
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"clef {args[0]} failed: {proc.stderr.strip()[-500:]}")
    return proc.stdout + proc.stderr


def attest_rules(clef_binary: Path, state: Path, rules_text: str, master_password: str) -> Path:
    rules = state / "rules.js"
    rules.write_text(rules_text)
    rules.chmod(0o600)
    digest = hashlib.sha256(rules_text.encode()).hexdigest()
    _clef(clef_binary, state, ["attest", digest], master_password + "\n")
    return rules


def make_clef_state(
    clef_binary: Path,
    state_dir: Path,
    rules_text: str | None = TEST_RULES,
    attest: bool = True,
    master_password: str = MASTER_PASSWORD,
    account_password: str = ACCOUNT_PASSWORD,
) -> ClefState:
    """A fresh Clef state dir: init, newaccount, setpw, and (optionally) attested rules."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    _clef(clef_binary, state_dir, ["init"], f"{master_password}\n{master_password}\n")
    out = _clef(clef_binary, state_dir, ["newaccount"], f"{account_password}\n{account_password}\n")
    address = next(
        line.split()[-1] for line in out.splitlines() if line.startswith("Generated account")
    )
    _clef(
        clef_binary,
        state_dir,
        ["setpw", address],
        f"{account_password}\n{account_password}\n{master_password}\n",
    )
    rules = None
    if rules_text is not None:
        if attest:
            rules = attest_rules(clef_binary, state_dir, rules_text, master_password)
        else:
            rules = state_dir / "rules.js"
            rules.write_text(rules_text)
    return ClefState(state_dir, address, master_password, account_password, rules)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def write_agent_config(
    path: Path,
    clef_binary: Path,
    state_dir: Path,
    *,
    interface: str = "lo",
    address: str = "127.0.0.1",
    port: int | None = None,
    clef_port: int | None = None,
    bind_to_device: bool = True,
    control_socket: Path | None = None,
    policy: dict[str, Any] | None = None,
    leds: Path | None = None,
) -> dict[str, Any]:
    """Write a JSON agent config for a test; returns it as a dict."""
    port = port or free_port()
    pol: dict[str, Any] = {"hosts": [address, f"{address}:{port}"]}
    pol.update(policy or {})
    cfg: dict[str, Any] = {
        "clef": {
            "binary": str(clef_binary),
            "state_dir": str(state_dir),
            "http_port": clef_port or free_port(),
            "rules": str(state_dir / "rules.js"),
            "lightkdf": True,
            "restart_backoff_max": 2.0,
            "startup_timeout": 60.0,
        },
        "listen": {
            "interface": interface,
            "address": address,
            "port": port,
            "bind_to_device": bind_to_device,
        },
        "policy": pol,
        "audit": {"path": str(state_dir / "audit.jsonl")},
        "control": {"socket": str(control_socket or (state_dir / "run" / "control.sock"))},
        "leds": {"path": str(leds or (state_dir / "no-leds"))},
    }
    path.write_text(json.dumps(cfg, indent=2))
    return cfg


class AgentProcess:
    """`python -m armory_agent serve` as a child (optionally inside `ip netns exec NS`)."""

    def __init__(self, config_path: Path, prefix: Sequence[str] = ()) -> None:
        self.config_path = config_path
        self.cfg = json.loads(config_path.read_text())
        self.prefix = list(prefix)
        self.log_path = config_path.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        return int(self.cfg["listen"]["port"])

    @property
    def address(self) -> str:
        return str(self.cfg["listen"]["address"])

    @property
    def audit_path(self) -> Path:
        return Path(self.cfg["audit"]["path"])

    def start(self) -> AgentProcess:
        log = self.log_path.open("ab")
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "HOME")}
        env["PYTHONPATH"] = str(REPO)
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "armory_agent", "serve", "--verbose",
             "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
        )  # fmt: skip
        log.close()
        self.wait_for(lambda: self.status()["state"] in ("locked", "error"), 60, "agent locked")
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def control(self, request: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
        from armory_agent import control

        return control.send(Path(self.cfg["control"]["socket"]), request, timeout)

    def status(self) -> dict[str, Any]:
        from armory_agent.errors import ControlError

        try:
            return self.control({"cmd": "status"}, timeout=10)
        except ControlError:
            return {"state": "unreachable"}

    def unlock_cli(self, password: str) -> subprocess.CompletedProcess[str]:
        """Unlock through the real CLI, password on stdin."""
        return subprocess.run(
            [sys.executable, "-m", "armory_agent", "unlock", "--config", str(self.config_path)],
            input=password + "\n", capture_output=True, text=True, timeout=120, check=False,
            cwd=REPO, env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO)},
        )  # fmt: skip

    def wait_for(self, predicate: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"agent exited ({self.proc.returncode}):\n{self.log_text()[-3000:]}")
            with contextlib.suppress(Exception):
                if predicate():
                    return
            time.sleep(0.1)
        raise TimeoutError(f"timed out waiting for {what}:\n{self.log_text()[-3000:]}")

    def audit_lines(self) -> list[dict[str, Any]]:
        if not self.audit_path.exists():
            return []
        return [json.loads(x) for x in self.audit_path.read_text().splitlines() if x.strip()]

    def rpc_lines(self) -> list[dict[str, Any]]:
        return [x for x in self.audit_lines() if x.get("kind") == "rpc"]

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@contextlib.contextmanager
def running_agent(config_path: Path, prefix: Sequence[str] = ()) -> Iterator[AgentProcess]:
    agent = AgentProcess(config_path, prefix)
    try:
        yield agent.start()
    finally:
        agent.stop()


def rpc(
    host: str,
    port: int,
    payload: Any,
    headers: dict[str, str] | None = None,
    host_header: str | None = None,
    timeout: float = 60,
) -> tuple[int, Any]:
    """POST a JSON-RPC payload; (HTTP status, parsed JSON body or None)."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        hdrs = {"Content-Type": "application/json", "Host": host_header or f"{host}:{port}"}
        hdrs.update(headers or {})
        conn.request("POST", "/", body=body, headers=hdrs)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, (json.loads(data) if data else None)
    finally:
        conn.close()


def call(host: str, port: int, method: str, params: list[Any], **kw: Any) -> tuple[int, Any]:
    return rpc(host, port, {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}, **kw)


def get_health(host: str, port: int) -> dict[str, Any]:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", "/health", headers={"Host": f"{host}:{port}"})
        return dict(json.loads(conn.getresponse().read()))
    finally:
        conn.close()


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"required tool {name!r} is not installed")
    return path


def clef_pid(agent: AgentProcess) -> int:
    """The pid of the agent's Clef child (found through /proc)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            ppid = (proc / "stat").read_text().rsplit(")", 1)[1].split()[1]
        except OSError:
            continue
        if agent.proc is not None and int(ppid) == agent.proc.pid and b"--stdio-ui" in argv:
            return int(proc.name)
    raise LookupError("Clef child process not found")


def clef_cmdline(agent: AgentProcess) -> list[str]:
    raw = (Path("/proc") / str(clef_pid(agent)) / "cmdline").read_bytes().split(b"\0")
    return [a.decode() for a in raw if a]


def wait_audit(agent: AgentProcess, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The rpc audit lines once there are at least `count` (the writer thread is asynchronous)."""
    deadline = time.monotonic() + timeout
    lines = agent.rpc_lines()
    while len(lines) < count and time.monotonic() < deadline:
        time.sleep(0.05)
        lines = agent.rpc_lines()
    time.sleep(0.2)  # and no more than that
    return agent.rpc_lines()
