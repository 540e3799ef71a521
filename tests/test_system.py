"""The whole path, as a user's laptop sees it, on the qemu board standing in for a USB armory.

build (or reuse) the qemu image -> boot it in qemu-system-arm -> provision over SSH with the build's
pinned host key -> the checks pass -> through the forwarded agent port: list accounts, sign a text
message and an EIP-1559 transaction, recover both to the provisioned address with eth-account ->
power-cycle -> signing is refused while locked -> unlock -> signing works again -> a foreign Host
and a foreign Origin are refused. The guest boots like a USB armory: U-Boot reads the disk's
extlinux.conf; a copy of the image with a broken one must fail at once, with the reason.

Slow (software emulation): minutes. Timings of every phase are written to
build/system-test/timings.json and printed (see docs/architecture.md for the measured numbers).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clef_armory import config
from clef_armory.errors import QemuError
from provision import commands, qemu
from provision.secrets import Passwords
from tests.words_helpers import ScriptedTerminal

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(3600)]

REPO = Path(__file__).resolve().parent.parent
# The one address the test policy lets the device sign for; EIP-55 (Clef refuses a lower-case `to`).
RECIPIENT = "0xD1d1d1D1d1d1D1d1D1D1D1d1d1D1D1D1d1D1d1d1"
ALLOWED_ORIGIN = "https://dapp.example"
CHAIN_ID = 1
# Generous bounds: Clef's standard scrypt (N=262144, 256 MiB) under TCG takes tens of seconds.
SIGN_TIMEOUT = 600.0
READY_TIMEOUT = 900.0
# The USB armory Mk II's RAM (a 1 GiB variant exists). CLEF_ARMORY_QEMU_MEMORY overrides it for experiments.
GUEST_MEMORY_MIB = int(os.environ.get("CLEF_ARMORY_QEMU_MEMORY", "512"))


class Timings:
    """Phase -> seconds, written to build/system-test/timings.json for the closing note and bench/."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, float | list[float] | str] = {}

    def add(self, name: str, seconds: float) -> None:
        self.data[name] = round(seconds, 2)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2) + "\n")
        print(f"[system] {name}: {seconds:.1f} s")


# -- the image --------------------------------------------------------------------------------------


def _test_identity(cache: Path) -> Path:
    """A throwaway SSH key for the test's image (a fresh CI machine has no ~/.ssh key)."""
    key = cache / "system-test" / "id_ed25519"
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "clef-armory system test",
                        "-f", str(key)], check=True)
    return key


def _public(key: Path) -> str:
    return " ".join(key.with_name(key.name + ".pub").read_text().split()[:2])


def _stale(image: qemu.GuestImage) -> str | None:
    """Why the build in build/qemu/ no longer matches this checkout (None when it does)."""
    from image import build

    agent = image.manifest.get("agent", {}).get("sha256")
    if agent != build._tree_digest(build.AGENT_SRC):
        return "the agent changed since the image was built"
    built = (image.image.parent / "manifest.json").stat().st_mtime
    for tree in ("overlay", "image"):
        for path in (REPO / tree).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.stat().st_mtime > built:
                return f"{path.relative_to(REPO)} changed since the image was built"
    return None


def _identity_for(image: qemu.GuestImage, candidates: list[Path]) -> Path | None:
    baked = " ".join((image.authorized_key or "").split()[:2])
    return next((k for k in candidates if k.exists() and _public(k) == baked), None)


@pytest.fixture(scope="module")
def timings(settings: config.Settings) -> Timings:
    return Timings(settings.output_dir / "system-test" / "timings.json")


@pytest.fixture(scope="module")
def built(settings: config.Settings, timings: Timings) -> tuple[qemu.GuestImage, Path]:
    """The qemu image (reused when current and its admin key is one we hold) and the key to log in with."""
    qsettings = settings.replace(board="qemu")
    test_key = _test_identity(settings.cache_path)
    candidates = [test_key, settings.ssh_key.expanduser().with_suffix("")]
    # Developers: boot an image built elsewhere as it is (no staleness check), with its key.
    given, given_key = os.environ.get("CLEF_ARMORY_QEMU_IMAGE"), os.environ.get("CLEF_ARMORY_QEMU_IDENTITY")
    if given:
        image = qemu.find_image(qsettings, Path(given))
        identity = _identity_for(image, [Path(given_key)] if given_key else candidates)
        assert identity is not None, f"no private key matches {given}'s admin key"
        return image, identity
    # Reuse the user's build/qemu/ when it is current and we hold its key; else the test's own build in
    # build/system-test/qemu/ (made with a test key, so a user's build/qemu/ is never replaced).
    own = qsettings.replace(output_dir=settings.output_dir / "system-test",
                            ssh_key=test_key.with_name(test_key.name + ".pub"))
    why = "no image"
    for where in (qsettings, own):
        try:
            image = qemu.find_image(where)
        except QemuError as e:
            why = str(e)
            continue
        stale = _stale(image)
        identity = _identity_for(image, candidates)
        if stale is None and identity is not None:
            return image, identity
        why = stale or "its admin key is not one this test holds"
    from image import build

    print(f"[system] building the qemu image into {own.output_dir}/qemu: {why}")
    t0 = time.monotonic()
    build.build_image(own)
    timings.add("build_image", time.monotonic() - t0)
    image, identity = qemu.find_image(own), test_key
    assert identity is not None
    return image, identity


# -- the guest --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guest(built: tuple[qemu.GuestImage, Path], tmp_path_factory: pytest.TempPathFactory,
          timings: Timings) -> Iterator[qemu.QemuGuest]:
    image, _ = built
    workdir = tmp_path_factory.mktemp("qemu")  # kept by pytest: the console log survives a failure
    g = qemu.QemuGuest(image, workdir=workdir, memory_mib=GUEST_MEMORY_MIB, cpus=2,
                       boot_timeout=READY_TIMEOUT)
    try:
        timings.add("boot_to_sshd", g.start())
        yield g
    finally:
        t0 = time.monotonic()
        clean = g.stop()
        timings.add("power_off", time.monotonic() - t0)
        print(f"[system] guest powered off {'cleanly' if clean else 'by force'}; console: {g.console_log}")


@pytest.fixture(scope="module")
def passwords() -> Passwords:
    """Fresh passwords per run, held in memory only (never argv, environment or disk)."""
    chosen = {"master": secrets.token_urlsafe(18), "account": secrets.token_urlsafe(18)}
    return Passwords(ask=lambda prompt: chosen["master" if "master" in prompt else "account"])


class CallClock:
    """Session.before_call hook: when each device-helper call starts, to time provisioning's steps."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, float]] = []

    def __call__(self, device: object, name: str) -> None:
        self.marks.append((name, time.monotonic()))

    def durations(self, end: float) -> list[tuple[str, float]]:
        ends = [t for _, t in self.marks[1:]] + [end]
        return [(name, e - t) for (name, t), e in zip(self.marks, ends, strict=True)]


def _session(guest: qemu.QemuGuest, identity: Path, clock: CallClock | None = None) -> commands.Session:
    return commands.Session(guest.ssh_target(identity), link=guest.link(timeout=SIGN_TIMEOUT),
                            before_call=clock)


@pytest.fixture(scope="module")
def provisioned(guest: qemu.QemuGuest, built: tuple[qemu.GuestImage, Path], passwords: Passwords,
                timings: Timings, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Provision the guest with the policy below; returns the new account's address."""
    _, identity = built
    t0 = time.monotonic()
    policy = tmp_path_factory.mktemp("policy") / "policy.yaml"
    policy.write_text(
        f"chain_ids: [{CHAIN_ID}]\n"
        f"recipients: [\"{RECIPIENT}\"]\n"
        "max_value_eth: \"0.05\"\n"
        f"origins: [\"{ALLOWED_ORIGIN}\"]\n"
        "allow_no_origin: true\n"
        "allow_text_signing: true\n"
    )
    clock = CallClock()
    # The checks run once, as `invoke check` (test_check_passes): under emulation their search of the
    # whole filesystem for the secrets takes minutes.
    # The account password is generated (12 words, light scrypt: cheap signatures), as by default;
    # there is no terminal here, so a scripted one plays the user who writes the words down.
    terminal = ScriptedTerminal()
    inputs = commands.ProvisionInputs(accounts=1, policy_file=policy, chain_id=CHAIN_ID, run_checks=False,
                                      terminal=lambda: terminal)
    steps, _ = commands.provision(_session(guest, identity, clock), passwords, inputs)
    assert len(terminal.written) == 1 and terminal.closed  # one word set shown, then the terminal let go
    end = time.monotonic()
    timings.add("provision_total", end - t0)
    for i, (name, took) in enumerate(clock.durations(end)):
        timings.add(f"provision_{i:02d}_{name}", took)
    accounts = [s.detail for s in steps if s.name == "new account"]
    assert len(accounts) == 1, steps
    return accounts[0].lower()


# -- signing through the link -------------------------------------------------------------------------


def _sign_text(guest: qemu.QemuGuest, address: str, text: str,
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    return guest.link(timeout=SIGN_TIMEOUT).rpc(
        "account_signData", ["text/plain", address, "0x" + text.encode().hex()], headers)


def _tx(address: str) -> dict[str, str]:
    return {
        "from": address, "to": RECIPIENT, "value": hex(10**16), "gas": hex(21000),
        "maxFeePerGas": hex(30 * 10**9), "maxPriorityFeePerGas": hex(2 * 10**9),
        "nonce": "0x0", "chainId": hex(CHAIN_ID), "data": "0x",
    }


def _recover_text(text: str, signature: str) -> str:
    from eth_account import Account
    from eth_account.messages import encode_defunct

    return str(Account.recover_message(encode_defunct(text=text), signature=signature)).lower()


def _break_extlinux(image: Path, workdir: Path) -> str:
    """Point extlinux.conf's kernel line at a file that does not exist (debugfs -w, no mount)."""
    from image.boards import PARTITION_START
    from image.inspect import Image

    path = "/boot/extlinux/extlinux.conf"
    text = Image(image).read(path).decode()
    broken = text.replace("kernel /boot/vmlinuz-", "kernel /boot/vmlinuz-missing-")
    assert broken != text, text
    local = workdir / "extlinux.conf"
    local.write_text(broken)
    script = workdir / "break.debugfs"
    script.write_text(f"cd /boot/extlinux\nrm extlinux.conf\nwrite {local} extlinux.conf\n")
    subprocess.run(["debugfs", "-w", "-f", str(script), f"{image}?offset={PARTITION_START}"],
                   check=True, capture_output=True)
    assert Image(image).read(path).decode() == broken
    return next(line.split()[1] for line in broken.splitlines() if line.strip().startswith("kernel "))


def test_broken_extlinux_fails_fast(built: tuple[qemu.GuestImage, Path], tmp_path: Path,
                                    timings: Timings) -> None:
    """The disk's extlinux.conf is what boots the guest: break it and the boot stops at once, saying why.

    Runs first, before the module's guest is booted, on a sparse copy of the same built image.
    """
    image, _ = built
    copy = tmp_path / image.image.name
    subprocess.run(["cp", "--sparse=always", str(image.image), str(copy)], check=True)
    kernel = _break_extlinux(copy, tmp_path)
    guest = qemu.QemuGuest(dataclasses.replace(image, image=copy), boot_timeout=READY_TIMEOUT,
                           stop_timeout=10)
    t0 = time.monotonic()
    try:
        with pytest.raises(QemuError) as err, guest:
            pass
    finally:
        copy.unlink()  # 300 MB of real blocks
    took = time.monotonic() - t0
    timings.add("broken_extlinux_to_error", took)
    message = str(err.value)
    print(f"[system] broken extlinux.conf: {message}")
    assert "\n" not in message
    assert re.match(r"boot failed after \d+ s: ", message), message
    assert f"U-Boot could not load the kernel {kernel} that /boot/extlinux/extlinux.conf names" in message
    assert took < 120, f"the failure took {took:.0f} s to be reported"  # about 5 s; the timeout is 900 s
    assert guest.proc is None


def test_check_passes(guest: qemu.QemuGuest, built: tuple[qemu.GuestImage, Path], provisioned: str,
                      passwords: Passwords, timings: Timings) -> None:
    _, identity = built
    t0 = time.monotonic()
    results = commands.check(_session(guest, identity), passwords, text_signing=True)
    timings.add("check", time.monotonic() - t0)
    failed = [f"{r.name}: {r.reason}" for r in results if not r.ok]
    assert results and not failed, failed


def test_list_and_sign_through_the_link(guest: qemu.QemuGuest, provisioned: str, timings: Timings) -> None:
    from eth_account import Account

    link = guest.link(timeout=SIGN_TIMEOUT)
    status, body = link.rpc("account_list", [])
    assert status == 200, body
    assert [a.lower() for a in body["result"]] == [provisioned]

    text = f"clef-armory system test {secrets.token_hex(4)}"
    t0 = time.monotonic()
    status, body = _sign_text(guest, provisioned, text)
    timings.add("sign_text", time.monotonic() - t0)
    assert status == 200 and "result" in body, body
    assert _recover_text(text, body["result"]) == provisioned

    t0 = time.monotonic()
    status, body = link.rpc("account_signTransaction", [_tx(provisioned)])
    timings.add("sign_eip1559", time.monotonic() - t0)
    assert status == 200 and "result" in body, body
    raw = body["result"]["raw"]
    assert raw.startswith("0x02"), "not an EIP-1559 (type 2) transaction"
    assert str(Account.recover_transaction(raw)).lower() == provisioned
    signed = body["result"]["tx"]
    assert signed["to"].lower() == RECIPIENT.lower() and int(signed["value"], 16) == 10**16
    assert int(signed["chainId"], 16) == CHAIN_ID

    # The rules still decide: a recipient outside the policy is refused.
    outsider = "0xEeeeeEeeeEeEeeEeEeEeeEEEeeeeEeeeeeeeEEeE"
    status, body = link.rpc("account_signTransaction", [{**_tx(provisioned), "to": outsider}])
    assert "request denied" in str((body or {}).get("error")), body


def test_locked_after_reboot_until_unlocked(guest: qemu.QemuGuest, built: tuple[qemu.GuestImage, Path],
                                           provisioned: str, passwords: Passwords, timings: Timings) -> None:
    _, identity = built
    t0 = time.monotonic()
    timings.add("power_cycle_to_sshd", guest.power_cycle())
    health = _wait_for_state(guest, "locked", READY_TIMEOUT)
    timings.add("power_cycle_to_agent_locked", time.monotonic() - t0)
    assert health["state"] == "locked"

    status, body = _sign_text(guest, provisioned, "must not be signed while locked")
    assert "result" not in (body or {}), body
    assert status != 200 or "error" in body

    t0 = time.monotonic()
    health = commands.unlock(_session(guest, identity), passwords)
    timings.add("unlock_to_ready", time.monotonic() - t0)
    assert health["state"] == "ready"

    text = "signed again after unlock"
    t0 = time.monotonic()
    status, body = _sign_text(guest, provisioned, text)
    timings.add("sign_text_after_unlock", time.monotonic() - t0)
    assert status == 200 and _recover_text(text, body["result"]) == provisioned


def test_foreign_host_and_origin_refused(guest: qemu.QemuGuest, provisioned: str) -> None:
    link = guest.link(timeout=SIGN_TIMEOUT)
    status, body = link.rpc("account_list", [], {"Host": "evil.example:8550"})
    assert status == 403 and "result" not in (body or {}), (status, body)
    status, body = link.rpc("account_list", [], {"Origin": "https://evil.example"})
    assert status == 403 and "result" not in (body or {}), (status, body)
    # ... while the policy's own Origin is served (so the refusals above are about the header).
    status, body = link.rpc("account_list", [], {"Origin": ALLOWED_ORIGIN})
    assert status == 200 and [a.lower() for a in body["result"]] == [provisioned], (status, body)
    status, body = _sign_text(guest, provisioned, "from a foreign page", {"Origin": "https://evil.example"})
    assert status == 403 and "result" not in (body or {}), (status, body)


def _wait_for_state(guest: qemu.QemuGuest, state: str, timeout: float) -> dict[str, Any]:
    """Poll the agent's /health through the link until it reports ``state`` (bounded)."""
    from clef_armory.errors import ProvisionError

    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            health = guest.link(timeout=30).health()
            if health.get("state") == state:
                return health
            last = health
        except ProvisionError as e:
            last = str(e)
        time.sleep(2.0)
    raise AssertionError(f"agent did not report {state!r} within {timeout:.0f} s (last: {last})")
