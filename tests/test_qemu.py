"""QemuGuest without a built image: what it refuses, the command it runs, and its lifecycle in a real QEMU.

The full boot of the real image is tests/test_system.py (slow). Here QEMU runs firmware of zeros: enough to
prove the forwards are bound to loopback only, the built image stays untouched, a guest that never answers
is reported with its console log, and the process is always gone afterwards. Debian's real U-Boot for
qemu_arm then boots small disks that cannot boot, to show each failure is read off the console in seconds.
The same with the real image and a broken extlinux.conf is in tests/test_system.py.
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
    (out / "u-boot.bin").write_bytes(bytes(4096))  # zeros: the CPU runs harmless no-ops, prints nothing
    (out / "known_hosts").write_text(f"10.0.0.1 {KEY}\n")
    manifest = {"board": board, "files": {"image": image.name, "firmware": "u-boot.bin"},
                "config": {"authorized_key": KEY + " test"}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return image


def _settings(root: Path) -> config.Settings:
    return config.Settings(board="qemu", output_dir=root)


def test_find_image_reads_the_manifest(tmp_path: Path) -> None:
    image = _fake_build(tmp_path)
    found = qemu.find_image(_settings(tmp_path))
    assert found.image == image.resolve()
    assert found.firmware == image.parent / "u-boot.bin"
    assert found.authorized_key == KEY + " test"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda out: [p.unlink() for p in out.glob("*.img")], "no image in"),
        (lambda out: (out / "manifest.json").unlink(), "no manifest.json"),
        (lambda out: (out / "u-boot.bin").unlink(), "U-Boot firmware"),
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


def test_find_image_refuses_a_build_without_u_boot(tmp_path: Path) -> None:
    image = _fake_build(tmp_path)
    manifest = json.loads((image.parent / "manifest.json").read_text())
    manifest["files"] = {"image": image.name, "kernel": "vmlinuz", "initrd": "initrd.img"}  # before U-Boot
    (image.parent / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(QemuError, match=r"built without U-Boot.*rebuild"):
        qemu.find_image(_settings(tmp_path), image)


# Console excerpts as Debian's U-Boot 2025.01 (qemu_arm), Linux and initramfs-tools print them.
UBOOT_OK = """Hit any key to stop autoboot:  0
Scanning for bootflows in all bootdevs
** Booting bootflow '<NULL>' with efi_mgr
Loading Boot0000 'virtio 0' failed
EFI boot manager: Cannot load any image
Boot failed (err=-14)
Scanning bootdev 'virtio-blk#31.bootdev':
  1  extlinux     ready   virtio       1  virtio-blk#31.bootdev.par /boot/extlinux/extlinux.conf
** Booting bootflow 'virtio-blk#31.bootdev.part_1' with extlinux
Retrieving file: /boot/vmlinuz-6.12.57+deb13-armmp
"""
NO_KERNEL = """Retrieving file: /boot/vmlinuz-wrong
Skipping armory for failure retrieving kernel
Boot failed (err=-14)
BOOTP broadcast 1
"""


@pytest.mark.parametrize(
    ("console", "expected"),
    [
        (UBOOT_OK, None),
        (UBOOT_OK + "Retrieving file: /boot/initrd.img-6.12.57+deb13-armmp\n"
         "## Flattened Device Tree blob at 5ed3c2b0\nStarting kernel ...\n\n[    0.000000] Booting Linux\n"
         "Begin: Running /scripts/local-premount ... done.\n", None),
        (UBOOT_OK + NO_KERNEL,
         "U-Boot could not load the kernel /boot/vmlinuz-wrong that /boot/extlinux/extlinux.conf names"),
        ("Scanning bootdev 'virtio-blk#31.bootdev':\nBOOTP broadcast 1\nDHCP client bound to 10.0.0.15\n",
         "fell back to network boot"),
        ("Hit any key to stop autoboot:  0\nNo more bootdevs\n=> ", "stopped at its prompt"),
        ("Starting kernel ...\n[   41.2] Kernel panic - not syncing: VFS: Unable to mount root fs on\n",
         "the kernel panicked ('Kernel panic - not syncing: VFS: Unable to mount root fs on')"),
        ("Starting kernel ...\nALERT!  PARTUUID=0123abcd-01 does not exist.  Dropping to a shell!\n",
         "the initramfs could not mount the root filesystem"),
        ("Starting kernel ...\nBusyBox v1.37.0 (Debian 1:1.37.0-6+b3) built-in shell (ash)\n(initramfs) ",
         "the initramfs dropped to a shell"),
        ("Starting kernel ...\nYou are in emergency mode. After logging in, type \"journalctl -xb\"\n",
         "systemd gave up"),
        # What U-Boot printed before the kernel started does not count against the kernel's boot.
        (NO_KERNEL.replace("wrong", "x") + "=> boot\nStarting kernel ...\n[    0.0] Booting Linux\n", None),
    ],
)
def test_boot_failures_are_read_off_the_console(console: str, expected: str | None) -> None:
    found = qemu.boot_failure(console)
    if expected is None:
        assert found is None
    else:
        assert found is not None and expected in found and "\n" not in found


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
    guest._files = {"u-boot.bin": image.firmware}
    command = " ".join(guest._command())
    # U-Boot boots the disk's extlinux.conf; no kernel from outside the image; a reset ends QEMU.
    assert f"-bios {image.firmware}" in command and "-no-reboot" in command
    assert "-kernel" not in command and "-initrd" not in command and "-append" not in command
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


@pytest.mark.parametrize(("last_line", "argv", "expected"), [
    ("[  812.1] reboot: Restarting system", ["true"], True),  # ./do update's reboot: run-qemu boots it again
    ("[  812.1] reboot: Power down", ["true"], False),  # powered off: run-qemu ends
    ("[  812.1] reboot: Restarting system", ["false"], False),  # QEMU failed: an error, not a reboot
])
def test_a_reboot_is_told_from_a_power_off(tmp_path: Path, last_line: str, argv: list[str],
                                           expected: bool) -> None:
    import subprocess

    image = qemu.find_image(_settings(tmp_path), _fake_build(tmp_path))
    guest = qemu.QemuGuest(image)
    guest.workdir = tmp_path / "run"
    guest.workdir.mkdir()
    guest.console_log.write_text(f"systemd-shutdown[1]: Syncing filesystems.\r\n{last_line}\r\n")
    guest.proc = subprocess.Popen(argv)
    guest.proc.wait(10)
    assert guest.rebooted() is expected


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


@pytest.mark.integration
def test_state_file_of_an_earlier_build_is_refused(tmp_path: Path) -> None:
    """A rebuild writes a new image at the same path: a kept state file on top of the old bytes would be a
    corrupt disk, so run-qemu --state refuses it (the build is told by the manifest's image_sha256)."""
    image_file = _fake_build(tmp_path)
    manifest_file = image_file.parent / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    state = tmp_path / "state.qcow2"
    for build_id in ("first-build", "second-build"):
        manifest_file.write_text(json.dumps({**manifest, "image_sha256": build_id}))
        guest = qemu.QemuGuest(qemu.find_image(_settings(tmp_path), image_file), state=state, boot_timeout=3,
                               stop_timeout=2)
        expected = "sshd did not answer" if build_id == "first-build" else "earlier build of"
        with pytest.raises(QemuError, match=expected), guest:
            pass
        assert state.exists() and state.with_name("state.qcow2.build").read_text() == "first-build\n"


# -- Debian's real U-Boot on disks that cannot boot -----------------------------------------------------


@pytest.fixture(scope="module")
def real_u_boot(settings: config.Settings) -> Path:
    """The qemu board's firmware exactly as the build takes it (the suite's u-boot-qemu, cached)."""
    from image import boards, debs

    spec = boards.QEMU.firmware
    assert spec is not None
    path, _ = debs.cached_member(spec.deb_package, spec.deb_path, mirror=settings.mirror,
                                 suite=settings.suite, cache_dir=settings.cache_path, log=lambda _: None)
    return path


def _unbootable_build(root: Path, u_boot: Path, files: dict[str, str]) -> Path:
    """A fake qemu build with the real U-Boot and a disk laid out like ours (ext4 from 5 MiB) with `files`."""
    import shutil
    import subprocess

    image = _fake_build(root)
    shutil.copyfile(u_boot, image.parent / "u-boot.bin")
    tree = root / "tree"
    for name, text in files.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text(text)
    tree.mkdir(exist_ok=True)
    subprocess.run(["sfdisk", "-q", str(image)], input="label: dos\nunit: sectors\n\nstart=10240, type=83\n",
                   text=True, check=True)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-E", f"offset={5 << 20}", "-d", str(tree),
                    str(image), "11M"], check=True)
    return image


WRONG_KERNEL = """default armory
timeout 1

label armory
\tkernel /boot/vmlinuz-wrong
\tinitrd /boot/initrd.img-wrong
\tappend root=/dev/vda1 rw console=ttyAMA0
"""


@pytest.mark.integration
@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"boot/extlinux/extlinux.conf": WRONG_KERNEL},
         "boot failed after .* U-Boot could not load the kernel /boot/vmlinuz-wrong"),
        ({"etc/hostname": "armory\n"}, "boot failed after .* fell back to network boot"),
    ],
)
def test_u_boot_failures_stop_the_guest_in_seconds(tmp_path: Path, real_u_boot: Path,
                                                   files: dict[str, str], message: str) -> None:
    image = qemu.find_image(_settings(tmp_path), _unbootable_build(tmp_path, real_u_boot, files))
    guest = qemu.QemuGuest(image, boot_timeout=300, stop_timeout=5, log=lambda _: None)
    t0 = time.monotonic()
    with pytest.raises(QemuError, match=message) as err, guest:
        pass
    took = time.monotonic() - t0
    assert took < 60, f"took {took:.0f} s"  # the watch, not the 300 s timeout (about 5 s here)
    assert "\n" not in str(err.value) and str(guest.console_log) in str(err.value)
    assert guest.proc is None and guest.console_log.exists()
