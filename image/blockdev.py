"""Target inspection: is this path a whole disk that is safe to overwrite?

Writing to the wrong disk destroys someone's data, so every rule here errs on the side
of refusing. Facts come straight from the kernel (/sys, /proc/self/mountinfo,
/proc/swaps) so they are true right now; lsblk only adds the model and serial udev
knows about. Opening the device with O_EXCL at write time is the last guard against
anything that changes between this check and the write.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
from collections.abc import Iterable
from pathlib import Path

from clef_armory.errors import FlashError
from image.bmap import human_size

SYS_BLOCK = Path("/sys/class/block")
SYSTEM_MOUNTS = ("/", "/boot", "/boot/efi", "/boot/firmware", "/home", "/usr", "/var")
SAFE_TRANSPORTS = ("usb", "mmc")


@dataclasses.dataclass(frozen=True)
class BlockDevice:
    """What the kernel says about one whole disk."""

    path: Path
    name: str
    size: int
    model: str
    serial: str
    transport: str
    removable: bool
    read_only: bool
    partitions: tuple[str, ...]
    holders: tuple[str, ...]
    mounts: tuple[str, ...]
    system_uses: tuple[str, ...]
    diskseq: str = ""  # changes whenever the kernel sees new media under this name

    def identity(self) -> tuple[str, int, str, str, str]:
        """What must not change between confirmation and writing."""
        return (self.name, self.size, self.serial, self.model, self.diskseq)

    def describe(self) -> str:
        """A few plain lines for the confirmation prompt."""
        return "\n".join([
            f"  device:    {self.path}",
            f"  model:     {self.model or 'unknown'}",
            f"  size:      {human_size(self.size)} ({self.size} bytes)",
            f"  serial:    {self.serial or 'unknown'}",
            f"  transport: {self.transport}{' (removable)' if self.removable else ''}",
        ])


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _devno(text: str) -> tuple[int, int]:
    major, minor = text.split(":")
    return int(major), int(minor)


def _name_of_devno(devno: tuple[int, int]) -> str | None:
    link = Path(f"/sys/dev/block/{devno[0]}:{devno[1]}")
    return link.resolve().name if link.exists() else None


def disk_of(name: str) -> str:
    """The whole disk a block device name belongs to (a partition's parent, else itself)."""
    node = (SYS_BLOCK / name).resolve()
    return node.parent.name if (node / "partition").exists() else name


def underlying_disks(name: str) -> set[str]:
    """Whole disks under a block device, following device-mapper/RAID slaves down."""
    slaves = sorted(p.name for p in (SYS_BLOCK / name / "slaves").glob("*"))
    if not slaves:
        return {disk_of(name)}
    disks: set[str] = set()
    for s in slaves:
        disks |= underlying_disks(s)
    return disks


def _stacked_above(names: Iterable[str]) -> set[str]:
    """Every device built on top of ``names`` (dm, md, ...), transitively."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        for h in (SYS_BLOCK / todo.pop() / "holders").glob("*"):
            if h.name not in seen:
                seen.add(h.name)
                todo.append(h.name)
    return seen


def _mountinfo() -> list[tuple[tuple[int, int], str]]:
    """(device number, mount point) of every mount visible to us."""
    out = []
    for line in _read(Path("/proc/self/mountinfo")).splitlines():
        fields = line.split()
        if len(fields) > 4:
            point = fields[4].replace("\\040", " ")
            out.append((_devno(fields[2]), point))
    return out


def _swap_devnos() -> set[tuple[int, int]]:
    """Devices that hold active swap (a swap file counts for the disk it lives on)."""
    devnos = set()
    for line in _read(Path("/proc/swaps")).splitlines()[1:]:
        fields = line.split()
        if not fields:
            continue
        try:
            st = os.stat(fields[0].replace("\\040", " "))
        except OSError:
            continue
        dev = st.st_rdev if stat.S_ISBLK(st.st_mode) else st.st_dev
        devnos.add((os.major(dev), os.minor(dev)))
    return devnos


def _system_uses(disk: str) -> tuple[str, ...]:
    """Which of /, /boot, /home, ..., swap live on ``disk``."""
    uses = []
    latest: dict[str, tuple[int, int]] = {}
    for devno, point in _mountinfo():
        latest[point] = devno  # the last mount on a point is the visible one
    for point in SYSTEM_MOUNTS:
        if point in latest:
            name = _name_of_devno(latest[point])
            if name and disk in underlying_disks(name):
                uses.append(point)
    for devno in _swap_devnos():
        name = _name_of_devno(devno)
        if name and disk in underlying_disks(name):
            uses.append("swap")
            break
    return tuple(uses)


def transport_of(name: str) -> str:
    """usb, mmc, nvme, sata, virtio, loop, ... from where the disk sits in /sys/devices."""
    path = str((SYS_BLOCK / name).resolve())
    if "/usb" in path:
        return "usb"
    if "/mmc_host/" in path or name.startswith("mmcblk"):
        return "mmc"
    for marker, transport in (("/nvme", "nvme"), ("/ata", "sata"), ("/virtio", "virtio"),
                              ("/virtual/block/loop", "loop"), ("/virtual/block/zram", "zram"),
                              ("/virtual/block/", "virtual"), ("/host", "scsi")):
        if marker in path:
            return transport
    return "unknown"


def _lsblk_facts(path: Path) -> dict[str, str]:
    try:
        out = subprocess.run(["lsblk", "-J", "-d", "-o", "MODEL,SERIAL,VENDOR", str(path)],
                             capture_output=True, text=True, timeout=20, check=False)
        rows = json.loads(out.stdout)["blockdevices"] if out.returncode == 0 else []
    except (OSError, subprocess.TimeoutExpired, ValueError, KeyError):
        return {}
    return {k: (v or "").strip() for k, v in rows[0].items()} if rows else {}


def resolve(given: str) -> Path:
    """The block device node behind ``given`` (symlinks followed), or a one-line refusal."""
    if not given:
        raise FlashError("no device given: pass --device /dev/sdX (see `lsblk -d -o NAME,SIZE,TRAN,MODEL`)")
    path = Path(os.path.realpath(given))
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FlashError(f"{given} does not exist (is the card inserted?)") from None
    except OSError as e:
        raise FlashError(f"cannot look at {given}: {e.strerror}") from None
    if not stat.S_ISBLK(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a regular file" \
            if stat.S_ISREG(st.st_mode) else "not a block device"
        raise FlashError(f"{given} is {kind}, not a disk; to write an image file use --to-file")
    return path


def inspect(given: str) -> BlockDevice:
    """Everything the safety rules need to know about the disk at ``given``."""
    path = resolve(given)
    rdev = path.stat().st_rdev
    name = _name_of_devno((os.major(rdev), os.minor(rdev)))
    if name is None:
        raise FlashError(f"{given} is a block device the kernel does not list in /sys")
    node = (SYS_BLOCK / name).resolve()
    if (node / "partition").exists():
        raise FlashError(f"{given} is a partition; give the whole disk /dev/{node.parent.name}")
    partitions = tuple(sorted(p.name for p in node.iterdir() if (p / "partition").exists()))
    holders = tuple(sorted(_stacked_above([name, *partitions])))
    members = {name, *partitions, *holders}
    mounts = tuple(sorted({f"/dev/{n} on {point}" for devno, point in _mountinfo()
                           if (n := _name_of_devno(devno)) in members}))
    size = int(_read(node / "size") or 0) * 512
    facts = _lsblk_facts(path)
    model = " ".join(x for x in (facts.get("VENDOR") or _read(node / "device" / "vendor"),
                                 facts.get("MODEL") or _read(node / "device" / "model")
                                 or _read(node / "device" / "name")) if x)
    serial = facts.get("SERIAL") or _read(node / "serial") or _read(node / "device" / "serial")
    return BlockDevice(
        path=Path("/dev") / name, name=name, size=size, model=model, serial=serial,
        transport=transport_of(name), removable=_read(node / "removable") == "1",
        read_only=_read(node / "ro") == "1", partitions=partitions, holders=holders,
        mounts=mounts, system_uses=_system_uses(name), diskseq=_read(node / "diskseq"))


def check(dev: BlockDevice, image_size: int, force: bool = False) -> None:
    """Refuse (one line) unless ``dev`` is safe to overwrite with an image of ``image_size``."""
    if dev.system_uses:
        raise FlashError(f"{dev.path} holds {', '.join(dev.system_uses)} of this computer; "
                         "refusing to overwrite it")
    if dev.mounts:
        raise FlashError(f"{dev.path} is mounted ({'; '.join(dev.mounts)}); unmount it first")
    if dev.holders:
        raise FlashError(f"{dev.path} is in use by {', '.join(dev.holders)} "
                         "(device-mapper, LVM or RAID); release it first")
    if dev.read_only:
        raise FlashError(f"{dev.path} is read-only (check the card's lock switch)")
    if dev.size < image_size:
        raise FlashError(f"{dev.path} is {human_size(dev.size)}, smaller than the image "
                         f"({human_size(image_size)})")
    if dev.transport not in SAFE_TRANSPORTS and not force:
        raise FlashError(f"{dev.path} is a {dev.transport} disk, not a USB or MMC card; "
                         "pass --force only if you are sure it is the right disk")


def whole_disks() -> list[str]:
    """Names of all whole disks the kernel knows now (for spotting one that appears)."""
    return sorted(p.name for p in SYS_BLOCK.iterdir() if not (p.resolve() / "partition").exists())
