"""Assemble the raw disk image without loop devices or mounts.

Layout (docs/updating.md): MBR with the bootloader at its byte offset in the gap before 5 MiB, then
p1 system slot A, p2 system slot B (same size, empty until the first update), p3 the data partition
to the end of the disk (Clef's state, the agent's audit log, the SSH host keys and authorized_keys).
The partition marked bootable is the slot U-Boot's distro boot scans first; an image starts on A.
The partition table is written by sfdisk into a sparse regular file, each filesystem by
``mke2fs -d`` straight from its tree at the partition's offset (``-E offset=``), and the bootloader
with a plain seek-and-write. Fixed UUIDs, hash seed and ``E2FSPROGS_FAKE_TIME`` make the filesystems
depend only on their inputs.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import tempfile
import uuid
from pathlib import Path

from clef_armory.errors import BuildError, PrerequisiteError
from image.boards import PARTITION_START

SECTOR = 512
BLOCK = 4096
MIB = 1 << 20
# ext4 metadata (inode tables, journal, reserved blocks) on top of the files themselves.
FS_OVERHEAD = 1.15
# The smallest data partition worth having (Clef's vault, the keystore, the audit log's rotations).
DATA_MIN = 16 * MIB
# Filesystem labels: fstab mounts the data partition by its label (the same on every device and in
# every system image, unlike a PARTUUID, which carries the disk id of the image first flashed).
SYSTEM_LABELS = ("system-a", "system-b")
DATA_LABEL = "clef-data"
SLOT_A, SLOT_B, DATA = 1, 2, 3


@dataclasses.dataclass(frozen=True)
class Partition:
    """One MBR primary partition (byte offsets)."""

    number: int
    start: int
    size: int

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclasses.dataclass(frozen=True)
class Layout:
    """The three partitions of a disk of ``disk_size`` bytes with system slots of ``slot_size``."""

    disk_size: int
    slot_size: int

    def __post_init__(self) -> None:
        if self.disk_size % SECTOR or self.slot_size % MIB:
            raise BuildError(f"image size {self.disk_size} and slot size {self.slot_size} must be "
                             "whole sectors and whole MiB")
        if self.data.size < DATA_MIN:
            need = -(-(PARTITION_START + 2 * self.slot_size + DATA_MIN) // MIB)
            raise BuildError(f"image size {self.disk_size >> 20} MiB has no room for two "
                             f"{self.slot_size >> 20} MiB system slots and the data partition: "
                             f"use --size {need}M or more")

    @property
    def slots(self) -> tuple[Partition, Partition]:
        return (Partition(SLOT_A, PARTITION_START, self.slot_size),
                Partition(SLOT_B, PARTITION_START + self.slot_size, self.slot_size))

    @property
    def data(self) -> Partition:
        start = PARTITION_START + 2 * self.slot_size
        return Partition(DATA, start, max(self.disk_size - start, 0) // MIB * MIB)

    def sfdisk_script(self, disk_id: int, bootable: int = SLOT_A) -> str:
        lines = [f"label: dos\nlabel-id: 0x{disk_id:08x}\nunit: sectors\n"]
        for p in (*self.slots, self.data):
            flag = ", bootable" if p.number == bootable else ""
            lines.append(f"start={p.start // SECTOR}, size={p.size // SECTOR}, type=83{flag}")
        return "\n".join(lines) + "\n"


def journal_bytes(fs_bytes: int) -> int:
    """mke2fs's default journal size for a filesystem of this size (ext2fs_default_journal_size)."""
    blocks = fs_bytes // BLOCK
    if blocks < 32768:
        return 1024 * BLOCK
    if blocks < 256 * 1024:
        return 4096 * BLOCK
    if blocks < 512 * 1024:
        return 8192 * BLOCK
    if blocks < 4096 * 1024:
        return 16384 * BLOCK
    return 32768 * BLOCK


def tree_bytes(tree: Path) -> int:
    """Bytes the tree's files need on ext4 (each file rounded up to whole blocks)."""
    total = 0
    for root, dirs, files in os.walk(tree):
        total += BLOCK * (len(dirs) + 1)
        for name in files:
            try:
                size = os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
            total += -(-size // BLOCK) * BLOCK
    return total


def fix_times(image: Path, tree: Path, epoch: int, offset: int = PARTITION_START) -> None:
    """Set every inode's atime and ctime to `epoch` with debugfs (no mount).

    mke2fs 1.47.0 copies atime and ctime from the source tree: ctime is always "now" and cannot be
    set from userspace, and reading a file for the copy moves its atime. mtimes are already clamped
    in the tree. (e2fsprogs >= 1.47.1 clamps these itself.)
    """
    paths = ["/", "/lost+found"]
    for root, dirs, files in os.walk(tree):
        rel = os.path.relpath(root, tree)
        base = "/" if rel == "." else f"/{rel}/"
        paths.extend(base + name for name in [*dirs, *files])
    commands = []
    for path in paths:
        if '"' in path or "\n" in path:
            raise BuildError(f"cannot handle the file name {path!r} in the image")
        commands.append(f'sif "{path}" ctime @{epoch}\nsif "{path}" atime @{epoch}\n')
    with tempfile.NamedTemporaryFile("w", suffix=".debugfs") as script:
        script.write("".join(commands))
        script.flush()
        # The fake time also keeps debugfs from stamping "now" into the superblock's write time.
        env = dict(os.environ, E2FSPROGS_FAKE_TIME=str(epoch))
        result = subprocess.run(["debugfs", "-w", "-f", script.name, f"{image}?offset={offset}"],
                                capture_output=True, text=True, env=env, check=False)
    problems = [line for line in result.stderr.splitlines()
                if line.strip() and not line.startswith("debugfs ")]
    if result.returncode != 0 or problems:
        raise BuildError(f"setting timestamps with debugfs failed: {(problems or ['?'])[0]}")


def check_size(tree: Path, slot_size: int) -> None:
    """Refuse, before writing anything, a system slot too small for the rootfs."""
    needed = int(tree_bytes(tree) * FS_OVERHEAD) + journal_bytes(slot_size)
    if slot_size < needed:
        raise BuildError(
            f"a system slot of {slot_size >> 20} MiB is too small for the root filesystem: "
            f"it needs at least {-(-needed // MIB)} MiB"
        )


def check_bootloader(path: Path, offset: int, limit: int) -> int:
    """The bootloader must fit between its offset and the board's limit; returns its size."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise BuildError(f"cannot read bootloader {path}: {e.strerror}") from None
    if size == 0:
        raise BuildError(f"bootloader {path} is empty")
    if offset + size > limit:
        raise BuildError(
            f"bootloader {path} is {size} bytes: it must end before byte {limit} "
            f"(at most {limit - offset} bytes at offset {offset})"
        )
    return size


def disk_identity(seed: str) -> tuple[int, uuid.UUID, uuid.UUID]:
    """MBR disk id, filesystem UUID and ext4 hash seed, all derived from `seed` (reproducible)."""
    fs_uuid = uuid.uuid5(uuid.NAMESPACE_URL, f"clef-armory:fs:{seed}")
    hash_seed = uuid.uuid5(uuid.NAMESPACE_URL, f"clef-armory:hash:{seed}")
    disk_id = int(uuid.uuid5(uuid.NAMESPACE_URL, f"clef-armory:mbr:{seed}").hex[:8], 16) or 1
    return disk_id, fs_uuid, hash_seed


def partuuid(disk_id: int, number: int = SLOT_A) -> str:
    """The kernel's PARTUUID of a partition on an MBR disk: <disk id>-<number, 2 hex digits>."""
    return f"{disk_id:08x}-{number:02x}"


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None, stdin: str | None = None) -> None:
    try:
        result = subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=env, check=False)
    except FileNotFoundError:
        raise PrerequisiteError(f"{cmd[0]} is not installed (needed to {what})") from None
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        last = detail[-1] if detail else f"exit {result.returncode}"
        raise BuildError(f"{what} failed: {last}")


def _mkfs(image: Path, tree: Path, part: Partition, *, label: str, seed: str, epoch: int) -> None:
    """An ext4 filesystem made from ``tree`` into ``part`` of ``image`` (reproducible, no mount)."""
    _, fs_uuid, hash_seed = disk_identity(f"{seed}:{label}")
    env = dict(os.environ, E2FSPROGS_FAKE_TIME=str(epoch), SOURCE_DATE_EPOCH=str(epoch), LC_ALL="C")
    _run(
        [
            "mke2fs", "-q", "-F", "-t", "ext4", "-L", label, "-U", str(fs_uuid),
            "-b", str(BLOCK), "-m", "1",
            "-E", f"offset={part.start},hash_seed={hash_seed},root_owner=0:0",
            "-d", str(tree), str(image), f"{part.size // 1024}k",
        ],
        f"making the ext4 filesystem {label} (mke2fs -d)",
        env=env,
    )
    fix_times(image, tree, epoch, part.start)


def assemble(
    image: Path,
    tree: Path,
    size: int,
    *,
    seed: str,
    epoch: int,
    slot_size: int,
    data_tree: Path,
    bootloader: Path | None = None,
    bootloader_offset: int = 0,
    bootloader_limit: int = PARTITION_START,
) -> int:
    """Write the whole disk into `image` (created or truncated): the system from ``tree`` in slot A
    (bootable), slot B empty, the data partition from ``data_tree``; returns the MBR disk id."""
    layout = Layout(size, slot_size)
    check_size(tree, slot_size)
    if bootloader is not None:
        check_bootloader(bootloader, bootloader_offset, bootloader_limit)
    disk_id, _, _ = disk_identity(seed)
    with image.open("wb") as f:
        f.truncate(size)
    _run(["sfdisk", "--no-reread", "--no-tell-kernel", "--wipe=never", "--quiet", str(image)],
         "writing the partition table", stdin=layout.sfdisk_script(disk_id))
    _mkfs(image, tree, layout.slots[0], label=SYSTEM_LABELS[0], seed=seed, epoch=epoch)
    _mkfs(image, data_tree, layout.data, label=DATA_LABEL, seed=seed, epoch=epoch)
    if image.stat().st_size != size:
        raise BuildError(f"mke2fs changed the image size of {image}")
    if bootloader is not None:
        with image.open("r+b") as f:
            f.seek(bootloader_offset)
            f.write(bootloader.read_bytes())
    return disk_id


def read_partition(image: Path, number: int = SLOT_A) -> tuple[int, int, int]:
    """(start byte, size in bytes, type) of an MBR primary partition, read with plain Python."""
    return read_table(image)[number - 1][:3]


def read_table(image: Path) -> list[tuple[int, int, int, bool]]:
    """The four MBR entries: (start byte, size in bytes, type, bootable)."""
    with image.open("rb") as f:
        mbr = f.read(SECTOR)
    if mbr[510:512] != b"\x55\xaa":
        raise BuildError(f"{image} has no MBR signature")
    table = []
    for i in range(4):
        entry = mbr[446 + 16 * i: 462 + 16 * i]
        table.append((int.from_bytes(entry[8:12], "little") * SECTOR,
                      int.from_bytes(entry[12:16], "little") * SECTOR, entry[4], entry[0] == 0x80))
    return table
