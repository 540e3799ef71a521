"""Boot the Mk II image on QEMU's mcimx6ul-evk (i.MX6UL) and watch its serial console.

QEMU models the i.MX6UL, the family of the Mk II's i.MX6ULZ (same uSDHC, UART, GPIO, clock and
interrupt blocks), but not its boot ROM, so the Mk II's U-Boot cannot run there (docs/architecture.md).
QEMU's own loader does U-Boot's part: the kernel, initramfs, device tree and command line are the ones
the image's ``/boot/extlinux/extlinux.conf`` names, read out of the image with debugfs (never the
build's side files). The image is the microSD card in uSDHC1 (``-drive if=sd``) through a qcow2
overlay, so the built image is never written; UART2 (``ttymxc1``, the Mk II's console) is QEMU's
second serial port, written to a file that is polled. No network device, ``-no-reboot``.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import time
from pathlib import Path
from types import TracebackType

from image.inspect import Image
from provision import qemu

MACHINE = "mcimx6ul-evk"
MEMORY_MIB = 512  # the Mk II's DDR3


@dataclasses.dataclass(frozen=True)
class Unmodelled:
    """A failure that comes from a part QEMU does not model, and the console line that proves it is
    that failure (and not a defect in the image that happens to hit the same unit)."""

    reason: str
    evidence: str


# What QEMU 7.2's i.MX6UL does not model, so fails on every emulated boot and only hardware can show.
# Kept here, in one place; the test checks that exactly these fail, each with its evidence (a unit that
# starts working after a QEMU upgrade comes off the list; any other failure is a defect in the image).
UNMODELLED_UNITS: dict[str, Unmodelled] = {
    "armory-usb-gadget.service": Unmodelled(
        reason="no USB device controller: QEMU's ChipIdea model (usbotg1) is an EHCI host only (its "
               "DCCPARAMS offer no device role), so no UDC appears and the configfs gadget, built up "
               "to that point, cannot bind; usb0 never exists",
        evidence="no USB device controller found",  # the gadget script's message for exactly this
    ),
}
# Kernel oopses, by the function the oops names, that come from a missing peripheral model.
UNMODELLED_OOPS: dict[str, Unmodelled] = {
    "imx_rngc": Unmodelled(
        reason="no RNGB model: imx-rngc's probe reads the RNG block at 0x02284000, which QEMU leaves "
               "unimplemented (an external abort); so there is no hardware RNG in emulation",
        evidence="PC is at imx_rngc_probe",
    ),
}


# Observability only: status lines, unit names and the journal (the agent's own log) on the
# console. root=, console= and everything else come from the image's extlinux.conf.
OBSERVE_CMDLINE = (
    "systemd.show_status=1",
    "systemd.status_unit_format=combined",
    "systemd.journald.forward_to_console=1",
)


# Terminal control sequences (systemd's colours, agetty's queries): CSI ... final byte, OSC ... BEL.
_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\r")


def plain(console: str) -> str:
    """The console text without colours and terminal control sequences."""
    return _CONTROL.sub("", console)


@dataclasses.dataclass(frozen=True)
class BootEntry:
    """One extlinux.conf label: what U-Boot's distro boot would load and pass on."""

    label: str
    kernel: str
    initrd: str
    fdt: str
    append: str


def parse_extlinux(text: str) -> BootEntry:
    """The ``default`` label of an extlinux.conf (the first label when there is no default)."""
    default = None
    labels: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        word, rest = word.lower(), rest.strip()
        if word == "default":
            default = rest
        elif word == "label":
            current = labels.setdefault(rest, {})
        elif current is not None and word in ("kernel", "linux", "initrd", "fdt", "devicetree", "append"):
            current[{"linux": "kernel", "devicetree": "fdt"}.get(word, word)] = rest
    if not labels:
        raise ValueError("extlinux.conf has no label")
    name = default if default in labels else next(iter(labels))
    fields = labels[name]
    missing = [k for k in ("kernel", "initrd", "fdt", "append") if not fields.get(k)]
    if missing:
        raise ValueError(f"extlinux.conf label {name!r} has no {', '.join(missing)}")
    return BootEntry(name, fields["kernel"], fields["initrd"], fields["fdt"], fields["append"])


@dataclasses.dataclass(frozen=True)
class BootFiles:
    """The files and command line extlinux.conf names, copied out of the image."""

    entry: BootEntry
    kernel: Path
    initrd: Path
    dtb: Path

    @property
    def cmdline(self) -> str:
        return self.entry.append


def boot_files(image: Path, dest: Path) -> BootFiles:
    """Read extlinux.conf and the kernel, initramfs and dtb it names out of ``image`` (debugfs)."""
    disk = Image(image)
    entry = parse_extlinux(disk.read("/boot/extlinux/extlinux.conf").decode())
    dest.mkdir(parents=True, exist_ok=True)
    out = {}
    for what, path in (("kernel", entry.kernel), ("initrd", entry.initrd), ("dtb", entry.fdt)):
        target = dest / f"{what}-{Path(path).name}"
        target.write_bytes(disk.read(path))
        out[what] = target
    return BootFiles(entry, out["kernel"], out["initrd"], out["dtb"])


def sd_card(image: Path, dest: Path) -> Path:
    """A qcow2 overlay on ``image`` whose size is the next power of two (QEMU's SD model insists)."""
    size = 1 << max(image.stat().st_size - 1, 1).bit_length()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(image.resolve()),
                    str(dest), str(size)], check=True, capture_output=True)
    return dest


def disable_node(dtb: Path, alias: str, dest: Path) -> str:
    """Copy ``dtb`` to ``dest`` with the node ``alias`` names set to status "disabled"; returns its path."""
    node = subprocess.run(["fdtget", "-t", "s", str(dtb), "/aliases", alias], capture_output=True,
                          text=True, check=True).stdout.strip()
    shutil.copyfile(dtb, dest)
    subprocess.run(["fdtput", "-t", "s", str(dest), node, "status", "disabled"], check=True)
    return node


UNIT = r"([\w@.\\-]+\.(?:service|mount|socket|target|device|path|timer|swap))"


def failed_units(console: str) -> set[str]:
    """Units the console reports as failed (systemd's status lines and the forwarded journal)."""
    found = set(re.findall(r"Failed to start " + UNIT, console))
    found |= set(re.findall(r"Dependency failed for " + UNIT, console))
    found |= set(re.findall(UNIT + r": Failed with result", console))
    return found


def oopses(console: str) -> list[str]:
    """For each kernel oops ("Internal error:") the function it happened in ("?" if the console does
    not name it), and each other kernel "BUG:" line as it is."""
    names = []
    starts = [m.start() for m in re.finditer(r"Internal error:", console)]
    for start, end in zip(starts, [*starts[1:], len(console)], strict=True):
        pc = re.search(r"PC is at ([\w.]+)", console[start:min(end, start + 4000)])
        names.append(pc.group(1) if pc else "?")
    names += [m.group(0) for m in re.finditer(r"BUG: .*", console)]
    return names


@dataclasses.dataclass
class Watch:
    """What a boot showed: when each awaited line first appeared, and the first failure sign."""

    seen: dict[str, float] = dataclasses.field(default_factory=dict)  # marker -> seconds since start
    failure: str | None = None  # provision.qemu.linux_failure's line for the first failure seen
    failure_at: float | None = None
    exited: int | None = None  # QEMU's exit status, when it stopped by itself
    timed_out: bool = False


class Mk2Guest:
    """``with Mk2Guest(files, image, workdir) as g: g.watch([...], timeout=...)``; QEMU is always stopped."""

    def __init__(self, files: BootFiles, image: Path, workdir: Path, *, dtb: Path | None = None,
                 extra_cmdline: tuple[str, ...] = OBSERVE_CMDLINE) -> None:
        self.files = files
        self.image = image
        self.workdir = workdir
        self.dtb = dtb or files.dtb
        self.cmdline = " ".join([files.cmdline, *extra_cmdline])
        self.console_log = workdir / "console.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self._console = bytearray()

    def command(self, sd: Path) -> list[str]:
        return [
            "qemu-system-arm", "-M", MACHINE, "-m", str(MEMORY_MIB),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-nic", "none",
            "-serial", "null", "-serial", f"file:{self.console_log}",  # UART1, UART2 (= ttymxc1)
            "-kernel", str(self.files.kernel), "-initrd", str(self.files.initrd), "-dtb", str(self.dtb),
            "-append", self.cmdline,
            "-drive", f"if=sd,index=0,file={sd},format=qcow2",
        ]

    def __enter__(self) -> Mk2Guest:
        self.workdir.mkdir(parents=True, exist_ok=True)
        sd = sd_card(self.image, self.workdir / "sd.qcow2")
        self.console_log.write_bytes(b"")
        with (self.workdir / "qemu.stderr").open("wb") as err:
            self.proc = subprocess.Popen(self.command(sd), stdin=subprocess.DEVNULL, stdout=err,
                                         stderr=err, start_new_session=True)
        self.started = time.monotonic()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            qemu.terminate(proc, grace=15.0)

    def console(self) -> str:
        """Everything UART2 has printed so far (read on from where the last call stopped)."""
        with self.console_log.open("rb") as f:
            f.seek(len(self._console))
            self._console += f.read()
        return plain(self._console.decode("utf-8", "replace"))

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.console().splitlines()[-lines:])

    def watch(self, markers: list[str], *, timeout: float, settle: float = 0.0, poll: float = 0.5) -> Watch:
        """Poll the console until every marker has appeared (then ``settle`` seconds more, to catch late
        failures), a failure sign appears (then 5 s more, for its context), QEMU exits, or ``timeout``."""
        assert self.proc is not None, "not started"
        result = Watch()
        deadline = self.started + timeout
        stop_at: float | None = None
        while True:
            now = time.monotonic()
            text = self.console()
            for marker in markers:
                if marker not in result.seen and marker in text:
                    result.seen[marker] = now - self.started
            if result.failure is None:
                failure = qemu.linux_failure(text)
                if failure is not None:
                    result.failure = failure
                    result.failure_at = now - self.started
                    stop_at = now + 5.0
            if stop_at is None and len(result.seen) == len(markers):
                stop_at = now + settle
            if stop_at is not None and now >= stop_at:
                return result
            code = self.proc.poll()
            if code is not None:
                result.exited = code
                return result
            if now >= deadline:
                result.timed_out = True
                return result
            time.sleep(poll)

    def qemu_stderr(self) -> str:
        return (self.workdir / "qemu.stderr").read_text(errors="replace").strip()
