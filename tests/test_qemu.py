"""QemuGuest without a built image: what it refuses, the command it runs, and its lifecycle in a real QEMU.

The full boot of the real image is tests/test_system.py (slow). Here QEMU runs a kernel of zeros: enough to
prove the forwards are bound to loopback only, the built image stays untouched, a guest that never answers
is reported with its console log, and the process is always gone afterwards.
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
from pathlib import Path

import pytest

from clef_armory import config
from clef_armory.errors import QemuError
from provision import qemu

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx0jzyOV/Yuo+mKhmfyhA1qIppHIMW1XenhCBcLKAZ/"


def _fake_build(root: Path, board: str = "qemu") -> Path:
    out = root / "qemu"
    out.mkdir(parents=True)
    image = out / "clef-armory-qemu-trixie.img"
    with image.open("wb") as f:
        f.truncate(16 << 20)
    (out / "vmlinuz").write_bytes(bytes(4096))  # zeros: the CPU runs harmless no-ops
    (out / "initrd.img").write_bytes(bytes(512))
    (out / "known_hosts").write_text(f"10.0.0.1 {KEY}\n")
    manifest = {"board": board, "kernel_cmdline": "root=/dev/vda1 rw rootwait console=ttyAMA0",
                "files": {"kernel": "vmlinuz", "initrd": "initrd.img"},
                "config": {"authorized_key": KEY + " test"}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return image


def _settings(root: Path) -> config.Settings:
    return config.Settings(board="qemu", output_dir=root)


def test_find_image_reads_the_manifest(tmp_path: Path) -> None:
    image = _fake_build(tmp_path)
    found = qemu.find_image(_settings(tmp_path))
    assert found.image == image.resolve()
    assert found.kernel.name == "vmlinuz" and found.initrd.name == "initrd.img"
    assert found.cmdline.startswith("root=/dev/vda1")
    assert found.authorized_key == KEY + " test"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda out: [p.unlink() for p in out.glob("*.img")], "no image in"),
        (lambda out: (out / "manifest.json").unlink(), "no manifest.json"),
        (lambda out: (out / "vmlinuz").unlink(), "kernel"),
        (lambda out: (out / "known_hosts").unlink(), "known_hosts"),
        (lambda out: (out / "manifest.json").write_text("{not json"), "cannot read"),
    ],
)
def test_find_image_refuses_incomplete_builds(tmp_path: Path, damage: object, message: str) -> None:
    _fake_build(tmp_path)
    damage(tmp_path / "qemu")  # type: ignore[operator]
    with pytest.raises(QemuError, match=message):
        qemu.find_image(_settings(tmp_path))


def test_find_image_refuses_another_boards_image(tmp_path: Path) -> None:
    image = _fake_build(tmp_path, board="mk2")
    with pytest.raises(QemuError, match="board 'mk2'"):
        qemu.find_image(_settings(tmp_path), image)


def test_bad_sizes_are_refused(tmp_path: Path) -> None:
    image = qemu.find_image(_settings(tmp_path), _fake_build(tmp_path))
    with pytest.raises(QemuError, match="memory"):
        qemu.QemuGuest(image, memory_mib=64)
    with pytest.raises(QemuError, match="cpus"):
        qemu.QemuGuest(image, cpus=0)


def test_command_forwards_only_loopback_to_the_device_addresses(tmp_path: Path) -> None:
    image = qemu.find_image(_settings(tmp_path), _fake_build(tmp_path))
    guest = qemu.QemuGuest(image, workdir=tmp_path / "run")
    guest.ssh_port, guest.agent_port = 40022, 48550
    guest.workdir = tmp_path / "run"
    guest.overlay = tmp_path / "run" / "disk.qcow2"
    guest._files = {"vmlinuz": image.kernel, "initrd.img": image.initrd}
    command = " ".join(guest._command())
    assert "hostfwd=tcp:127.0.0.1:40022-10.0.0.1:22" in command
    assert "hostfwd=tcp:127.0.0.1:48550-10.0.0.1:8550" in command
    assert "net=10.0.0.0/24,host=10.0.0.2,restrict=on" in command
    assert "mac=1a:55:89:a2:69:41" in command
    assert f"file={guest.overlay},format=qcow2" in command and str(image.image) not in command


def test_known_hosts_is_rewritten_for_the_forwarded_port(tmp_path: Path) -> None:
    image = qemu.find_image(_settings(tmp_path), _fake_build(tmp_path))
    guest = qemu.QemuGuest(image, workdir=tmp_path / "run")
    guest.workdir = tmp_path / "run"
    guest.workdir.mkdir()
    guest.ssh_port = 40022
    assert guest.known_hosts().read_text() == f"[127.0.0.1]:40022 {KEY}\n"


@pytest.mark.integration
def test_a_guest_that_never_answers_is_stopped_and_reported(tmp_path: Path) -> None:
    image_file = _fake_build(tmp_path)
    before = hashlib.sha256(image_file.read_bytes()).hexdigest()
    image = qemu.find_image(_settings(tmp_path), image_file)
    lines: list[str] = []
    guest = qemu.QemuGuest(image, boot_timeout=8, stop_timeout=3, log=lines.append)
    t0 = time.monotonic()
    with pytest.raises(QemuError, match="sshd did not answer within 8 s") as err, guest:
        pass
    assert time.monotonic() - t0 < 60
    assert guest.proc is None and not guest.running
    assert "console.log" in str(err.value) and guest.console_log.exists()  # kept for the post-mortem
    assert not (guest.workdir / "disk.qcow2").exists()
    assert hashlib.sha256(image_file.read_bytes()).hexdigest() == before
    # The forwards were on loopback only, and are gone with QEMU.
    for port in (guest.ssh_port, guest.agent_port):
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
            pass


@pytest.mark.integration
def test_state_file_must_belong_to_the_image(tmp_path: Path) -> None:
    image = qemu.find_image(_settings(tmp_path), _fake_build(tmp_path))
    other = tmp_path / "other.qcow2"
    import subprocess

    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(other), "16M"], check=True)
    guest = qemu.QemuGuest(image, state=other, boot_timeout=5)
    with pytest.raises(QemuError, match="belongs to another image"), guest:
        pass
