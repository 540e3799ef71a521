"""Every key-handling check, made to fail by a real fault on a real provisioned "device".

Faults that cannot be produced on a shared build host (swap, Yama ptrace scope, a journal)
are covered by the verdict tests in test_provision_units.py.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from provision import checks, commands
from provision.checks import CheckResult
from provision.commands import ProvisionInputs, Session
from provision.secrets import Passwords, Secret
from tests.sshd_helpers import DEVICE_IP, SSHD, DeviceEnv, device_env

# These tests choose the account password (standard scrypt); tests/test_provision_words.py
# covers the generated words.
AskInputs = functools.partial(ProvisionInputs, account_password="ask")

pytestmark = pytest.mark.integration


class Provisioned:
    def __init__(self, env: DeviceEnv, master: str, account: str) -> None:
        self.env = env
        self.master = master
        self.account = account

    @property
    def layout(self) -> Any:
        return self.env.layout

    def session(self, **kw: Any) -> Session:
        return self.env.session(**kw)

    def device_checks(self, **layout_changes: Any) -> dict[str, CheckResult]:
        s = self.session()
        if layout_changes:
            s = Session(s.target, s.layout.replace(**layout_changes), s.link, s.ssh_socket)
        conn, device = s.open()
        with conn:
            found = checks.device_checks(device, [Secret(self.master), Secret(self.account)])
        return {r.name: r for r in found}

    def restart_and_unlock(self) -> None:
        conn, device = self.session().open()
        with conn:
            device.call("restart-agent")
        commands.unlock(self.session(), Passwords(ask=lambda p: self.master))


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory, clef_binary: Path) -> Iterator[Provisioned]:
    work = tmp_path_factory.mktemp("checks")
    master, account = "M-" + secrets.token_urlsafe(16), "A-" + secrets.token_urlsafe(16)
    answers = iter([master, master, account, account])
    policy = work / "policy.yaml"
    policy.write_text(json.dumps({"recipients": ["0x" + "11" * 20], "allow_text_signing": True}))
    with device_env(work, clef_binary) as env:
        commands.provision(env.session(), Passwords(ask=lambda p: next(answers)),
                           AskInputs(policy_file=policy, write_agent_config=False, run_checks=False),
                           lambda _: None)
        yield Provisioned(env, master, account)


def _one_file(directory: str) -> Path:
    return next(p for p in sorted(Path(directory).iterdir()) if p.is_file())


@contextlib.contextmanager
def chmod(path: Path, mode: int) -> Iterator[None]:
    old = path.stat().st_mode & 0o7777
    os.chmod(path, mode)
    try:
        yield
    finally:
        os.chmod(path, old)


def assert_fails(results: dict[str, CheckResult], name: str, reason: str) -> None:
    assert not results[name].ok, results[name]
    assert reason in results[name].reason, results[name]


def test_baseline_passes_what_this_host_can_pass(dev: Provisioned) -> None:
    results = dev.device_checks()
    failing = sorted(n for n, r in results.items() if not r.ok)
    assert failing == ["ptrace", "sshd"], [results[n] for n in failing]


def test_key_file_0644_fails_keystore(dev: Provisioned) -> None:
    key = _one_file(dev.layout.keystore)
    with chmod(key, 0o644):
        assert_fails(dev.device_checks(), "keystore", f"{key} is 0644, not 0600")
    assert dev.device_checks()["keystore"].ok


def test_keystore_dir_0755_fails_keystore(dev: Provisioned) -> None:
    with chmod(Path(dev.layout.keystore), 0o755):
        assert_fails(dev.device_checks(), "keystore", "is 0755, not 0700")


def test_key_copy_elsewhere_fails_stray_keys(dev: Provisioned) -> None:
    copy = dev.env.root / "home" / "armory" / "backup.json"
    copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(_one_file(dev.layout.keystore), copy)
    try:
        assert_fails(dev.device_checks(), "stray-keys", str(copy))
    finally:
        copy.unlink()


def test_masterseed_0600_fails(dev: Provisioned) -> None:
    seed = Path(dev.layout.configdir) / "masterseed.json"
    with chmod(seed, 0o600):
        assert_fails(dev.device_checks(), "masterseed", "is 0600, not 0400")


def test_vault_file_0644_fails_vault(dev: Provisioned) -> None:
    vault = next(p for p in Path(dev.layout.configdir).iterdir() if p.is_dir())
    with chmod(vault / "credentials.json", 0o644):
        assert_fails(dev.device_checks(), "vault", "credentials.json is 0644, not 0600")


def test_password_written_to_a_file_fails_secrets(dev: Provisioned) -> None:
    leak = dev.env.root / "var" / "log" / "debug.log"
    leak.parent.mkdir(parents=True, exist_ok=True)
    leak.write_text("x" * 5000 + f"unlock with {dev.account} please\n")
    try:
        assert_fails(dev.device_checks(), "secrets", f"password #2 found in {leak}")
    finally:
        leak.unlink()


def test_password_in_the_journal_fails_secrets(dev: Provisioned) -> None:
    journal = Path(dev.layout.journal_command[-1])
    original = journal.read_text()
    journal.write_text(original + f"sudo[42]: armory : COMMAND=/usr/bin/echo {dev.master}\n")
    try:
        assert_fails(dev.device_checks(), "secrets", "password #1 found 1 time(s) in the journal")
    finally:
        journal.write_text(original)


def test_password_across_a_read_chunk_boundary_is_found(dev: Provisioned) -> None:
    leak = dev.env.root / "var" / "big.bin"
    leak.parent.mkdir(parents=True, exist_ok=True)
    with open(leak, "wb") as f:  # the secret straddles the 1 MiB read boundary
        f.write(b"\0" * ((1 << 20) + (64 * 1024) + 1 - 5) + dev.master.encode() + b"\0" * 100)
    try:
        assert_fails(dev.device_checks(), "secrets", "password #1 found")
    finally:
        leak.unlink()


@contextlib.contextmanager
def device_process(dev: Provisioned, *argv: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(dev.env.link.device_exec(*argv), stdin=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        yield proc
    finally:
        proc.kill()
        proc.wait()


LISTENER = "import socket,time; s=socket.socket(); s.bind(('0.0.0.0', 9999)); s.listen(); time.sleep(60)"


def test_listener_on_all_addresses_fails_listeners(dev: Provisioned) -> None:
    with device_process(dev, "/usr/bin/python3", "-c", LISTENER):
        assert_fails(dev.device_checks(), "listeners", "unexpected listener: python3 on tcp 0.0.0.0:9999")
    assert dev.device_checks()["listeners"].ok


def test_accepting_input_chain_fails_firewall(dev: Provisioned) -> None:
    nft = dev.env.link.device_exec("nft")
    chain = "add chain inet filter open { type filter hook input priority 10; policy accept; }"
    subprocess.run([*nft, chain], check=True)
    try:
        assert_fails(dev.device_checks(), "firewall", "input chain filter/open has policy accept")
    finally:
        subprocess.run([*nft, "delete chain inet filter open"], check=True)
    subprocess.run([*nft, "flush ruleset"], check=True)
    try:
        assert_fails(dev.device_checks(), "firewall", "no nftables chain hooked to input")
    finally:
        from tests.sshd_helpers import load_firewall

        load_firewall(dev.env.link)
    assert dev.device_checks()["firewall"].ok


def test_ip_forwarding_fails_forwarding(dev: Provisioned) -> None:
    sysctl = dev.env.link.device_exec("sysctl", "-q", "-w")
    subprocess.run([*sysctl, "net.ipv4.ip_forward=1"], check=True)
    try:
        assert_fails(dev.device_checks(), "forwarding", "net.ipv4.ip_forward is 1")
    finally:
        subprocess.run([*sysctl, "net.ipv4.ip_forward=0"], check=True)


def test_sshd_effective_config(dev: Provisioned, tmp_path: Path) -> None:
    """The check reads `sshd -T`: a hardened config passes, password authentication fails."""
    base = dev.env.sshd.config.read_text().replace("PermitRootLogin prohibit-password", "PermitRootLogin no")
    hardened, weak = tmp_path / "hardened", tmp_path / "weak"
    hardened.write_text(base)
    weak.write_text(base.replace("PasswordAuthentication no", "PasswordAuthentication yes"))
    match = ("-C", "user=armory,host=laptop,addr=10.0.0.2")
    good = dev.device_checks(sshd_effective_config=(SSHD, "-T", "-f", str(hardened), *match))
    assert good["sshd"].ok, good["sshd"]
    bad = dev.device_checks(sshd_effective_config=(SSHD, "-T", "-f", str(weak), *match))
    assert_fails(bad, "sshd", "passwordauthentication is yes")
    # A Match block that lets one user in with a password is caught too (the check asks for that user).
    sneaky = tmp_path / "sneaky"
    sneaky.write_text(base + "Match User armory\n  PasswordAuthentication yes\n")
    assert_fails(dev.device_checks(sshd_effective_config=(SSHD, "-T", "-f", str(sneaky), *match)),
                 "sshd", "passwordauthentication is yes")


def test_process_allowed_to_dump_core_fails_coredumps(dev: Provisioned) -> None:
    # A process that counts as the agent (armory_agent on its command line) with no core limit.
    script = "import resource,time; resource.setrlimit(resource.RLIMIT_CORE, (0, -1)); time.sleep(60)"
    with device_process(dev, "/usr/bin/python3", "-c", script, "armory_agent"):
        assert_fails(dev.device_checks(), "coredumps", "may dump core (limit unlimited)")
    assert dev.device_checks()["coredumps"].ok


def test_edited_rules_fail_attested_then_enabled(dev: Provisioned) -> None:
    rules = Path(dev.layout.rules)
    original = rules.read_bytes()
    rules.write_bytes(original + b"\n// edited on the device\n")
    try:
        assert_fails(dev.device_checks(), "rules-attested", "differs from the attested")
        dev.restart_and_unlock()  # Clef starts with the edited, unattested rules: it disables them
        assert_fails(dev.device_checks(), "rules-enabled", "Clef rules disabled: rules not attested")
    finally:
        rules.write_bytes(original)
        dev.restart_and_unlock()
    after = dev.device_checks()
    assert after["rules-attested"].ok and after["rules-enabled"].ok


def test_link_checks_fail_on_wrong_accounts_and_open_agent(dev: Provisioned) -> None:
    link = dev.session().link
    assert link is not None
    conn, device = dev.session().open()
    with conn:
        provisioned = [a["address"] for a in device.call("state")["accounts"]]
    good = {r.name: r for r in checks.link_checks(link, provisioned)}
    assert all(r.ok for r in good.values()), good
    extra = {r.name: r for r in checks.link_checks(link, [*provisioned, "0x" + "22" * 20])}
    assert_fails(extra, "link-accounts", "expected")

    # An agent configured to let a foreign Host and Origin through: both checks catch it.
    config = Path(dev.layout.agent_config)
    original = config.read_text()
    cfg = json.loads(original)
    cfg["policy"]["hosts"] = [*cfg["policy"]["hosts"], "evil.example", "evil.example:8550"]
    cfg["policy"]["origins"] = ["https://evil.example"]
    config.write_text(json.dumps(cfg))
    try:
        dev.restart_and_unlock()
        opened = {r.name: r for r in checks.link_checks(link, provisioned)}
        assert_fails(opened, "link-host", "foreign Host header was served")
        assert_fails(opened, "link-origin", "foreign Origin was served")
    finally:
        config.write_text(original)
        dev.restart_and_unlock()
    assert DEVICE_IP in link.host


@pytest.mark.timeout(300)
def test_search_skips_a_proc_mounted_in_a_chroot(dev: Provisioned) -> None:
    """/proc/kmsg blocks when read: a procfs mounted anywhere in the tree is not searched."""
    chroot_proc = dev.env.root / "srv" / "chroot" / "proc"
    chroot_proc.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "proc", "proc", str(chroot_proc)], check=True)
    try:
        results = dev.device_checks()
        assert results["secrets"].ok and results["stray-keys"].ok
    finally:
        subprocess.run(["umount", str(chroot_proc)], check=True)
