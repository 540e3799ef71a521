"""Assemble the raw disk image without loop devices or mounts.

Layout (the vendor's): MBR, one ext4 partition from 5 MiB to the end, the bootloader at its byte
offset in the gap before the partition. The partition table is written by sfdisk into a sparse
regular file, the filesystem by ``mke2fs -d`` straight from the rootfs tree at the partition's
offset (``-E offset=``), and the bootloader with a plain seek-and-write. Fixed UUIDs, hash seed and
``E2FSPROGS_FAKE_TIME`` make the filesystem depend only on its inputs.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import uuid
from pathlib import Path

from clef_armory.errors import BuildError, PrerequisiteError
from image.boards import PARTITION_START

SECTOR = 512
BLOCK = 4096
# ext4 metadata (inode tables, journal, reserved blocks) on top of the files themselves.
FS_OVERHEAD = 1.15


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


def fix_times(image: Path, tree: Path, epoch: int) -> None:
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
        result = subprocess.run(["debugfs", "-w", "-f", script.name, f"{image}?offset={PARTITION_START}"],
                                capture_output=True, text=True, env=env, check=False)
    problems = [line for line in result.stderr.splitlines()
                if line.strip() and not line.startswith("debugfs ")]
    if result.returncode != 0 or problems:
        raise BuildError(f"setting timestamps with debugfs failed: {(problems or ['?'])[0]}")


def check_size(tree: Path, image_size: int) -> None:
    """Refuse, before writing anything, an image too small for the rootfs."""
    if image_size % SECTOR:
        raise BuildError(f"image size {image_size} is not a multiple of {SECTOR} bytes")
    fs_bytes = max(image_size - PARTITION_START, 0)
    needed = int(tree_bytes(tree) * FS_OVERHEAD) + journal_bytes(fs_bytes) + PARTITION_START
    if image_size < needed:
        raise BuildError(
            f"image size {image_size >> 20} MiB is too small for the root filesystem: "
            f"it needs at least {-(-needed // (1 << 20))} MiB (--size)"
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


def partuuid(disk_id: int) -> str:
    """The kernel's PARTUUID of partition 1 on an MBR disk: <disk id>-01."""
    return f"{disk_id:08x}-01"


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None, stdin: str | None = None) -> None:
    try:
        result = subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=env, check=False)
    except FileNotFoundError:
        raise PrerequisiteError(f"{cmd[0]} is not installed (needed to {what})") from None
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        last = detail[-1] if detail else f"exit {result.returncode}"
        raise BuildError(f"{what} failed: {last}")


def assemble(
    image: Path,
    tree: Path,
    size: int,
    *,
    seed: str,
    epoch: int,
    bootloader: Path | None = None,
    bootloader_offset: int = 0,
    bootloader_limit: int = PARTITION_START,
    label: str = "root",
) -> int:
    """Write the whole disk into `image` (created or truncated); returns the MBR disk id."""
    check_size(tree, size)
    if bootloader is not None:
        check_bootloader(bootloader, bootloader_offset, bootloader_limit)
    disk_id, fs_uuid, hash_seed = disk_identity(seed)
    with image.open("wb") as f:
        f.truncate(size)
    table = (
        "label: dos\n"
        f"label-id: 0x{disk_id:08x}\n"
        "unit: sectors\n\n"
        f"start={PARTITION_START // SECTOR}, type=83\n"
    )
    _run(["sfdisk", "--no-reread", "--no-tell-kernel", "--wipe=never", "--quiet", str(image)],
         "writing the partition table", stdin=table)
    fs_bytes = size - PARTITION_START
    env = dict(os.environ, E2FSPROGS_FAKE_TIME=str(epoch), SOURCE_DATE_EPOCH=str(epoch), LC_ALL="C")
    _run(
        [
            "mke2fs", "-q", "-F", "-t", "ext4", "-L", label, "-U", str(fs_uuid),
            "-b", str(BLOCK), "-m", "1",
            "-E", f"offset={PARTITION_START},hash_seed={hash_seed},root_owner=0:0",
            "-d", str(tree), str(image), f"{fs_bytes // 1024}k",
        ],
        "making the ext4 filesystem (mke2fs -d)",
        env=env,
    )
    if image.stat().st_size != size:
        raise BuildError(f"mke2fs changed the image size of {image}")
    fix_times(image, tree, epoch)
    if bootloader is not None:
        with image.open("r+b") as f:
            f.seek(bootloader_offset)
            f.write(bootloader.read_bytes())
    return disk_id


def read_partition(image: Path) -> tuple[int, int, int]:
    """(start byte, size in bytes, type) of the first MBR partition, read with plain Python."""
    with image.open("rb") as f:
        mbr = f.read(SECTOR)
    if mbr[510:512] != b"\x55\xaa":
        raise BuildError(f"{image} has no MBR signature")
    entry = mbr[446:462]
    ptype = entry[4]
    start = int.from_bytes(entry[8:12], "little") * SECTOR
    count = int.from_bytes(entry[12:16], "little") * SECTOR
    return start, count, ptype
