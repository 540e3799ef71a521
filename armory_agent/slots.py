"""The device side of ./do update: the A/B system slots (standard library only; runs as root).

The disk is MBR: p1 system A, p2 system B, p3 data (docs/updating.md). U-Boot's distro boot boots the
partition marked bootable, so a slot becomes the one that boots only when its whole system has been
written, read back and checked, its extlinux.conf names its own root, and the flag is flipped (one
512-byte sector, fsynced). Until then the running slot stays bootable: a stream cut half-way changes
nothing that boots, and a re-run writes the inactive slot again from the start.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import subprocess
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from armory_agent import contract

SECTOR = 512
# Which slots hold a whole, verified system, with their release: on the data partition, root's.
RECORD = Path("/var/lib/clef-armory/system/slots.json")
RELEASE = Path("/etc/clef-armory/release.json")
LOCK = Path("/run/clef-armory-update.lock")
EXTLINUX = "boot/extlinux/extlinux.conf"
_CHUNK = 1 << 20


class SlotError(Exception):
    """A refusal with a one-line reason for the laptop."""


# -- where things are -----------------------------------------------------------------------------


def _block_name(dev: int) -> str:
    """The kernel's name (vda1, mmcblk0p2) of a block device number."""
    link = os.readlink(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    return os.path.basename(link)


def running_partition() -> tuple[str, int]:
    """(disk name, partition number) of the mounted root filesystem."""
    name = _block_name(os.stat("/").st_dev)
    part = Path("/sys/class/block") / name
    try:
        number = int((part / "partition").read_text())
    except FileNotFoundError:
        raise SlotError(f"the root filesystem is on {name}, not on a partition: no A/B slots") from None
    disk = part.resolve().parent.name
    return disk, number


def partition_device(disk: str, number: int) -> tuple[str, int]:
    """(/dev/<name>, size in bytes) of a partition of ``disk``."""
    for child in sorted((Path("/sys/class/block") / disk).iterdir()):
        pfile = child / "partition"
        if pfile.exists() and int(pfile.read_text()) == number:
            return f"/dev/{child.name}", int((child / "size").read_text()) * SECTOR
    raise SlotError(f"/dev/{disk} has no partition {number}")


# -- the MBR ----------------------------------------------------------------------------------------


def read_mbr(disk_path: str) -> bytes:
    with open(disk_path, "rb") as f:
        mbr = f.read(SECTOR)
    if len(mbr) != SECTOR or mbr[510:512] != b"\x55\xaa":
        raise SlotError(f"{disk_path} has no MBR")
    return mbr


def bootable_partition(mbr: bytes) -> int:
    """The partition marked bootable (1-4), 0 when none is."""
    for i in range(4):
        if mbr[446 + 16 * i] == 0x80:
            return i + 1
    return 0


def disk_id(mbr: bytes) -> str:
    return f"{int.from_bytes(mbr[440:444], 'little'):08x}"


def set_bootable(disk_path: str, number: int) -> int:
    """Mark partition ``number`` bootable and the others not, in one sector write; returns the
    partition that was bootable before."""
    with open(disk_path, "r+b", buffering=0) as f:
        mbr = bytearray(f.read(SECTOR))
        if len(mbr) != SECTOR or mbr[510:512] != b"\x55\xaa":
            raise SlotError(f"{disk_path} has no MBR")
        previous = bootable_partition(bytes(mbr))
        for i in range(4):
            mbr[446 + 16 * i] = 0x80 if i + 1 == number else 0x00
        f.seek(0)
        f.write(bytes(mbr))
        os.fsync(f.fileno())
    return previous


# -- the record -------------------------------------------------------------------------------------


def load_record(path: Path = RECORD) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_record(record: dict[str, Any], path: Path = RECORD) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".slots-")
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _release(path: Path = RELEASE) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """One slot operation at a time (a re-run after a dropped link waits for the old one)."""
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# -- the calls --------------------------------------------------------------------------------------


def running_release() -> dict[str, Any]:
    """The running system's release.json, with the agent's version and contract."""
    from armory_agent import __version__

    return {**(_release() or {}), "agent": __version__, "contract": contract.VERSION}


def hello() -> contract.Hello:
    from armory_agent import __version__

    release = _release() or {}
    return contract.Hello(contract=contract.VERSION, agent_version=__version__,
                          board=str(release.get("board", "")))


def slots() -> contract.Slots:
    disk, running = running_partition()
    mbr = read_mbr(f"/dev/{disk}")
    record = load_record()
    entries = []
    for number in (1, 2):
        device, size = partition_device(disk, number)
        known = record.get(str(number), {})
        complete = number == running or bool(known.get("complete"))
        release = running_release() if number == running else known.get("release")
        entries.append(contract.Slot(number, device, size, complete, release).to_json())
    return contract.Slots(disk=f"/dev/{disk}", disk_id=disk_id(mbr), running=running,
                          bootable=bootable_partition(mbr), slots=entries, release=_release(),
                          debian_version=_first_line("/etc/debian_version"), kernel=os.uname().release,
                          boot_id=_first_line("/proc/sys/kernel/random/boot_id"))


def _first_line(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def write_slot(req: contract.WriteSlot, stream: BinaryIO) -> contract.SlotWritten:
    """Write the zlib stream's bytes into the ranges of the inactive slot, then read them back."""
    t0 = time.monotonic()
    with _locked():
        disk, running = running_partition()
        if req.slot == running or req.slot not in (1, 2):
            raise SlotError(f"slot {req.slot} is not the inactive system slot (slot {running} is running)")
        device, size = partition_device(disk, req.slot)
        # The slot about to be overwritten must not be the one that boots (an activation whose reboot
        # never came): until it is verified, the running system boots.
        if bootable_partition(read_mbr(f"/dev/{disk}")) != running:
            set_bootable(f"/dev/{disk}", running)
        end = max((o + n for o, n in req.ranges), default=0)
        if end > size or any(o < 0 or n <= 0 for o, n in req.ranges):
            raise SlotError(f"the new system needs {end} bytes: slot {req.slot} has {size}")
        record = load_record()
        # The running system is the one to go back to (--rollback) once the other slot boots.
        record[str(running)] = {**record.get(str(running), {}), "complete": True,
                                "release": running_release()}
        record[str(req.slot)] = {"complete": False}
        save_record(record)
        written = _receive(device, req.ranges, stream)
        if written != req.sha256:
            raise SlotError(f"the stream's sha256 {written[:16]}... is not the image's {req.sha256[:16]}...: "
                            "nothing was activated; run the update again")
        readback = _read_back(device, req.ranges)
        if readback != req.sha256:
            raise SlotError(f"slot {req.slot} reads back sha256 {readback[:16]}..., "
                            f"not {req.sha256[:16]}...: the storage may be failing")
        record[str(req.slot)] = {"complete": True, "sha256": readback, "release": req.release}
        save_record(record)
    total = sum(n for _, n in req.ranges)
    return contract.SlotWritten(req.slot, total, readback, round(time.monotonic() - t0, 2))


def _receive(device: str, ranges: list[list[int]], stream: BinaryIO) -> str:
    """Decompress the stream into the ranges; returns the sha256 of what was written."""
    digest = hashlib.sha256()
    inflate = zlib.decompressobj()
    pending = bytearray()
    queue = [(o, n) for o, n in ranges]
    fd = os.open(device, os.O_WRONLY)
    try:
        while True:
            chunk = stream.read(_CHUNK)
            if chunk:
                pending += inflate.decompress(chunk)
            else:
                pending += inflate.flush()
            while queue and pending:
                offset, length = queue[0]
                part = bytes(pending[:length])
                del pending[:length]
                os.pwrite(fd, part, offset)
                digest.update(part)
                if len(part) == length:
                    queue.pop(0)
                else:
                    queue[0] = (offset + len(part), length - len(part))
            if not chunk:
                break
        if queue or pending or not inflate.eof:
            raise SlotError("the stream ended early (cable pulled?): nothing was activated; "
                            "run the update again")
        os.fsync(fd)
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return digest.hexdigest()


def _read_back(device: str, ranges: list[list[int]]) -> str:
    digest = hashlib.sha256()
    fd = os.open(device, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        for offset, length in ranges:
            done = 0
            while done < length:
                data = os.pread(fd, min(_CHUNK, length - done), offset + done)
                if not data:
                    raise SlotError(f"{device} ends before byte {offset + length}")
                digest.update(data)
                done += len(data)
    finally:
        os.close(fd)
    return digest.hexdigest()


def activate(req: contract.ActivateSlot) -> contract.Activated:
    """Write the slot's extlinux.conf (when given), then mark it bootable."""
    with _locked():
        disk, running = running_partition()
        if req.slot not in (1, 2):
            raise SlotError(f"there is no system slot {req.slot}")
        if req.slot != running and not load_record().get(str(req.slot), {}).get("complete"):
            raise SlotError(f"slot {req.slot} holds no complete system: write it first (./do update)")
        device, _ = partition_device(disk, req.slot)
        if req.extlinux is not None:
            _write_extlinux(device, req.extlinux)
        else:
            _check_bootable_system(device)
        previous = set_bootable(f"/dev/{disk}", req.slot)
        os.sync()
    return contract.Activated(req.slot, previous)


@contextlib.contextmanager
def _mounted(device: str, read_only: bool) -> Iterator[Path]:
    where = Path(tempfile.mkdtemp(prefix="clef-armory-slot-", dir="/run"))
    options = "ro,nodev,nosuid,noexec" if read_only else "nodev,nosuid,noexec"
    result = subprocess.run(["mount", "-t", "ext4", "-o", options, device, str(where)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        where.rmdir()
        raise SlotError(f"cannot mount {device}: {result.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], capture_output=True, check=False)
        with contextlib.suppress(OSError):
            where.rmdir()


def _write_extlinux(device: str, text: str) -> None:
    with _mounted(device, read_only=False) as root:
        path = root / EXTLINUX
        if not path.is_file():
            raise SlotError(f"{device} holds no /{EXTLINUX}: not a clef-armory system")
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".extlinux-")
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        os.sync()


def _check_bootable_system(device: str) -> None:
    with _mounted(device, read_only=True) as root:
        if not (root / EXTLINUX).is_file():
            raise SlotError(f"{device} holds no /{EXTLINUX}: it would not boot")


def reboot(delay: float = 2.0) -> contract.Rebooting:
    """Reboot shortly after the answer has gone out."""
    os.sync()
    subprocess.Popen(["sh", "-c", f"sleep {delay}; systemctl reboot"], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return contract.Rebooting(delay)
