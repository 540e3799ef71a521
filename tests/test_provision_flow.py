"""provision / check / unlock / status end to end: real sshd, real Clef, the real agent.

The "device" is this machine inside a test network namespace (see sshd_helpers):
sshd on 10.0.0.1:22, the agent on 10.0.0.1:8550 (usb0), Clef on 127.0.0.1:8551,
reached from a laptop namespace at 10.0.0.2.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from clef_armory.errors import ConfigError, ProvisionError
from provision import commands, report
from provision.checks import CheckResult
from provision.commands import ProvisionInputs, Session
from provision.device import Device
from provision.secrets import Passwords
from provision.setup import Step
from tests.sshd_helpers import DeviceEnv, device_env

# These tests choose the account password (standard scrypt); tests/test_provision_words.py
# covers the generated words.
AskInputs = functools.partial(ProvisionInputs, account_password="ask")

pytestmark = pytest.mark.integration

RECIPIENT = "0x" + "11" * 20
# Checks this host cannot pass however well provisioning works: the test logs in as root (no sudo
# on the build host), and the host kernel has no Yama. Asserted to fail for exactly that reason.
HOST_LIMITED = {
    "sshd": "permitrootlogin is without-password",
    "ptrace": "yama",
}


def new_passwords() -> tuple[str, str, Passwords]:
    master, account = "M-" + secrets.token_urlsafe(18), "A-" + secrets.token_urlsafe(18)
    answers = iter([master, master, account, account])
    return master, account, Passwords(ask=lambda prompt: next(answers))


def write_policy(path: Path, **extra: Any) -> Path:
    doc = {"recipients": [RECIPIENT], "allow_text_signing": True, "max_value_eth": "0.01", **extra}
    path.write_text(json.dumps(doc))  # JSON is YAML
    return path


def assert_checks_pass(results: list[CheckResult]) -> None:
    by_name = {r.name: r for r in results}
    for name, why in HOST_LIMITED.items():
        assert not by_name[name].ok and why in by_name[name].reason.lower(), by_name[name]
    bad = [r for r in results if not r.ok and r.name not in HOST_LIMITED]
    assert not bad, report.checks_table(results)
    assert len(results) == 20


class ProcScanner:
    """Watches every process's argv and environment on this machine for the secrets, while it runs."""

    def __init__(self, needles: list[str]) -> None:
        self.needles = [n.encode() for n in needles]
        self.hits: list[str] = []
        self.scans = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for proc in Path("/proc").iterdir():
                if not proc.name.isdigit():
                    continue
                for part in ("cmdline", "environ"):
                    try:
                        data = (proc / part).read_bytes()
                    except OSError:
                        continue
                    if any(n in data for n in self.needles):
                        self.hits.append(f"{proc.name}/{part}")
            self.scans += 1
            time.sleep(0.01)

    def __enter__(self) -> ProcScanner:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def laptop_roots(since: float, basetemp: Path) -> list[Path]:
    """Where the laptop side could have written during the run, without walking other people's trees.

    This test's temp tree, $HOME (tool caches pruned below), and every entry of /tmp made since
    the run started (tempfile's default place); a pre-existing /tmp tree is not re-read.
    """
    fresh = [p for p in Path("/tmp").iterdir() if p.lstat().st_ctime >= since and p != basetemp]
    return [basetemp, Path.home(), *fresh]


_PRUNE = {".cache", ".pyenv", ".rustup", ".cargo", "go", ".npm"}


def files_containing(needles: list[str], roots: list[Path], since: float, skip: Path) -> list[str]:
    """Files under roots (or roots that are files) modified since ``since`` that contain a needle."""
    raw = [n.encode() for n in needles]
    candidates: list[Path] = []
    for root in roots:
        if root.is_file():
            candidates.append(root)
            continue
        device = root.lstat().st_dev
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            # Stay on the root's filesystem: a chroot under /tmp may have /proc mounted (kmsg blocks).
            if here == skip or skip in here.parents or here.lstat().st_dev != device:
                dirnames[:] = []
                continue
            if here == Path.home():
                dirnames[:] = [d for d in dirnames if d not in _PRUNE]
            candidates.extend(here / name for name in filenames)
    found = []
    for path in candidates:
        try:
            st = path.lstat()
            if not path.is_file() or st.st_mtime < since or st.st_size > 50 << 20:
                continue
            data = path.read_bytes()
        except OSError:
            continue
        if any(n in data for n in raw):
            found.append(str(path))
    return found


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, clef_binary: Path) -> Iterator[DeviceEnv]:
    with device_env(tmp_path_factory.mktemp("prov"), clef_binary) as e:
        yield e


def session(env: DeviceEnv, **kw: Any) -> Session:
    return env.session(**kw)


@dataclasses.dataclass
class FirstRun:
    master: str
    account: str
    passwords: Passwords
    policy: Path
    started: float
    steps: list[Step]
    results: list[CheckResult]
    said: list[str]
    proc_hits: list[str]
    proc_scans: int


@pytest.fixture(scope="module")
def first_run(env: DeviceEnv, tmp_path_factory: pytest.TempPathFactory) -> FirstRun:
    """The first provisioning of the module's device, watched for secrets on argv/environ."""
    started = time.time() - 1
    master, account, passwords = new_passwords()
    policy = write_policy(tmp_path_factory.mktemp("policy") / "policy.yaml")
    said: list[str] = []
    with ProcScanner([master, account]) as scanner:
        steps, results = commands.provision(
            session(env), passwords,
            AskInputs(accounts=2, policy_file=policy, write_agent_config=False), said.append)
    return FirstRun(master, account, passwords, policy, started, steps, results, said, scanner.hits,
                    scanner.scans)


def test_provision_then_again_changes_nothing_then_check_unlock_status(
    env: DeviceEnv, first_run: FirstRun, tmp_path_factory: pytest.TempPathFactory
) -> None:
    run = first_run
    assert run.proc_scans > 10
    assert run.proc_hits == [], "a password appeared in a process's argv or environment"
    changed = {s.name for s in run.steps if s.changed}
    assert {"master seed", "new account", "rules", "agent restart", "agent unlock"} <= changed
    assert sum(s.name == "new account" for s in run.steps) == 2
    assert any("rules to be attested" in line and RECIPIENT in line for line in run.said)  # shown first
    assert_checks_pass(run.results)

    # The laptop wrote nothing with a password in it (the test's temp dirs, new /tmp entries, HOME).
    roots = laptop_roots(run.started, tmp_path_factory.getbasetemp())
    assert files_containing([run.master, run.account], roots, run.started, skip=env.root) == []
    # ... and that search would have seen a leak in a new /tmp file.
    fd, leak = tempfile.mkstemp(prefix="leak-")
    os.write(fd, b"pw=" + run.account.encode())
    os.close(fd)
    try:
        roots = laptop_roots(run.started, tmp_path_factory.getbasetemp())
        assert files_containing([run.account], roots, run.started, skip=env.root) == [leak]
    finally:
        os.unlink(leak)

    # Second run: nothing to do, and it says so.
    steps2, results2 = commands.provision(
        session(env), run.passwords,
        AskInputs(accounts=2, policy_file=run.policy, write_agent_config=False), lambda _: None)
    assert not any(s.changed for s in steps2), steps2
    assert "nothing changed" in report.steps_table(steps2)
    assert json.loads(report.as_json(steps2, results2))["changed"] is False
    assert_checks_pass(results2)

    # check alone (asks for the master password to search for it).
    assert_checks_pass(commands.check(session(env), Passwords(ask=lambda p: run.master), text_signing=True))

    # After a "reboot" of the agent: unlock brings it back to ready.
    conn, device = session(env).open()
    with conn:
        device.call("restart-agent")
    assert commands.status(session(env))["agent"]["state"] in ("starting", "locked")
    health = commands.unlock(session(env), Passwords(ask=lambda p: run.master))
    assert health["state"] == "ready"
    st = commands.status(session(env))
    assert st["health"]["state"] == "ready" and st["agent"]["rules"] == "enabled"
    assert len(st["device"]["accounts"]) == 2
    # The device's own Debian point release (this machine's, here) and no image record.
    assert st["system"]["debian_version"] == Path("/etc/debian_version").read_text().strip()
    assert st["system"]["image"] is None and "system.json" in st["system"]["problem"]


def test_changed_policy_rerenders_reattests_restarts(
    env: DeviceEnv, first_run: FirstRun, tmp_path: Path
) -> None:
    policy = write_policy(tmp_path / "policy2.yaml", max_value_eth="0.02", allow_text_signing=False)
    before = _state(env)
    shown: list[str] = []
    with pytest.raises(ConfigError, match="cancelled before any change"):
        commands.provision(session(env), Passwords(ask=lambda p: first_run.master),
                           AskInputs(accounts=3, policy_file=policy, write_agent_config=False,
                                           confirm=lambda q: False), shown.append)
    assert any("rules to be attested" in line and "20000000000000000" in line for line in shown)
    assert _state(env) == before  # declined: no account created, rules untouched
    steps, results = commands.provision(
        session(env), Passwords(ask=lambda p: first_run.master),
        AskInputs(accounts=0, policy_file=policy, write_agent_config=False), lambda _: None)
    assert {s.name for s in steps if s.changed} == {"rules", "agent restart", "agent unlock"}
    by_name = {r.name: r for r in results}
    assert by_name["rules-enabled"].ok and by_name["rules-attested"].ok
    assert by_name["link-sign"].ok and "refused" in by_name["link-sign"].reason  # the policy forbids it now


def test_import_keystore_signs_through_the_link(
    env: DeviceEnv, first_run: FirstRun, tmp_path: Path
) -> None:
    from eth_account import Account
    from eth_account.messages import encode_defunct

    key_password = "K-" + secrets.token_urlsafe(12)
    acct = Account.create()
    keyfile = tmp_path / "import.json"
    keyfile.write_text(json.dumps(Account.encrypt(acct.key, key_password, kdf="pbkdf2", iterations=1000)))
    said: list[str] = []
    inputs = AskInputs(accounts=0, import_keystore=keyfile, policy_file=first_run.policy,
                             write_agent_config=False, run_checks=False)
    ask = {"master": first_run.master, "account": key_password}
    passwords = Passwords(ask=lambda p: ask["master" if "master" in p else "account"])
    steps, _ = commands.provision(session(env), passwords, inputs, said.append)
    assert any(s.name == "import account" and s.changed for s in steps)
    assert any("existed off the device" in line for line in said)
    link = session(env).link
    assert link is not None
    _, body = link.rpc("account_list", [])
    assert acct.address.lower() in [a.lower() for a in body["result"]]
    msg = b"imported key check"
    _, body = link.rpc("account_signData", ["text/plain", acct.address, "0x" + msg.hex()])
    assert Account.recover_message(encode_defunct(primitive=msg), signature=body["result"]) == acct.address
    # Importing again changes nothing.
    steps2, _ = commands.provision(session(env), passwords, inputs, lambda _: None)
    assert not any(s.changed for s in steps2), steps2


def test_wrong_master_password_leaves_no_half_created_account(
    env: DeviceEnv, first_run: FirstRun
) -> None:
    before = _state(env)
    wrong = Passwords(ask=lambda p: "wrong-master-pw" if "master" in p else "A-" + "x" * 12)
    with pytest.raises(ProvisionError, match="master password is wrong"):
        commands.provision(session(env), wrong,
                           AskInputs(accounts=len(before["accounts"]) + 1, write_agent_config=False),
                           lambda _: None)
    after = _state(env)
    assert after["accounts"] == before["accounts"]
    assert after["staging_leftovers"] == 0


def _state(env: DeviceEnv) -> dict[str, Any]:
    conn, device = session(env).open()
    with conn:
        return device.call("state")


# ---------------------------------------------------------------- interrupted runs


def test_interrupted_runs_can_be_rerun_to_completion(tmp_path: Path, clef_binary: Path) -> None:
    """Drop the SSH connection at several points (between steps and in the middle of one)."""
    _, _, passwords = new_passwords()
    policy = write_policy(tmp_path / "policy.yaml")
    inputs = AskInputs(accounts=3, policy_file=policy, write_agent_config=False, run_checks=False)
    with device_env(tmp_path / "w", clef_binary) as env:
        plan = [("init", 0.0), ("add-account", 0.15), ("add-account", 0.0), ("install-rules", 0.1),
                ("restart-agent", 0.0)]
        for command, delay in plan:
            with pytest.raises(ProvisionError, match=r"connection|dropped"):
                commands.provision(session(env, before_call=_dropper(command, delay)), passwords, inputs,
                                   lambda _: None)
            _assert_consistent(env)
        steps, _ = commands.provision(session(env), passwords, inputs, lambda _: None)
        st = _assert_consistent(env)
        assert len(st["accounts"]) == 3 and st["masterseed"]
        assert st["rules_sha256"] == st["rules_record"]
        assert any(s.name == "agent unlock" for s in steps)
        again, results = commands.provision(
            session(env), passwords,
            AskInputs(accounts=3, policy_file=policy, write_agent_config=False), lambda _: None)
        assert not any(s.changed for s in again), again
        assert_checks_pass(results)


def _dropper(command: str, delay: float) -> Callable[[Device, str], None]:
    """before_call hook: when ``command`` is about to run, cut the transport (now or after ``delay`` s)."""

    def hook(device: Device, name: str) -> None:
        if name != command:
            return
        if delay == 0:
            device.conn.transport.close()
        else:
            threading.Timer(delay, device.conn.transport.close).start()

    return hook


def _assert_consistent(env: DeviceEnv) -> dict[str, Any]:
    """Never an account without its stored password, never a rules file that differs from its record."""
    st = _state(env)
    assert all(a["credential"] for a in st["accounts"]), st["accounts"]
    if st["rules_record"] is not None:
        assert st["rules_sha256"] == st["rules_record"]
    return st
