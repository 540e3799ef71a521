"""The qemu board as a stand-in device: boot the built image in qemu-system-arm and reach it like a laptop.

Real USB armory hardware is not available in CI, so the ``qemu`` board's image (same root filesystem,
agent, Clef, sshd and firewall) runs under software emulation (``-M virt``, TCG). Inside the guest the
virtio NIC is named usb0 and has 10.0.0.1; QEMU's user-mode network uses 10.0.0.0/24 with its host side
at 10.0.0.2, so the agent and sshd see the same peer address as on a real laptop. Two free loopback
ports on this machine are forwarded to the guest's 10.0.0.1:22 and 10.0.0.1:8550.

It boots like the real boards: QEMU starts Debian's U-Boot for qemu_arm (``-bios``, from the build's
outputs), whose distro boot reads /boot/extlinux/extlinux.conf from the disk and starts the kernel and
initramfs it names with the command line it gives. A boot that goes wrong is read off the console as it
happens (U-Boot failing to load a file or falling back to network boot, a kernel panic, the initramfs
or systemd giving up) and reported at once instead of after the boot timeout; ``-no-reboot`` turns a
reset into QEMU exiting, so nothing loops.

The built image is never written: the guest's disk is a qcow2 overlay on top of it (``qemu-img create
-b``), kept for the guest's lifetime so a power cycle keeps what provisioning wrote, like a real device.

Emulation artefact: a client that dials the forwarded port would send ``Host: 127.0.0.1:PORT``, which
the agent refuses (its DNS-rebinding defence). ``QemuGuest.link()`` dials the loopback port but speaks
as if it had dialled 10.0.0.1:8550, which is what a laptop on the real link sends.

With ``tap=NAME`` the guest's NIC is attached instead to a tap interface that provision.tap made (the
laptop's end of the cable, 10.0.0.2/24): no forwarding, 10.0.0.1:22 and 10.0.0.1:8550 are dialled directly
and the build's known_hosts is used as it is. That is what ``./do run-qemu`` does by default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from armory_agent import usblink
from clef_armory import prereqs
from clef_armory.config import Settings
from clef_armory.errors import QemuError
from provision.link import Link
from provision.ssh import Target

DEVICE_ADDRESS = usblink.DEVICE_ADDRESS
HOST_ADDRESS = usblink.HOST_ADDRESS
LINK_NETWORK = ipaddress.ip_interface(f"{usblink.DEVICE_ADDRESS}/{usblink.PREFIX}").network  # 10.0.0.0/24
DEVICE_MAC = usblink.DEVICE_MAC
SSH_PORT = usblink.SSH_PORT
AGENT_PORT = usblink.AGENT_PORT
Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class GuestImage:
    """A built qemu-board image and what booting it needs, as recorded in its manifest.json."""

    image: Path
    firmware: Path  # U-Boot for qemu_arm: what the emulated CPU starts (-bios)
    known_hosts: Path
    manifest: dict[str, Any]

    @property
    def authorized_key(self) -> str | None:
        """The admin's public key baked into the image (None if the manifest does not say)."""
        key = self.manifest.get("config", {}).get("authorized_key")
        return key if isinstance(key, str) else None


def find_image(settings: Settings, image: Path | None = None) -> GuestImage:
    """The image to boot: ``image``, else the one in <output_dir>/qemu/; checked before anything starts."""
    if image is None:
        out = settings.output_dir.expanduser() / "qemu"
        found = sorted(out.glob("*.img"))
        if not found:
            raise QemuError(f"no image in {out}/: build one with: invoke build-image --board qemu")
        image = found[-1]
    image = image.expanduser().resolve()
    if not image.is_file():
        raise QemuError(f"image {image} does not exist")
    manifest_file = image.parent / "manifest.json"
    try:
        manifest = json.loads(manifest_file.read_text())
    except FileNotFoundError:
        raise QemuError(f"no manifest.json next to {image}: boot an image that build-image made") from None
    except (OSError, ValueError) as e:
        raise QemuError(f"cannot read {manifest_file}: {e}") from None
    if manifest.get("board") != "qemu":
        raise QemuError(f"{image} is built for board {manifest.get('board')!r}, not qemu: it cannot boot")
    files = manifest.get("files") or {}
    if not files.get("firmware"):
        raise QemuError(f"{image} was built without U-Boot (an older build booted with -kernel): "
                        "rebuild it with invoke build-image --board qemu")
    firmware = image.parent / str(files["firmware"])
    known_hosts = image.parent / "known_hosts"
    for path, what in ((firmware, "U-Boot firmware"), (known_hosts, "known_hosts")):
        if not path.is_file():
            raise QemuError(f"the build's {what} {path} is missing: run invoke build-image --board qemu")
    return GuestImage(image, firmware, known_hosts, manifest)


def free_port() -> int:
    """A loopback TCP port nobody listens on right now (QEMU binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Qmp:
    """Just enough of the QEMU Machine Protocol to ask for a clean power-down or a hard quit."""

    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buffer = b""
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise OSError("QMP connection closed")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        message = json.loads(line)
        return message if isinstance(message, dict) else {}

    def execute(self, command: str) -> Any:
        self.sock.sendall(json.dumps({"execute": command}).encode() + b"\n")
        while True:
            message = self._read()
            if "return" in message:
                return message["return"]
            if "error" in message:
                raise OSError(f"QMP {command}: {message['error'].get('desc', message['error'])}")
            # asynchronous events (POWERDOWN, SHUTDOWN, ...) are skipped

    def close(self) -> None:
        self.sock.close()


# What Linux prints on the console as the last thing before it resets the machine ("reboot: Power down"
# when it powers off instead); with -no-reboot QEMU then exits with status 0 in both cases.
REBOOTED = "reboot: Restarting system"


class QemuGuest:
    """One emulated device: ``with QemuGuest(image) as guest:`` boots it, waits for sshd, stops it cleanly.

    ``power_cycle()`` stops and boots it again on the same disk overlay (what unplugging and
    re-plugging a USB armory does). Ports, console log and overlay live in ``workdir``.
    """

    def __init__(
        self,
        image: GuestImage,
        *,
        workdir: Path | None = None,
        state: Path | None = None,
        memory_mib: int = 512,
        cpus: int = 2,
        boot_timeout: float = 900.0,
        stop_timeout: float = 120.0,
        log: Log = print,
        tap: str | None = None,
    ) -> None:
        if memory_mib < 128 or memory_mib > 3072:
            raise QemuError(f"memory {memory_mib} MiB is out of range: use 128..3072 (32-bit guest, TCG)")
        if cpus < 1 or cpus > 8:
            raise QemuError(f"cpus {cpus} is out of range: use 1..8")
        self.image = image
        self.memory_mib = memory_mib
        self.cpus = cpus
        self.boot_timeout = boot_timeout
        self.stop_timeout = stop_timeout
        self.log = log
        self.tap = tap  # None: QEMU's user-mode network with loopback forwards
        self._own_workdir = workdir is None
        self._workdir_arg = workdir
        self._state_arg = state
        self.workdir = Path()
        self.overlay = Path()
        self.ssh_port = 0
        self.agent_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.boot_seconds: list[float] = []
        self._known_hosts: Path | None = None
        self._files: dict[str, Path] = {}

    # -- paths ---------------------------------------------------------------------------------------

    @property
    def console_log(self) -> Path:
        return self.workdir / "console.log"

    @property
    def qmp_socket(self) -> Path:
        return self.workdir / "qmp.sock"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- lifecycle -----------------------------------------------------------------------------------

    def __enter__(self) -> QemuGuest:
        try:
            self.start()
        except BaseException:
            # A guest that has not come up has nobody to answer the power button: stop QEMU at once.
            with contextlib.suppress(Exception):
                self.stop(power_down=False)
            self.close(keep_logs=True)
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(keep_logs=kind is not None)

    def close(self, keep_logs: bool = False) -> None:
        """Stop the guest (cleanly if it lets us) and remove what we made; ``keep_logs`` keeps the logs."""
        try:
            self.stop()
        finally:
            if self._own_workdir and self.workdir != Path() and self.workdir.exists():
                if keep_logs:
                    for name in ("disk.qcow2", "disk.img", "u-boot.bin", "qmp.sock"):
                        (self.workdir / name).unlink(missing_ok=True)
                    self.log(f"console log kept: {self.console_log}")
                else:
                    shutil.rmtree(self.workdir, ignore_errors=True)

    def start(self) -> float:
        """Boot the guest and wait until sshd answers on the forwarded port; returns the seconds it took."""
        if self.running:
            raise QemuError("the guest is already running")
        prereqs.require(["qemu-system-arm"])
        if shutil.which("qemu-img") is None:
            raise QemuError("qemu-img is missing: run sudo apt-get install -y qemu-utils")
        if self.workdir == Path():
            self._prepare_workdir()
        if self.tap is not None:
            self.qmp_socket.unlink(missing_ok=True)
            t0 = time.monotonic()
            self._launch()
            self._wait_for_sshd(t0)
            took = time.monotonic() - t0
            self.boot_seconds.append(took)
            self.log(f"guest up: sshd answers on {DEVICE_ADDRESS}:{SSH_PORT} after {took:.0f} s")
            return took
        for attempt in range(3):
            if not self.ssh_port or attempt:
                self.ssh_port, self.agent_port = free_port(), free_port()
                self._known_hosts = None
            self.qmp_socket.unlink(missing_ok=True)
            t0 = time.monotonic()
            self._launch()
            try:
                self._wait_for_sshd(t0)
            except _PortTaken:
                continue
            took = time.monotonic() - t0
            self.boot_seconds.append(took)
            self.log(f"guest up: sshd answers on 127.0.0.1:{self.ssh_port} after {took:.0f} s")
            return took
        raise QemuError("could not forward loopback ports to the guest after 3 tries: ports keep being taken")

    def stop(self, *, power_down: bool = True) -> bool:
        """Ask the guest to power down (ACPI-like power button over QMP); kill it if it does not.

        Returns True when the guest powered itself off within ``stop_timeout``. ``power_down=False``
        stops QEMU at once (a boot that failed has nobody to answer the power button).
        """
        proc = self.proc
        if proc is None:
            return True
        clean = False
        try:
            if proc.poll() is None and power_down:
                with contextlib.suppress(OSError, ValueError):
                    qmp = Qmp(self.qmp_socket)
                    try:
                        qmp.execute("system_powerdown")
                    finally:
                        qmp.close()
                try:
                    proc.wait(self.stop_timeout)
                    clean = True
                except subprocess.TimeoutExpired:
                    self.log(f"guest did not power off within {self.stop_timeout:.0f} s; stopping QEMU")
            elif proc.poll() is not None:
                clean = proc.returncode == 0
        finally:
            terminate(proc, grace=10.0)
            self.proc = None
        return clean

    def power_cycle(self) -> float:
        """Stop, then boot again on the same disk (what re-plugging the device does); returns boot seconds."""
        if not self.stop():
            self.log("warning: the guest was stopped without a clean power-off")
        return self.start()

    # -- reaching the guest --------------------------------------------------------------------------

    def known_hosts(self) -> Path:
        """The build's pinned host keys, re-written for [127.0.0.1]:ssh_port (the forwarded port);
        on a tap, the build's known_hosts itself."""
        if self.tap is not None:
            return self.image.known_hosts
        if self._known_hosts is None:
            lines = []
            for line in self.image.known_hosts.read_text().splitlines():
                parts = line.split()
                if len(parts) >= 3 and DEVICE_ADDRESS in parts[0].split(","):
                    lines.append(f"[127.0.0.1]:{self.ssh_port} {parts[1]} {parts[2]}\n")
            if not lines:
                raise QemuError(f"{self.image.known_hosts} pins no host key for {DEVICE_ADDRESS}")
            path = self.workdir / "known_hosts"
            path.write_text("".join(lines))
            self._known_hosts = path
        return self._known_hosts

    def ssh_target(self, identity: Path | None = None, user: str = "armory") -> Target:
        """Where provisioning logs in: the forwarded sshd, with the build's pinned host key."""
        if self.tap is not None:
            return Target(host=DEVICE_ADDRESS, port=SSH_PORT, user=user, identity=identity,
                          known_hosts=self.known_hosts(), timeout=60.0)
        return Target(host="127.0.0.1", port=self.ssh_port, user=user, identity=identity,
                      known_hosts=self.known_hosts(), timeout=60.0)

    def dial_agent(self, host: str, port: int, timeout: float) -> socket.socket:
        """Connect to the guest's agent through the forwarded loopback port (for Link.connect)."""
        return socket.create_connection(("127.0.0.1", self.agent_port), timeout=timeout)

    def link(self, timeout: float = 300.0) -> Link:
        """The agent as a laptop sees it (Host: 10.0.0.1:8550), reached through the forwarded port."""
        if self.tap is not None:
            return Link(host=DEVICE_ADDRESS, port=AGENT_PORT, timeout=timeout)
        return Link(host=DEVICE_ADDRESS, port=AGENT_PORT, connect=self.dial_agent, timeout=timeout)

    def rebooted(self) -> bool:
        """QEMU ended (``-no-reboot``) because the guest's kernel restarted the machine (not a power-off)."""
        return (self.proc is not None and self.proc.poll() == 0
                and REBOOTED in self.console_tail(8))

    def console_tail(self, lines: int = 20) -> str:
        try:
            text = self.console_log.read_bytes().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.replace("\r", "").splitlines()[-lines:])

    # -- internals -----------------------------------------------------------------------------------

    def _prepare_workdir(self) -> None:
        if self._workdir_arg is not None:
            self.workdir = self._workdir_arg
            self.workdir.mkdir(parents=True, exist_ok=True)
        else:
            parent = self.image.image.parent.parent
            try:
                self.workdir = Path(tempfile.mkdtemp(prefix=".qemu-run-", dir=parent))
            except OSError:
                self.workdir = Path(tempfile.mkdtemp(prefix="clef-armory-qemu-"))
        # Keep our own links to the build's files, so a rebuild that replaces build/qemu/ while the
        # guest runs cannot swap the backing file under the overlay.
        sources = (("disk.img", self.image.image), ("u-boot.bin", self.image.firmware))
        self._files = {name: self._pin(src, name) for name, src in sources}
        state = self._state_arg
        self.overlay = state.expanduser().resolve() if state else self.workdir / "disk.qcow2"
        if self.overlay.exists():
            self._check_overlay_backing()
            self.log(f"reusing device state in {self.overlay}")
        else:
            # A kept state file outlives this run's workdir: it must name the build's image itself.
            backing = self._files["disk.img"] if state is None else self.image.image
            result = subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(backing),
                 str(self.overlay)], capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise QemuError(f"qemu-img create failed: {result.stderr.strip()}")
            if state is not None:
                self._build_mark.write_text(self._build_id + "\n")

    @property
    def _build_mark(self) -> Path:
        """Beside a kept state file: which build of the image it was made on (the image's sha256)."""
        return self.overlay.with_name(self.overlay.name + ".build")

    @property
    def _build_id(self) -> str:
        return str(self.image.manifest.get("image_sha256", ""))

    def _pin(self, src: Path, name: str) -> Path:
        dest = self.workdir / name
        dest.unlink(missing_ok=True)
        try:
            os.link(src, dest)
        except OSError:
            if src.stat().st_size > 256 << 20:
                return src  # a different filesystem: copying gigabytes is not worth it
            shutil.copyfile(src, dest)
        return dest

    def _check_overlay_backing(self) -> None:
        result = subprocess.run(["qemu-img", "info", "--output=json", "-U", str(self.overlay)],
                                capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise QemuError(f"{self.overlay} is not a qcow2 state file: {result.stderr.strip()}")
        backing = json.loads(result.stdout).get("full-backing-filename") or ""
        if not backing or not Path(backing).exists() or not os.path.samefile(backing, self.image.image):
            raise QemuError(
                f"state file {self.overlay} belongs to another image ({backing or 'none'}): "
                "delete it to start from this image")
        # The same path, rebuilt since: the state's blocks sit on top of different bytes now.
        mark = self._build_mark.read_text().strip() if self._build_mark.exists() else ""
        if mark and mark != self._build_id:
            raise QemuError(
                f"state file {self.overlay} was made on an earlier build of {self.image.image.name} "
                "(rebuilt since): delete it to start from this build")

    def _netdev(self) -> list[str]:
        if self.tap is not None:
            # The tap exists already (provision.tap made it); QEMU only attaches to it.
            return ["-netdev", f"tap,id=n,ifname={self.tap},script=no,downscript=no"]
        fwd = (f"hostfwd=tcp:127.0.0.1:{self.ssh_port}-{DEVICE_ADDRESS}:{SSH_PORT},"
               f"hostfwd=tcp:127.0.0.1:{self.agent_port}-{DEVICE_ADDRESS}:{AGENT_PORT}")
        # restrict=on: the guest cannot reach this machine or beyond; only the forwards get in.
        return ["-netdev", f"user,id=n,net={LINK_NETWORK},host={HOST_ADDRESS},restrict=on,{fwd}"]

    def _command(self) -> list[str]:
        return [
            "qemu-system-arm", "-M", "virt", "-cpu", "cortex-a15", "-smp", str(self.cpus),
            "-m", str(self.memory_mib), "-nodefaults", "-no-user-config", "-display", "none",
            # A reset (U-Boot giving up, a kernel panic with panic=N) ends QEMU instead of looping.
            "-no-reboot",
            "-serial", f"file:{self.console_log}",
            "-qmp", f"unix:{self.qmp_socket},server=on,wait=off",
            # U-Boot boots the disk's /boot/extlinux/extlinux.conf; QEMU gives it the virt device tree.
            "-bios", str(self._files["u-boot.bin"]),
            "-drive", f"file={self.overlay},format=qcow2,if=none,id=hd",
            "-device", "virtio-blk-device,drive=hd",
            *self._netdev(),
            "-device", f"virtio-net-device,netdev=n,mac={DEVICE_MAC}",
            # Stands in for the Mk II's hardware RNG, so the guest's entropy is not starved at boot.
            "-object", "rng-random,id=rng,filename=/dev/urandom",
            "-device", "virtio-rng-device,rng=rng",
        ]

    def _launch(self) -> None:
        self.console_log.unlink(missing_ok=True)  # the boot watch must not read the last boot's console
        stderr = (self.workdir / "qemu.stderr").open("wb")
        try:
            self.proc = subprocess.Popen(self._command(), stdin=subprocess.DEVNULL, stdout=stderr,
                                         stderr=stderr, start_new_session=True)
        except OSError as e:
            raise QemuError(f"cannot start qemu-system-arm: {e.strerror}") from None
        finally:
            stderr.close()
        self.log(f"booting {self.image.image.name} in qemu-system-arm ({self.memory_mib} MiB, "
                 f"{self.cpus} CPU, TCG); console: {self.console_log}")

    def _qemu_error(self) -> str:
        try:
            text = (self.workdir / "qemu.stderr").read_text(errors="replace").strip()
        except OSError:
            text = ""
        if text:
            return text.splitlines()[-1]
        code = self.proc.returncode if self.proc else None
        if code is not None and code < 0:
            return f"killed by {signal.Signals(-code).name}"
        if code == 0:  # -no-reboot: the guest reset or powered itself off
            return f"the guest reset or powered off (last console line: {self.console_tail(1) or '(none)'})"
        return f"exit status {code if code is not None else '?'}"

    def _console_text(self) -> str:
        try:
            return self.console_log.read_bytes().decode(errors="replace").replace("\r", "")
        except OSError:
            return ""

    def _wait_for_sshd(self, t0: float) -> None:
        # The banner probe runs beside the console watch: until the guest's TCP stack answers, a probe
        # of the forwarded port can hang for seconds, and a failed boot must be seen at once.
        answered, done = threading.Event(), threading.Event()
        address = (DEVICE_ADDRESS, SSH_PORT) if self.tap is not None else ("127.0.0.1", self.ssh_port)

        def probe() -> None:
            while not done.is_set():
                if _sshd_banner(*address):
                    answered.set()
                    return
                done.wait(1.0)

        threading.Thread(target=probe, name="sshd-probe", daemon=True).start()
        try:
            self._watch_boot(t0, answered)
        finally:
            done.set()

    def _watch_boot(self, t0: float, answered: threading.Event) -> None:
        deadline = t0 + self.boot_timeout
        last_note = t0
        kernel_seen = False
        while time.monotonic() < deadline:
            assert self.proc is not None
            console = self._console_text()
            failure = boot_failure(console)
            if failure is not None:
                took = time.monotonic() - t0
                self.stop(power_down=False)
                raise QemuError(f"boot failed after {took:.0f} s: {failure} (console: {self.console_log})")
            if self.proc.poll() is not None:
                why = self._qemu_error()
                self.proc = None
                if "hostfwd" in why or "host forwarding" in why:
                    raise _PortTaken(why)
                raise QemuError(f"qemu-system-arm stopped while booting: {why} (console: {self.console_log})")
            if not kernel_seen and KERNEL_START in console:
                kernel_seen = True
                self.log(f"    U-Boot started the kernel after {time.monotonic() - t0:.0f} s")
            if answered.is_set():
                return
            if time.monotonic() - last_note > 60:
                last_note = time.monotonic()
                lines = self.console_tail(1)
                self.log(f"    still booting ({last_note - t0:.0f} s): {lines[-100:]}")
            answered.wait(1.0)
        tail = self.console_tail(1)
        self.stop()
        raise QemuError(
            f"sshd did not answer within {self.boot_timeout:.0f} s; last console line: "
            f"{tail or '(none)'} (full log: {self.console_log})")


# What U-Boot prints as it hands over to the kernel; the console before it is U-Boot's, after it Linux's.
KERNEL_START = "Starting kernel ..."
_RETRIEVING = re.compile(r"^Retrieving file: (\S+)", re.M)
# (pattern, what it means): U-Boot's, looked for until the kernel starts.
_UBOOT_FAILURES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^Skipping .* for failure retrieving (\w+).*$", re.M),
     "U-Boot could not load the {item} that /boot/extlinux/extlinux.conf names"),
    (re.compile(r"^(BOOTP broadcast|DHCP client bound|TFTP from server|Retrieving file: pxelinux).*$", re.M),
     "U-Boot found nothing to boot on the disk (/boot/extlinux/extlinux.conf) and fell back to network boot"),
    (re.compile(r"(?:^|\n)=> ?$"), "U-Boot stopped at its prompt: nothing on the disk booted"),
)
# Linux's, from the initramfs and systemd.
_KERNEL_FAILURES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"Kernel panic - not syncing.*$", re.M), "the kernel panicked"),
    (re.compile(r"ALERT!.*$", re.M), "the initramfs could not mount the root filesystem"),
    (re.compile(r"Gave up waiting for root file system device.*$", re.M),
     "the initramfs could not find the root filesystem"),
    (re.compile(r"^\(initramfs\).*$", re.M), "the initramfs dropped to a shell"),
    (re.compile(r"(You are in emergency mode|Cannot open access to console, the root account is locked"
                r"|Give root password for maintenance).*$", re.M),
     "systemd gave up and entered emergency mode"),
)


def boot_failure(console: str) -> str | None:
    """Why the boot on this console (as far as it got) cannot succeed any more; None while it still can.

    One line: what failed, and the console line that says so.
    """
    uboot, started, linux = console.partition(KERNEL_START)
    if not started:
        # The earliest failure is the cause (a disk that does not boot comes before the network attempt).
        found = [(m, what) for pattern, what in _UBOOT_FAILURES if (m := pattern.search(uboot))]
        if not found:
            return None
        m, what = min(found, key=lambda f: f[0].start())
        item = m.group(1) if "{item}" in what else ""
        files = _RETRIEVING.findall(uboot, 0, m.start())
        if item and files:
            item = f"{item} {files[-1]}"
        line = m.group(0).strip()
        return what.format(item=item) + (f" ({line!r})" if line else "")
    return linux_failure(linux)


def linux_failure(console: str) -> str | None:
    """Why Linux on this console can no longer come up (a panic, the initramfs or systemd giving up),
    or None. Also what the Mk II emulation test watches for (it boots without U-Boot)."""
    found = [(m, what) for pattern, what in _KERNEL_FAILURES if (m := pattern.search(console))]
    if not found:
        return None
    m, what = min(found, key=lambda f: f[0].start())
    return f"{what} ({m.group(0).strip()!r})"


def terminate(proc: subprocess.Popen[bytes], grace: float) -> None:
    """End a QEMU process that is still running: SIGTERM, then SIGKILL after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace)


class _PortTaken(Exception):
    """QEMU could not bind a forwarded port (someone took it after free_port chose it)."""


def _sshd_banner(host: str, port: int) -> bool:
    """True when an SSH server greets on host:port (QEMU's forward accepts and closes until the guest
    listens; on a tap, the connect times out or is refused until then)."""
    try:
        with socket.create_connection((host, port), timeout=5.0) as s:
            s.settimeout(10.0)
            return s.recv(64).startswith(b"SSH-")
    except OSError:
        return False


def hold(guest: QemuGuest, poll: float = 1.0) -> None:
    """Wait while the guest runs; Ctrl-C (or SIGTERM/SIGHUP, see provision.tap) returns so the caller powers
    it off. A guest that rebooted itself (``./do update`` does) is started again on the same disk, as the
    board comes back by itself; QEMU ending otherwise (killed, crashed, powered off) is an error."""
    try:
        while True:
            while guest.running:
                time.sleep(poll)
            if not guest.rebooted():
                break
            guest.proc = None
            guest.log("the guest rebooted: starting it again on the same disk, as the board would")
            guest.start()
    except KeyboardInterrupt:
        return
    why = guest._qemu_error()
    guest.proc = None
    raise QemuError(f"qemu-system-arm stopped: {why} (console: {guest.console_log})")
