"""The whole path, as a user's laptop sees it, on the qemu board standing in for a USB armory.

build (or reuse) the qemu image -> in a network namespace made for the test (the laptop), `./do run-qemu`
boots it on a tap at 10.0.0.2/24 with the device at 10.0.0.1 -> `./do provision --host 10.0.0.1 --policy
docs/examples/policy.yaml` (master password from a 0600 --password-file, the generated words shown on and
typed back through a real pseudo-terminal) -> `./do check --json` passes -> through 10.0.0.1:8550: list
accounts, sign a text message and an EIP-1559 transaction, recover both to the provisioned address with
eth-account; the policy's fee cap and token rule; a foreign Host and Origin refused -> the docs' snippets
(curl, geth --signer, web3.py, ethers.js) as written -> last, updating: an update stream cut half-way and
the power pulled (Ctrl-C to run-qemu, run again on the same --state) leave slot 1 running, locked until
`./do unlock`; `./do update --image B` (run-qemu boots the guest again when it reboots) moves it to slot 2
with the same host key and account; `./do update --rollback` back to slot 1. Every command is the real
command line, run as a subprocess inside the namespace; its exit code and output are asserted. The guest
boots like a USB armory: U-Boot reads the disk's extlinux.conf; a copy of the image with a broken one must
fail at once, with the reason; QEMU killed under run-qemu is one line and no interface left.

One guest for the module (``device``: booted and provisioned, in the namespace ``device.ns``): later steps
add tests that take ``device`` and run more commands with ``device.do(...)`` or dial ``device.link()``;
tests that reboot or update it go at the end of the file (pytest runs them in file order).

Slow (software emulation): minutes. Timings of every phase are written to
build/system-test/timings.json and printed (see docs/architecture.md for the measured numbers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from armory_agent import contract
from clef_armory import config
from clef_armory.errors import QemuError, UpdateError
from provision import commands, qemu
from provision import update as updating
from provision.link import Link
from provision.qemu import terminate
from provision.ssh import Target
from tests.netns_helpers import Background, call_in, connect_in, do, ip, links, namespace, run_do
from tests.words_helpers import PtyUser

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(3600)]

REPO = Path(__file__).resolve().parent.parent
# The policy a user would start from; the docs' snippets (docs/clients.md) are written against it.
POLICY = REPO / "docs" / "examples" / "policy.yaml"
# The one address that policy lets the device pay; EIP-55 (Clef refuses a lower-case `to`).
RECIPIENT = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"
ALLOWED_ORIGIN = "https://app.example"
CHAIN_ID = 1337  # geth --dev's chain: the docs' snippets send through a dev node on it
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

    if "system" not in image.manifest:
        return "the image predates the A/B system slots"
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


# -- the guest: `./do run-qemu` in the test's namespace ----------------------------------------------------


@pytest.fixture(scope="module")
def lab() -> Iterator[str]:
    """The laptop's network namespace (10.0.0.x exists only in there)."""
    with namespace("sys") as ns:
        yield ns


@dataclasses.dataclass
class Device:
    """The booted guest as the user reaches it: commands run inside ``ns``; sockets made there."""

    ns: str
    image: qemu.GuestImage
    identity: Path
    state: Path
    password_file: Path
    timings: Timings
    run: Background | None = None
    address: str = ""  # the provisioned account (lower case), set by the ``provisioned`` fixture

    def do(self, *args: str, timeout: float = 1800.0, **kw: Any) -> subprocess.CompletedProcess[str]:
        """``./do TASK ARGS`` in the namespace, with the build's pinned key and the test's login key."""
        task, *rest = args
        ssh = ["--known-hosts", str(self.image.known_hosts), "--identity", str(self.identity)]
        logs_in = task in ("provision", "unlock", "check", "status", "update")
        return run_do(self.ns, task, *(ssh if logs_in else []), *rest, timeout=timeout, **kw)

    def link(self, timeout: float = SIGN_TIMEOUT) -> Link:
        """10.0.0.1:8550 dialled from inside the namespace, as any client on the laptop would."""
        return Link(host=qemu.DEVICE_ADDRESS, port=qemu.AGENT_PORT, timeout=timeout,
                    connect=lambda host, port, t: connect_in(self.ns, (host, port), t))

    def boot(self) -> float:
        """`./do run-qemu --state ...` until it says the guest is up; returns boot -> sshd seconds."""
        assert self.run is None or self.run.proc.poll() is not None
        self.run = Background(do(self.ns, "run-qemu", "--image", str(self.image.image), "--state",
                                 str(self.state), "--memory", str(GUEST_MEMORY_MIB), "--timeout",
                                 str(READY_TIMEOUT)))
        self.run.wait_for("running; Ctrl-C powers the guest off", READY_TIMEOUT + 60)
        assert "armory0" in links(self.ns)
        up = self.run.wait_for("guest up: sshd answers on 10.0.0.1:22 after", 5)
        assert "link:  armory0 10.0.0.2/24" in "\n".join(self.run.lines), self.run.output()
        return float(re.search(r"after (\d+) s", up).group(1))  # type: ignore[union-attr]

    def power_off(self) -> float:
        """Ctrl-C to run-qemu: the guest powers off cleanly, the tap is gone, exit 0."""
        assert self.run is not None
        t0 = time.monotonic()
        self.run.interrupt()
        code = self.run.finish(300)
        assert code == 0 and "guest stopped" in self.run.lines, self.run.output()
        assert "armory0" not in links(self.ns)
        return time.monotonic() - t0


@pytest.fixture(scope="module")
def device(built: tuple[qemu.GuestImage, Path], lab: str, tmp_path_factory: pytest.TempPathFactory,
           timings: Timings) -> Iterator[Device]:
    """The guest, booted by `./do run-qemu` on the tap in ``lab`` (one boot for the module, plus the
    power cycle of test_locked_after_reboot_until_unlocked)."""
    image, identity = built
    work = tmp_path_factory.mktemp("device")  # kept by pytest: the state survives a failure for a look
    secret = work / "passwords"
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:  # the master password only: the account's are the generated words
        f.write(f"master: {secrets.token_urlsafe(18)}\n")
    dev = Device(lab, image, identity, work / "state.qcow2", secret, timings)
    try:
        timings.add("boot_to_sshd", dev.boot())
        yield dev
    finally:
        if dev.run is not None and dev.run.proc.poll() is None:
            timings.add("power_off", dev.power_off())


def _provision_on_a_pty(dev: Device, *args: str) -> tuple[subprocess.CompletedProcess[str], PtyUser]:
    """Run provision with a real terminal as its controlling tty (where the generated words go);
    stdout/stderr are pipes, as in a script. The user on the pty writes the words down, types two back."""
    import fcntl
    import termios

    with PtyUser() as user:
        slave = os.open(user.path, os.O_RDWR)
        try:
            result = subprocess.run(
                do(dev.ns, "provision", "--known-hosts", str(dev.image.known_hosts), "--identity",
                   str(dev.identity), *args),
                cwd=REPO, stdin=slave, capture_output=True, text=True, timeout=3000, check=False,
                start_new_session=True, preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        finally:
            os.close(slave)
    return result, user


@pytest.fixture(scope="module")
def provisioned(device: Device, timings: Timings) -> Device:
    """`./do provision --host 10.0.0.1 --policy docs/examples/policy.yaml --chain-id 1337` as a user types
    it (plus the test's key and the build's known_hosts, which live outside build/qemu/); sets
    device.address."""
    t0 = time.monotonic()
    # The checks run once, as `./do check` (test_check_passes): under emulation their search of the whole
    # filesystem for the secrets takes minutes.
    result, user = _provision_on_a_pty(device, "--host", "10.0.0.1", "--policy", str(POLICY),
                                       "--chain-id", str(CHAIN_ID), "--password-file",
                                       str(device.password_file), "--no-checks", "--yes")
    timings.add("provision_total", time.monotonic() - t0)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert len(user.written) == 1 and len(user.written[0]) == 12, user.screen[-500:]
    phrase = " ".join(user.written[0])
    assert phrase not in result.stdout + result.stderr, "the words leaked into the output"
    found = re.search(r"^new account\s+changed\s+(0x[0-9a-f]{40})$", result.stdout, re.M)
    assert found, result.stdout
    assert re.search(r"^agent unlock\s+\w+\s+unlocked, ready", result.stdout, re.M), result.stdout
    device.address = found.group(1).lower()
    # For `./do check`: a second 0600 file with the words too, so the checks search the device for both.
    with_words = device.password_file.with_name("passwords-all")
    fd = os.open(with_words, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(device.password_file.read_text() + f"account: {phrase}\n")
    return device


# -- signing through the link -------------------------------------------------------------------------


def _sign_text(dev: Device, address: str, text: str,
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    return dev.link().rpc("account_signData", ["text/plain", address, "0x" + text.encode().hex()], headers)


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


def test_run_qemu_removes_the_tap_when_qemu_dies(built: tuple[qemu.GuestImage, Path], tmp_path: Path,
                                                 timings: Timings) -> None:
    """QEMU killed under `./do run-qemu` (a crash): one line, exit 1, no interface left. Runs before the
    module's guest, in its own namespace, and kills QEMU seconds into the boot (no second full boot)."""
    image, _ = built
    with namespace("die") as ns:
        run = Background(do(ns, "run-qemu", "--image", str(image.image)))
        run.wait_for("booting ", 120)
        assert "armory0" in links(ns)
        pids = [int(p) for p in ip("netns", "pids", ns).stdout.split()]
        qemus = [p for p in pids if Path(f"/proc/{p}/comm").read_text().strip() == "qemu-system-arm"]
        assert len(qemus) == 1, pids
        os.kill(qemus[0], signal.SIGKILL)
        code = run.finish(120)
        errors = [line for line in run.errors if line.startswith("error:")]
        assert code == 1 and len(errors) == 1, run.output()
        assert "qemu-system-arm stopped" in errors[0] and "killed by SIGKILL" in errors[0], errors
        assert "Traceback" not in run.output()
        assert links(ns) == ["lo"]


def test_check_passes(provisioned: Device, timings: Timings) -> None:
    dev = provisioned
    t0 = time.monotonic()
    result = dev.do("check", "--json", "--password-file", str(dev.password_file.with_name("passwords-all")))
    timings.add("check", time.monotonic() - t0)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    report = json.loads(result.stdout)
    failed = [f"{r['name']}: {r['reason']}" for r in report["checks"] if not r["ok"]]
    assert report["ok"] and not failed and len(report["checks"]) >= 15, failed


def test_list_and_sign_through_the_link(provisioned: Device, timings: Timings) -> None:
    from eth_account import Account

    dev = provisioned
    link = dev.link()
    status, body = link.rpc("account_list", [])
    assert status == 200, body
    assert [a.lower() for a in body["result"]] == [dev.address]

    text = f"clef-armory system test {secrets.token_hex(4)}"
    t0 = time.monotonic()
    status, body = _sign_text(dev, dev.address, text)
    timings.add("sign_text", time.monotonic() - t0)
    assert status == 200 and "result" in body, body
    assert _recover_text(text, body["result"]) == dev.address

    t0 = time.monotonic()
    status, body = link.rpc("account_signTransaction", [_tx(dev.address)])
    timings.add("sign_eip1559", time.monotonic() - t0)
    assert status == 200 and "result" in body, body
    raw = body["result"]["raw"]
    assert raw.startswith("0x02"), "not an EIP-1559 (type 2) transaction"
    assert str(Account.recover_transaction(raw)).lower() == dev.address
    signed = body["result"]["tx"]
    assert signed["to"].lower() == RECIPIENT.lower() and int(signed["value"], 16) == 10**16
    assert int(signed["chainId"], 16) == CHAIN_ID

    # The rules still decide: a recipient outside the policy is refused.
    outsider = "0xEeeeeEeeeEeEeeEeEeEeeEEEeeeeEeeeeeeeEEeE"
    status, body = link.rpc("account_signTransaction", [{**_tx(dev.address), "to": outsider}])
    assert "request denied" in str((body or {}).get("error")), body


ERC20_TOKEN = "0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48"  # docs/examples/policy.yaml's token rule


def _erc20_transfer(address: str, to: str, amount: int) -> dict[str, str]:
    data = "0xa9059cbb" + to.lower().removeprefix("0x").rjust(64, "0") + format(amount, "064x")
    return {**_tx(address), "to": ERC20_TOKEN, "value": "0x0", "gas": hex(60000), "data": data}


def test_policy_bounds_fees_and_calls_through_the_link(provisioned: Device) -> None:
    """The example policy's fee caps and ERC-20 rule, decided by the device's rules (issue 14)."""
    from eth_account import Account

    link = provisioned.link()
    # The fee bomb: 1 wei to the allowed recipient, but 30M gas at 655,360 gwei (a 19,660 ETH fee).
    bomb = {**_tx(provisioned.address), "value": "0x1", "gas": hex(30_000_000),
            "maxFeePerGas": hex(655_360 * 10**9)}
    status, body = link.rpc("account_signTransaction", [bomb])
    assert "request denied" in str((body or {}).get("error")), body
    # A token transfer to a stranger is refused; the same transfer to the listed recipient is signed.
    stranger = "0x1111111111111111111111111111111111111111"
    status, body = link.rpc("account_signTransaction", [_erc20_transfer(provisioned.address, stranger, 1)])
    assert "request denied" in str((body or {}).get("error")), body
    status, body = link.rpc("account_signTransaction", [_erc20_transfer(provisioned.address, RECIPIENT, 1)])
    assert status == 200 and "result" in body, body
    assert str(Account.recover_transaction(body["result"]["raw"])).lower() == provisioned.address


def test_foreign_host_and_origin_refused(provisioned: Device) -> None:
    dev = provisioned
    link = dev.link()
    status, body = link.rpc("account_list", [], {"Host": "evil.example:8550"})
    assert status == 403 and "result" not in (body or {}), (status, body)
    status, body = link.rpc("account_list", [], {"Origin": "https://evil.example"})
    assert status == 403 and "result" not in (body or {}), (status, body)
    # ... while the policy's own Origin is served (so the refusals above are about the header).
    status, body = link.rpc("account_list", [], {"Origin": ALLOWED_ORIGIN})
    assert status == 200 and [a.lower() for a in body["result"]] == [dev.address], (status, body)
    status, body = _sign_text(dev, dev.address, "from a foreign page", {"Origin": "https://evil.example"})
    assert status == 403 and "result" not in (body or {}), (status, body)


def _wait_for_state(dev: Device, state: str, timeout: float) -> dict[str, Any]:
    """Poll the agent's /health through the link until it reports ``state`` (bounded)."""
    from clef_armory.errors import ProvisionError

    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            health = dev.link(timeout=30).health()
            if health.get("state") == state:
                return health
            last = health
        except ProvisionError as e:
            last = str(e)
        time.sleep(2.0)
    raise AssertionError(f"agent did not report {state!r} within {timeout:.0f} s (last: {last})")


# -- the docs, run as written against the guest -----------------------------------------------------------
# docs/clients.md and docs/quickstart.md are read here and their commands run unchanged inside the lab
# namespace, except where a page says "YOUR-..." (the test fills in the address and a node) and geth's
# network flag (--dev: a throwaway chain on this machine instead of Sepolia; chain id 1337, which the device
# is provisioned for and docs/examples/policy.yaml allows).

DOCS = REPO / "docs"
NODE_PORT = 8545


def fenced_blocks(page: Path, heading: str, lang: str) -> list[str]:
    """The ```lang blocks under ``## heading`` (up to the next ## heading) of a docs page."""
    text = page.read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    section = text[start:end if end >= 0 else len(text)]
    return re.findall(rf"^```{lang}\n(.*?)^```$", section, re.S | re.M)


def json_documents(text: str) -> list[Any]:
    """JSON values printed one after another (curl -s prints no newline between answers)."""
    decoder, docs, at = json.JSONDecoder(), [], 0
    while at < len(text):
        if text[at].isspace():
            at += 1
            continue
        doc, at = decoder.raw_decode(text, at)
        docs.append(doc)
    return docs


def _in_ns(dev: Device, argv: list[str], timeout: float = 600, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", dev.ns, *argv], capture_output=True, text=True,
                          timeout=timeout, check=False, start_new_session=True, **kw)


def _node_rpc(dev: Device, method: str, params: list[Any]) -> Any:
    link = Link(host="127.0.0.1", port=NODE_PORT, timeout=60,
                connect=lambda host, port, t: connect_in(dev.ns, (host, port), t))
    status, body = link.rpc(method, params)
    assert status == 200 and "result" in body, (method, body)
    return body["result"]


@contextlib.contextmanager
def _geth(dev: Device, argv: list[str], datadir: Path) -> Iterator[None]:
    """A geth in the lab namespace, answering JSON-RPC on its 127.0.0.1:8545 (stopped afterwards)."""
    log = (datadir / "geth.log").open("wb")
    quiet = ["--http.addr", "127.0.0.1", "--http.port", str(NODE_PORT), "--port", "0", "--nodiscover",
             "--maxpeers", "0", "--ipcdisable"]  # loopback RPC only, no peers
    proc = subprocess.Popen(["ip", "netns", "exec", dev.ns, *argv, *quiet], stdout=log, stderr=log,
                            start_new_session=True)
    try:
        deadline, last = time.monotonic() + 120, ""
        while True:
            assert proc.poll() is None, (datadir / "geth.log").read_text()[-2000:]
            assert time.monotonic() < deadline, f"geth did not answer: {last}"
            try:
                _node_rpc(dev, "eth_chainId", [])
                break
            except Exception as e:  # not listening yet
                last = str(e)
                time.sleep(1)
        yield
    finally:
        terminate(proc, grace=20)
        log.close()


def _genesis(address: str) -> dict[str, Any]:
    """A one-node chain 1337 whose genesis pays the armory's account (nothing mines on it)."""
    forks = ["homestead", "eip150", "eip155", "eip158", "byzantium", "constantinople", "petersburg",
             "istanbul", "berlin", "london", "mergeNetsplit"]
    return {
        "config": {"chainId": CHAIN_ID, **{f"{f}Block": 0 for f in forks}, "terminalTotalDifficulty": 0,
                   "shanghaiTime": 0, "cancunTime": 0,
                   "blobSchedule": {"cancun": {"target": 3, "max": 6, "baseFeeUpdateFraction": 3338477}}},
        "difficulty": "0x0", "gasLimit": hex(30_000_000), "baseFeePerGas": hex(10**9),
        "alloc": {address: {"balance": hex(10**18)}},
    }


@pytest.fixture
def geth_signer(provisioned: Device, geth_binary: Path, tmp_path: Path, timings: Timings) -> Iterator[Device]:
    """docs/clients.md's geth line as written, with a local chain for --sepolia (no network here): geth
    signs through the armory and puts the result in its transaction pool (nothing mines on this chain)."""
    dev = provisioned
    (line,) = [x for x in fenced_blocks(DOCS / "clients.md", "geth (`--signer`)", "sh")[0].splitlines()
               if x.startswith("geth --sepolia --signer")]
    argv = line.split("#")[0].split()
    assert argv[:4] == ["geth", "--sepolia", "--signer", "http://10.0.0.1:8550"], argv
    (tmp_path / "genesis.json").write_text(json.dumps(_genesis(dev.address)))
    subprocess.run([str(geth_binary), "init", "--datadir", str(tmp_path / "data"),
                    str(tmp_path / "genesis.json")], check=True, capture_output=True, timeout=120)
    t0 = time.monotonic()
    with _geth(dev, [str(geth_binary), "--datadir", str(tmp_path / "data"), "--networkid", str(CHAIN_ID),
                     *argv[2:]], tmp_path):
        timings.add("geth_signer_up", time.monotonic() - t0)
        yield dev


@pytest.fixture(scope="module")
def dev_chain(provisioned: Device, geth_binary: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Device]:
    """`geth --dev` in the lab namespace: the "YOUR-NODE" of the web3.py and ethers.js snippets (chain 1337,
    mines each transaction at once). Its own account pays the armory's 1 ETH first."""
    dev = provisioned
    datadir = tmp_path_factory.mktemp("geth-dev")
    with _geth(dev, [str(geth_binary), "--dev", "--datadir", str(datadir), "--http", "--http.api",
                     "eth,net,web3"], datadir):
        assert int(_node_rpc(dev, "eth_chainId", []), 16) == CHAIN_ID
        (funder,) = _node_rpc(dev, "eth_accounts", [])
        _node_rpc(dev, "eth_sendTransaction", [{"from": funder, "to": dev.address, "value": hex(10**18)}])
        _wait_for(lambda: int(_node_rpc(dev, "eth_getBalance", [dev.address, "latest"]), 16) > 0, 60,
                  "the armory's account to be paid on the dev chain")
        yield dev


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1)
    raise AssertionError(f"waited {timeout:.0f} s for {what}")


def _mined_from(dev: Device, tx_hash: str) -> str:
    """The sender of a transaction the dev chain has mined (waits for the receipt)."""
    tx_hash = tx_hash if tx_hash.startswith("0x") else "0x" + tx_hash
    _wait_for(lambda: _node_rpc(dev, "eth_getTransactionReceipt", [tx_hash]) is not None, 60, "the receipt")
    return str(_node_rpc(dev, "eth_getTransactionByHash", [tx_hash])["from"]).lower()


def test_docs_quickstart_checks(provisioned: Device) -> None:
    """quickstart.md's "Plug in" checks, as typed: the laptop's 10.0.0.2 and the armory's /health."""
    (block,) = [b for b in fenced_blocks(DOCS / "quickstart.md", "3. Plug in", "sh")]
    result = _in_ns(provisioned, ["sh", "-ec", block])
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^armory0\s+UP\s+10\.0\.0\.2/24", result.stdout, re.M), result.stdout
    (health,) = json_documents(result.stdout[result.stdout.index("{"):])
    assert health["state"] in ("ready", "locked") and health["clef"].startswith("1.17.3"), health


def test_docs_clients_curl(provisioned: Device) -> None:
    from eth_account import Account
    from eth_account.messages import encode_defunct
    from eth_utils import to_checksum_address

    dev = provisioned
    (block,) = fenced_blocks(DOCS / "clients.md", "curl", "sh")
    script = block.replace("0xYOURADDRESS", to_checksum_address(dev.address))
    script = script.replace("\nCHAIN=0x1 ", f"\nCHAIN={hex(CHAIN_ID)} ")  # provisioned for geth --dev's chain
    assert f"\nCHAIN={hex(CHAIN_ID)} " in script, script
    result = _in_ns(dev, ["sh", "-ec", script])
    assert result.returncode == 0, result.stdout + result.stderr
    health, listing, text_sig, tx = json_documents(result.stdout)
    assert health["state"] == "ready", health
    assert [a.lower() for a in listing["result"]] == [dev.address], listing
    assert str(Account.recover_message(encode_defunct(text="hello"), signature=text_sig["result"])).lower() \
        == dev.address, text_sig
    assert "result" in tx, tx
    assert str(Account.recover_transaction(tx["result"]["raw"])).lower() == dev.address, tx
    assert int(tx["result"]["tx"]["chainId"], 16) == CHAIN_ID, tx


def test_docs_clients_geth_signer(geth_signer: Device, geth_binary: Path) -> None:
    """The `geth attach` console lines of clients.md: eth.accounts asks the armory; sendTransaction is
    signed by it (the transaction geth then holds is from the armory's account)."""
    dev = geth_signer
    block = fenced_blocks(DOCS / "clients.md", "geth (`--signer`)", "sh")[0]
    statements, current = [], ""
    for line in block.splitlines():
        if line.startswith("> "):
            if current:
                statements.append(current)
            current = line[2:].split("//")[0].strip()
        elif current and line.startswith(" "):
            current += " " + line.strip()
    statements.append(current)
    assert statements[0] == "eth.accounts" and statements[1].startswith("eth.sendTransaction("), statements
    url = f"http://127.0.0.1:{NODE_PORT}"
    accounts = _in_ns(dev, [str(geth_binary), "attach", "--exec", statements[0], url])
    assert accounts.returncode == 0, accounts.stdout + accounts.stderr
    assert dev.address in accounts.stdout.lower(), accounts.stdout
    sent = _in_ns(dev, [str(geth_binary), "attach", "--exec", statements[1], url], timeout=SIGN_TIMEOUT)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    (tx_hash,) = re.findall(r"0x[0-9a-f]{64}", sent.stdout)
    tx = _node_rpc(dev, "eth_getTransactionByHash", [tx_hash])  # in geth's pool, signed by the armory
    assert tx["from"].lower() == dev.address and tx["to"].lower() == RECIPIENT.lower(), tx
    assert int(tx["value"], 16) == 10**16 and int(tx["chainId"], 16) == CHAIN_ID, tx


def test_docs_clients_web3py(dev_chain: Device) -> None:
    import sys

    dev = dev_chain
    (block,) = fenced_blocks(DOCS / "clients.md", "web3.py", "python")
    script = block.replace("https://YOUR-NODE", f"http://127.0.0.1:{NODE_PORT}")
    assert script != block
    result = _in_ns(dev, [sys.executable, "-c", script], timeout=SIGN_TIMEOUT, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    (tx_hash,) = re.findall(r"(?:0x)?[0-9a-f]{64}", result.stdout)
    assert _mined_from(dev, tx_hash) == dev.address


def test_docs_clients_ethers(dev_chain: Device) -> None:
    from tests.agent_helpers import require_tool
    from tests.test_ethapi_clients import JS_DIR, ensure_node_modules

    dev = dev_chain
    node = require_tool("node")
    ensure_node_modules()
    (block,) = fenced_blocks(DOCS / "clients.md", "ethers.js (v6)", "js")
    script = block.replace("https://YOUR-NODE", f"http://127.0.0.1:{NODE_PORT}")
    assert script != block
    path = JS_DIR / f".docs-snippet-{secrets.token_hex(4)}.mjs"  # beside node_modules, so "ethers" resolves
    path.write_text(script)
    try:
        result = _in_ns(dev, [node, str(path)], timeout=SIGN_TIMEOUT, cwd=JS_DIR)
    finally:
        path.unlink()
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.split()
    assert lines[:2] == ["true", "true"], result.stdout
    assert _mined_from(dev, lines[2]) == dev.address


# -- updating: the cable pulled mid-stream, ./do update, ./do update --rollback (same guest, last) ---------
# Image B is the test's image with another agent version written into its system slot (debugfs, no mount),
# re-mapped and re-hashed: a second real build would cost minutes and test nothing more here.

AGENT_INIT = "/usr/lib/python3/dist-packages/armory_agent/__init__.py"
NEW_VERSION = "99.0.0-update-test"


@pytest.fixture(scope="module")
def image_b(built: tuple[qemu.GuestImage, Path], tmp_path_factory: pytest.TempPathFactory,
            timings: Timings) -> updating.NewSystem:
    """The test's image with NEW_VERSION as the agent's version, written into its system slot."""
    from image import bmap as bmaplib
    from image.inspect import Image

    t0 = time.monotonic()
    a = built[0]
    out = tmp_path_factory.mktemp("image-b")
    img = out / a.image.name
    subprocess.run(["cp", "--sparse=always", str(a.image), str(img)], check=True)
    system = a.manifest["system"]
    init = out / "__init__.py"
    text = Image(img).read(AGENT_INIT).decode()
    old = next(line for line in text.splitlines() if line.startswith("__version__"))
    init.write_text(text.replace(old, f'__version__ = "{NEW_VERSION}"'))
    init.chmod(0o644)
    script = out / "write.debugfs"
    script.write_text(f"cd {Path(AGENT_INIT).parent}\nrm __init__.py\nwrite {init} __init__.py\n")
    subprocess.run(["debugfs", "-w", "-f", str(script), f"{img}?offset={system['offset']}"], check=True,
                   capture_output=True)
    assert f'__version__ = "{NEW_VERSION}"' in Image(img).read(AGENT_INIT).decode()
    block_map = bmaplib.create(img, out / f"{img.name}.bmap")
    ranges = bmaplib.ranges_within(block_map, system["offset"], system["offset"] + system["size"])
    manifest = json.loads(json.dumps(a.manifest))
    manifest["agent"]["version"] = NEW_VERSION
    manifest["system"] = {**system, "mapped_bytes": sum(n for _, n in ranges),
                          "sha256": bmaplib.ranges_digest(img, system["offset"], ranges)}
    (out / "manifest.json").write_text(json.dumps(manifest))
    timings.add("derive_image_b", time.monotonic() - t0)
    return updating.load_system(img)


def _session(dev: Device) -> commands.Session:
    target = Target(host=qemu.DEVICE_ADDRESS, port=22, identity=dev.identity,
                    known_hosts=dev.image.known_hosts, timeout=60.0)
    return commands.Session(target, link=Link(host=qemu.DEVICE_ADDRESS, port=qemu.AGENT_PORT, timeout=600))


@dataclasses.dataclass(frozen=True)
class Surveyed:
    hello: contract.Hello
    slots: contract.Slots
    audit: list[str]
    host_key: str


def _survey(dev: Device) -> Surveyed:
    """hello, slots, the audit log and the host key's fingerprint, over a fresh SSH login from the lab."""
    from provision.ssh import fingerprint

    def look() -> Surveyed:
        conn, device = _session(dev).open()
        with conn:
            hello = device.hello()
            slots = contract.Slots.from_json(device.frozen("slots"))
            audit = conn.run(["sudo", "-n", "cat", "/var/lib/clef-armory/agent/audit.jsonl"]).stdout.decode()
            key = fingerprint(conn.transport.get_remote_server_key())
            return Surveyed(hello, slots, audit.splitlines(), key)

    return call_in(dev.ns, look, 300)


def _locked_then_unlocked(dev: Device, timings: Timings, label: str) -> None:
    """After a boot: signing is refused, status says locked, `./do unlock` makes the same account sign."""
    status, body = _sign_text(dev, dev.address, "must not be signed while locked")
    assert "result" not in (body or {}), body
    assert status != 200 or "error" in body
    result = dev.do("status", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    st = json.loads(result.stdout)
    assert st["agent"]["state"] == "locked" and st["health"]["state"] == "locked", st
    assert [a["address"].lower() for a in st["device"]["accounts"]] == [dev.address]
    t0 = time.monotonic()
    result = dev.do("unlock", "--password-file", str(dev.password_file))
    timings.add(f"unlock_{label}", time.monotonic() - t0)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().startswith("agent ready (Clef 1.17.3"), result.stdout
    text = f"signed again after {label}"
    status, body = _sign_text(dev, dev.address, text)
    assert status == 200 and _recover_text(text, body["result"]) == dev.address, body


def test_cable_pull_update_and_rollback(provisioned: Device, image_b: updating.NewSystem,
                                        timings: Timings) -> None:
    """One guest, as a user's device lives: the cable pulled half-way through an update stream (the
    stream cut, then the power: Ctrl-C to run-qemu, run again on the same --state) leaves slot 1 running
    and slot 2 not bootable; the device comes back locked until `./do unlock`. Then `./do update --image B`
    as typed (run-qemu starts the guest again when it reboots, as the board comes back): slot 2, the new
    agent, the same host key, locked; unlocked, the same account signs and the audit log goes on. Then
    `./do update --rollback`: slot 1 and the old agent again."""
    dev = provisioned
    before = _survey(dev)
    assert (before.slots.running, before.slots.bootable, before.hello.board) == (1, 1, "qemu")
    assert before.host_key == dev.image.manifest["host_keys"]["ed25519"]["fingerprint"]
    assert before.audit, "the signatures of the tests above are in the audit log"
    old_version = dev.image.manifest["agent"]["version"]
    assert before.hello.agent_version == old_version != NEW_VERSION

    # 1. the stream cut half-way (the library's hook: a pulled cable), then the power goes.
    t0 = time.monotonic()
    with pytest.raises(UpdateError, match="the stream was cut"):
        call_in(dev.ns, lambda: updating.update(_session(dev), image_b, log=lambda _: None,
                                                cut_after=image_b.mapped_bytes // 2), 1200)
    cut = _survey(dev)
    assert (cut.slots.running, cut.slots.bootable) == (1, 1) and not cut.slots.slot(2).complete
    timings.add("update_cut_stream", time.monotonic() - t0)
    t0 = time.monotonic()
    timings.add("power_off_for_cycle", dev.power_off())
    timings.add("power_cycle_to_sshd", dev.boot())
    assert _wait_for_state(dev, "locked", READY_TIMEOUT)["state"] == "locked"
    timings.add("power_cycle_to_agent_locked", time.monotonic() - t0)
    assert _survey(dev).slots.running == 1
    _locked_then_unlocked(dev, timings, "power_cycle")

    # 2. `./do update` as typed: streams slot 2, reboots into it; run-qemu boots the guest again.
    t0 = time.monotonic()
    result = dev.do("update", "--host", "10.0.0.1", "--image", str(image_b.image))
    timings.add("update_total", time.monotonic() - t0)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    print("\n".join("[update] " + line for line in result.stdout.splitlines()))
    assert f"agent: {old_version} -> {NEW_VERSION}" in result.stdout, result.stdout
    assert "slot 2 boots" in result.stdout and "./do unlock" in result.stdout, result.stdout
    sent = re.search(r"^sent (\d+) MiB for (\d+) MiB of system in (\d+) s$", result.stdout, re.M)
    assert sent, result.stdout
    timings.add("update_sent_mib", float(sent.group(1)))
    timings.add("update_stream", float(sent.group(3)))
    assert int(sent.group(1)) < int(sent.group(2)) < image_b.manifest["system"]["size"] >> 21
    assert dev.run is not None and any("the guest rebooted" in x for x in dev.run.lines), dev.run.output()
    after = _survey(dev)
    assert (after.hello.agent_version, after.slots.running, after.slots.bootable) == (NEW_VERSION, 2, 2)
    assert after.host_key == before.host_key
    _locked_then_unlocked(dev, timings, "update")
    audit = _survey(dev).audit
    assert audit[:len(before.audit)] == before.audit and len(audit) > len(before.audit)

    # 3. `./do update --rollback`: slot 1 (which booted before) and the old agent, nothing streamed.
    t0 = time.monotonic()
    result = dev.do("update", "--host", "10.0.0.1", "--rollback")
    timings.add("rollback_total", time.monotonic() - t0)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert "slot 1 boots" in result.stdout, result.stdout
    back = _survey(dev)
    assert (back.slots.running, back.slots.bootable, back.host_key) == (1, 1, before.host_key)
    assert back.hello.agent_version == old_version


def test_wrong_board_is_refused(image_b: updating.NewSystem) -> None:
    hello = contract.Hello(contract=contract.VERSION, agent_version="1", board="mk2")
    slots = contract.Slots(disk="/dev/mmcblk0", disk_id="0badcafe", running=1, bootable=1, slots=[
        dataclasses.asdict(contract.Slot(n, f"/dev/mmcblk0p{n}", 1 << 30, n == 1)) for n in (1, 2)])
    with pytest.raises(UpdateError, match="is for board 'qemu', the device is 'mk2'"):
        updating.check_compatible(image_b, hello, slots)
    other = dataclasses.replace(image_b, manifest={**image_b.manifest,
                                                   "agent": {**image_b.manifest["agent"], "contract": 99}})
    with pytest.raises(UpdateError, match="the image's agent speaks contract 99"):
        updating.check_compatible(other, dataclasses.replace(hello, board="qemu"), slots)
    assert "root=PARTUUID=0badcafe-02 " in updating.extlinux_for(image_b, "0badcafe", 2)
