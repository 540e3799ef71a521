"""./do update on the qemu board, on ONE booted guest for the whole module (it boots through U-Boot,
which picks the slot by the MBR's bootable flag, like the USB armory's).

provision -> sign -> a stream cut half-way (a pulled cable) leaves slot 1 bootable and slot 2 marked
incomplete -> the re-run completes: an image whose agent reports another version, the device back on
slot 2 with the same pinned host key, the agent locked; unlock -> the same address signs, the audit
log continued -> --rollback -> slot 1 boots again with the old agent.

Image A is built (or reused from build/update-test/qemu/ while current); image B is A with another
agent version string written into its system slot (debugfs, no mount), re-mapped and re-hashed: a
second real build would cost minutes and test nothing more here. Timings go to
build/update-test/timings.json and are printed.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from armory_agent import contract
from clef_armory import config
from clef_armory.errors import QemuError, UpdateError
from image import bmap as bmaplib
from image.inspect import Image
from provision import commands, qemu
from provision import update as updating
from provision.secrets import Passwords
from tests.words_helpers import ScriptedTerminal

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(3600)]

REPO = Path(__file__).resolve().parent.parent
AGENT_INIT = "/usr/lib/python3/dist-packages/armory_agent/__init__.py"
NEW_VERSION = "99.0.0-update-test"
TIMEOUT = 900.0


class Timings:
    def __init__(self, path: Path) -> None:
        self.path, self.data = path, {}  # type: dict[str, float]

    def add(self, name: str, seconds: float) -> None:
        self.data[name] = round(seconds, 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2) + "\n")
        print(f"[update] {name}: {seconds:.1f} s")


@pytest.fixture(scope="module")
def timings(settings: config.Settings) -> Timings:
    return Timings(settings.output_dir / "update-test" / "timings.json")


def _identity(cache: Path) -> Path:
    key = cache / "system-test" / "id_ed25519"
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "clef-armory system test",
                        "-f", str(key)], check=True)
    return key


def _current(image: qemu.GuestImage, identity: Path) -> bool:
    from image import build

    m = image.manifest
    if "system" not in m or m.get("agent", {}).get("sha256") != build._tree_digest(build.AGENT_SRC):
        return False
    built = (image.image.parent / "manifest.json").stat().st_mtime
    for tree in ("overlay", "image"):
        for path in (REPO / tree).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.stat().st_mtime > built:
                return False
    key = " ".join(identity.with_name(identity.name + ".pub").read_text().split()[:2])
    return " ".join((image.authorized_key or "").split()[:2]) == key


@pytest.fixture(scope="module")
def image_a(settings: config.Settings, timings: Timings) -> tuple[qemu.GuestImage, Path]:
    identity = _identity(settings.cache_path)
    own = settings.replace(board="qemu", output_dir=settings.output_dir / "update-test",
                           ssh_key=identity.with_name(identity.name + ".pub"))
    try:
        found = qemu.find_image(own)
        if _current(found, identity):
            return found, identity
    except QemuError:
        pass
    from image import build

    t0 = time.monotonic()
    build.build_image(own)
    timings.add("build_image_a", time.monotonic() - t0)
    return qemu.find_image(own), identity


@pytest.fixture(scope="module")
def image_b(image_a: tuple[qemu.GuestImage, Path], tmp_path_factory: pytest.TempPathFactory,
            timings: Timings) -> updating.NewSystem:
    """Image A with NEW_VERSION as the agent's version, written into its system slot."""
    t0 = time.monotonic()
    a = image_a[0]
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


@pytest.fixture(scope="module")
def guest(image_a: tuple[qemu.GuestImage, Path], tmp_path_factory: pytest.TempPathFactory,
          timings: Timings) -> Iterator[qemu.QemuGuest]:
    g = qemu.QemuGuest(image_a[0], workdir=tmp_path_factory.mktemp("qemu"), memory_mib=512, cpus=2,
                       boot_timeout=TIMEOUT)
    try:
        timings.add("boot_to_sshd", g.start())
        yield g
    finally:
        g.stop(power_down=False)


def _session(guest: qemu.QemuGuest, identity: Path) -> commands.Session:
    return commands.Session(guest.ssh_target(identity), link=guest.link(timeout=600))


def _restart(guest: qemu.QemuGuest) -> None:
    """The guest rebooted: QEMU (-no-reboot) exits; start it again on the same disk, like the board."""
    assert guest.proc is not None
    guest.proc.wait(TIMEOUT)
    guest.proc = None
    guest.start()


@pytest.fixture(scope="module")
def passwords() -> Passwords:
    chosen = {"master": secrets.token_urlsafe(18), "account": secrets.token_urlsafe(18)}
    return Passwords(ask=lambda prompt: chosen["master" if "master" in prompt else "account"])


@pytest.fixture(scope="module")
def provisioned(guest: qemu.QemuGuest, image_a: tuple[qemu.GuestImage, Path], passwords: Passwords,
                timings: Timings, tmp_path_factory: pytest.TempPathFactory) -> str:
    policy = tmp_path_factory.mktemp("policy") / "policy.yaml"
    policy.write_text('chain_ids: [1]\nrecipients: ["0xD1d1d1D1d1d1D1d1D1D1D1d1d1D1D1D1d1D1d1d1"]\n'
                      'max_value_eth: "0.05"\norigins: []\nallow_no_origin: true\nallow_text_signing: true\n')
    terminal = ScriptedTerminal()
    inputs = commands.ProvisionInputs(accounts=1, policy_file=policy, run_checks=False,
                                      terminal=lambda: terminal)
    t0 = time.monotonic()
    steps, _ = commands.provision(_session(guest, image_a[1]), passwords, inputs)
    timings.add("provision", time.monotonic() - t0)
    return next(s.detail for s in steps if s.name == "new account").lower()


def _sign(guest: qemu.QemuGuest, address: str, text: str) -> str:
    from eth_account import Account
    from eth_account.messages import encode_defunct

    status, body = guest.link(timeout=600).rpc("account_signData",
                                                ["text/plain", address, "0x" + text.encode().hex()])
    assert status == 200 and "result" in body, body
    return str(Account.recover_message(encode_defunct(text=text), signature=body["result"])).lower()


def _device(guest: qemu.QemuGuest, identity: Path) -> tuple[contract.Hello, contract.Slots, list[str], str]:
    """hello, slots, the audit log's lines and the host key's fingerprint, over a fresh SSH login."""
    from provision.ssh import fingerprint

    conn, device = _session(guest, identity).open()
    with conn:
        hello = device.hello()
        slots = contract.Slots.from_json(device.frozen("slots"))
        audit = conn.run(["sudo", "-n", "cat", "/var/lib/clef-armory/agent/audit.jsonl"]).stdout.decode()
        key = fingerprint(conn.transport.get_remote_server_key())
    return hello, slots, audit.splitlines(), key


def test_update_rollback_and_cable_pull(guest: qemu.QemuGuest, image_a: tuple[qemu.GuestImage, Path],
                                        image_b: updating.NewSystem, provisioned: str,
                                        passwords: Passwords, timings: Timings) -> None:
    identity = image_a[1]
    session = _session(guest, identity)
    assert _sign(guest, provisioned, "before the update") == provisioned
    hello, slots, audit_before, key = _device(guest, identity)
    assert (slots.running, slots.bootable) == (1, 1) and hello.board == "qemu"
    assert key == image_a[0].manifest["host_keys"]["ed25519"]["fingerprint"]
    assert audit_before, "the signature above is in the audit log"

    # 1. the cable pulled half-way through the stream: slot 1 stays the bootable one (the system
    # running now), slot 2 is not a system to boot; the re-run below completes. (One update run,
    # not two: each costs a stream and a reboot of the emulated board, minutes of CI time.)
    lines: list[str] = []
    t0 = time.monotonic()
    with pytest.raises(UpdateError, match="the stream was cut"):
        updating.update(session, image_b, log=lines.append, cut_after=image_b.mapped_bytes // 2)
    _, slots, _, _ = _device(guest, identity)
    assert (slots.running, slots.bootable) == (1, 1)
    assert not slots.slot(2).complete
    timings.add("cut_stream", time.monotonic() - t0)
    # 2. the re-run: update to B completes: slot 2, same host key (wait_for_ssh logs in with the
    # pinned one), agent locked; unlock, the same address signs, the audit log continued.
    t0 = time.monotonic()
    report = updating.update(session, image_b, log=lines.append, after_reboot=lambda: _restart(guest),
                             boot_timeout=TIMEOUT)
    timings.add("update_total", time.monotonic() - t0)
    timings.add("update_stream", report.stream_seconds)
    timings.add("update_sent_mib", report.sent_bytes / (1 << 20))
    timings.add("update_mapped_mib", report.mapped_bytes / (1 << 20))
    print("\n".join(["[update] " + line for line in [*lines, *report.lines()]]))
    assert report.slot == 2 and report.new["agent"] == NEW_VERSION and report.old["agent"] != NEW_VERSION
    assert report.sent_bytes < report.mapped_bytes < image_b.manifest["system"]["size"] // 2
    hello, slots, audit_after, key_after = _device(guest, identity)
    assert (hello.agent_version, slots.running, slots.bootable) == (NEW_VERSION, 2, 2)
    assert key_after == key
    t0 = time.monotonic()
    assert commands.unlock(session, passwords)["state"] == "ready"
    timings.add("unlock_after_update", time.monotonic() - t0)
    assert _sign(guest, provisioned, "after the update") == provisioned
    _, _, audit_after, _ = _device(guest, identity)
    assert audit_after[:len(audit_before)] == audit_before and len(audit_after) > len(audit_before)

    # 3. --rollback: slot 1 (which booted before) and the old agent again, nothing streamed.
    t0 = time.monotonic()
    report = updating.update(session, None, log=lines.append, after_reboot=lambda: _restart(guest),
                             boot_timeout=TIMEOUT)
    timings.add("rollback_total", time.monotonic() - t0)
    hello, slots, _, key_after = _device(guest, identity)
    assert (report.slot, slots.running, slots.bootable, key_after) == (1, 1, 1, key)
    assert hello.agent_version == image_a[0].manifest["agent"]["version"]


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

