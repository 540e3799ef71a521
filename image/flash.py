"""Write a disk image to a card (or the Mk II's eMMC) quickly, verifiably, and only where meant.

Order of events, and why:

1. the target is inspected and refused unless it is clearly a spare card (image.blockdev);
2. it is opened with O_EXCL, so a mount or another program that appears meanwhile stops us;
3. its first MiB (partition table, bootloader) is blanked before anything else, and the
   image's own first MiB is written last: a write that is interrupted at any point
   leaves a card that does not boot, instead of one that half-boots. The rest of the
   boot area (up to the first partition: the Mk II U-Boot env is at 1 MiB) and the
   disk's last MiB (a stale backup GPT) are blanked too;
4. only the blocks the bmap marks as used are written, straight from a raw image or a
   .zst/.xz stream, and each range is checked against the bmap's checksum as it passes;
5. every written range is read back (bypassing the page cache) and compared again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import lzma
import mmap
import os
import queue
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, TextIO

import zstandard

from clef_armory.config import Settings
from clef_armory.errors import FlashError
from image import blockdev
from image import bmap as bmaplib
from image.bmap import Bmap, human_size

HEAD_BYTES = 1 << 20  # partition table + i.MX bootloader (from 1 KiB): written last
CHUNK_BYTES = 4 << 20
IMAGE_SUFFIXES = (".img", ".img.zst", ".img.xz")
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_XZ_MAGIC = b"\xfd7zXZ\x00"
SDP_USB_ID = ("15a2", "0080")  # i.MX6ULL/ULZ boot ROM in USB serial download mode

Progress = Callable[[int], None]


class FlashInterrupted(FlashError):
    """Ctrl-C during a write: the target is left deliberately unbootable."""


@dataclasses.dataclass(frozen=True)
class WriteStats:
    bytes_written: int
    seconds: float


@dataclasses.dataclass(frozen=True)
class VerifyStats:
    bytes_read: int
    seconds: float


@dataclasses.dataclass(frozen=True)
class FlashRequest:
    """What the user asked for; mirrors the task flags."""

    device: str = ""
    image: Path | None = None
    bmap: Path | None = None
    to_file: Path | None = None
    yes: bool = False
    verify: bool = True
    eject: bool = True
    force: bool = False
    # Rewrite only the boot area and the system slots (p1, p2): the data partition (p3: keys, host
    # keys, audit log) is left as it is. For recovering a device whose system does not boot.
    system_only: bool = False


@dataclasses.dataclass(frozen=True)
class FlashResult:
    target: Path
    image: Path
    write: WriteStats
    verify: VerifyStats | None
    eject_note: str


# ---------------------------------------------------------------- progress


class ProgressBar:
    """One status line with percentage, throughput and ETA; plain lines when not a TTY."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label, self.total = label, max(total, 1)
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.start = time.monotonic()
        self._last_draw = 0.0
        self._last_decile = -1

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        decile = min(done * 10 // self.total, 10)
        if self.tty and now - self._last_draw >= 0.2:
            self._last_draw = now
            self.stream.write("\r" + self.line(done, now) + "\033[K")
            self.stream.flush()
        elif not self.tty and decile > self._last_decile:
            self._last_decile = decile
            self.stream.write(self.line(done, now) + "\n")
            self.stream.flush()

    def line(self, done: int, now: float) -> str:
        elapsed = max(now - self.start, 1e-6)
        rate = done / elapsed
        pct = 100.0 * done / self.total
        eta = (self.total - done) / rate if rate > 0 else 0.0
        bar = "#" * int(pct / 5)
        return (f"{self.label:<9} [{bar:<20}] {pct:5.1f}%  {human_size(done)} of "
                f"{human_size(self.total)}  {human_size(int(rate))}/s  ETA {int(eta) // 60}:"
                f"{int(eta) % 60:02d}")

    def finish(self, done: int) -> None:
        if self.tty:
            self.stream.write("\r" + self.line(done, time.monotonic()) + "\033[K\n")
        elif self._last_decile < 10:
            self.stream.write(self.line(done, time.monotonic()) + "\n")
        self.stream.flush()


# ---------------------------------------------------------------- image side


def find_image(settings: Settings, image: Path | None) -> Path:
    """The given image, or the newest one built for the board in build/<board>/."""
    if image is not None:
        if not image.is_file():
            raise FlashError(f"image {image} does not exist or is not a file")
        return image
    folder = settings.output_dir / settings.board
    found = [p for p in folder.glob("*") if p.is_file() and p.name.endswith(IMAGE_SUFFIXES)]
    if not found:
        raise FlashError(f"no image in {folder}/: run `invoke build-image` or pass --image")
    newest = _raw_name(max(found, key=lambda p: p.stat().st_mtime))
    # of one build, the raw .img: its holes are skipped, not decompressed
    same = [p for p in found if _raw_name(p) == newest]
    return min(same, key=lambda p: len(p.name))


def _raw_name(image: Path) -> str:
    for suffix in (".zst", ".xz"):
        if image.name.endswith(suffix):
            return image.name[: -len(suffix)]
    return image.name


def find_bmap(image: Path, bmap: Path | None) -> Path | None:
    """The bmap next to the image: NAME.img.bmap, NAME.bmap or NAME.img.zst.bmap."""
    if bmap is not None:
        if not bmap.is_file():
            raise FlashError(f"bmap {bmap} does not exist")
        return bmap
    raw = _raw_name(image)
    for name in (raw + ".bmap", raw.removesuffix(".img") + ".bmap", image.name + ".bmap"):
        if (image.parent / name).is_file():
            return image.parent / name
    return None


def compression_of(image: Path) -> str:
    """'zst', 'xz' or '' from the file's magic bytes (the suffix can lie)."""
    with image.open("rb") as f:
        magic = f.read(6)
    if magic.startswith(_ZSTD_MAGIC):
        return "zst"
    if magic.startswith(_XZ_MAGIC):
        return "xz"
    return ""


@contextlib.contextmanager
def open_image(image: Path) -> Iterator[BinaryIO]:
    """The image's raw bytes as a stream, decompressing .zst/.xz on the fly."""
    kind = compression_of(image)
    with image.open("rb") as raw:
        if kind == "zst":
            with zstandard.ZstdDecompressor().stream_reader(raw, read_size=1 << 20) as z:
                yield z
        elif kind == "xz":
            with lzma.open(raw) as x:
                yield x  # type: ignore[misc]
        else:
            yield raw


class _SequentialSource:
    """Reads the image strictly forward, skipping holes by reading past them in a stream."""

    def __init__(self, stream: BinaryIO, seekable: bool) -> None:
        self.stream, self.seekable, self.pos = stream, seekable, 0

    def read_at(self, offset: int, length: int) -> bytes:
        if offset < self.pos:
            raise FlashError("bmap ranges are not in ascending order")
        if offset > self.pos:
            if self.seekable:
                self.stream.seek(offset)
                self.pos = offset
            while self.pos < offset:
                skipped = self.stream.read(min(CHUNK_BYTES, offset - self.pos))
                if not skipped:
                    raise FlashError(f"image ended at byte {self.pos}, before the bmap says it "
                                     "does: truncated download?")
                self.pos += len(skipped)
        parts, want = [], length
        while want:
            data = self.stream.read(want)
            if not data:
                raise FlashError(f"image ended at byte {self.pos}, before the bmap says it does: "
                                 "truncated download?")
            parts.append(data)
            want -= len(data)
            self.pos += len(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)


# ---------------------------------------------------------------- target side


def _round_up(n: int, align: int) -> int:
    return -(-n // align) * align


_SFR_WAIT_BEFORE, _SFR_WRITE, _SFR_WAIT_AFTER = 1, 2, 4


def _load_sync_file_range() -> Callable[[int, int, int, int], None] | None:
    """libc's sync_file_range(2), which os does not offer; None where it is missing."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        func = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]

    def call(fd: int, offset: int, nbytes: int, flags: int) -> None:
        if func(fd, offset, nbytes, flags) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    return call


_sync_file_range = _load_sync_file_range()


class _Writer:
    """pwrite() to the target from a worker thread, so reading, decompressing and hashing the
    image overlap with the device's write latency.

    Writes go through the page cache (the kernel merges neighbouring small ranges into large
    requests, which measured faster than O_DIRECT here). Every 64 MiB, writeback of that
    window is started and the previous window waited for (sync_file_range), so progress
    shown is at most two windows ahead of the device; sync() makes it all durable.
    """

    _QUEUE_DEPTH = 4
    _SYNC_EVERY = 64 << 20

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.written = 0
        self._since_sync = 0
        self._window_start: int | None = None
        self._window_end = 0
        self._previous: tuple[int, int] | None = None
        self._queue: queue.Queue[tuple[int, bytes] | None] = queue.Queue(self._QUEUE_DEPTH)
        self._error: OSError | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="flash-writer", daemon=True)
        self._thread.start()

    def write(self, offset: int, data: bytes) -> None:
        """Queue ``data`` for ``offset``; a failure of an earlier write is raised here."""
        self._raise_pending()
        self._queue.put((offset, data))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                if self._error is None and not self._stop:
                    self._pwrite(*item)
            except OSError as e:
                self._error = e
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def _pwrite(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)
        self.written += len(data)
        self._since_sync += len(data)
        if self._window_start is None:
            self._window_start = offset
        self._window_end = offset + len(data)
        if self._since_sync >= self._SYNC_EVERY:
            if _sync_file_range is not None:
                self._flush_window(_sync_file_range)
            else:
                os.fdatasync(self.fd)
            self._since_sync = 0

    def _flush_window(self, sync_range: Callable[[int, int, int, int], None]) -> None:
        """Start writeback of this window and wait only for the one before it, so the device
        is never idle while we fill the cache, and never more than two windows are dirty."""
        start = self._window_start if self._window_start is not None else 0
        end = self._window_end
        sync_range(self.fd, start, end - start, _SFR_WRITE)
        if self._previous is not None:
            p0, p1 = self._previous
            sync_range(self.fd, p0, p1 - p0, _SFR_WAIT_BEFORE | _SFR_WRITE | _SFR_WAIT_AFTER)
        self._previous = (start, end)
        self._window_start = None

    def _raise_pending(self) -> None:
        if self._error is not None:
            raise self._error

    def sync(self) -> None:
        """Wait for every queued write, then flush it all to the device."""
        self._queue.join()
        self._raise_pending()
        os.fsync(self.fd)
        self._since_sync = 0

    def close(self) -> None:
        self._stop = True  # after an error or Ctrl-C, drop what is still queued
        self._queue.put(None)
        self._thread.join()


@contextlib.contextmanager
def open_target(target: Path, is_device: bool) -> Iterator[_Writer]:
    """An exclusive writer on ``target``: O_EXCL on a disk, O_NOFOLLOW on a file."""
    flags = os.O_WRONLY | os.O_CLOEXEC
    if is_device:
        expected = target.stat().st_rdev
        try:
            fd = os.open(target, flags | os.O_EXCL)
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise FlashError(f"{target} is busy (mounted or held by another program); "
                                 "nothing was written") from None
            raise FlashError(f"cannot open {target}: {e.strerror}") from None
        st = os.fstat(fd)
        if not stat.S_ISBLK(st.st_mode) or st.st_rdev != expected:
            os.close(fd)
            raise FlashError(f"{target} changed while it was being checked; nothing was written")
    else:
        try:
            fd = os.open(target, flags | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise FlashError(f"cannot open {target}: {e.strerror}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise FlashError(f"{target} is not a regular file")
    writer = _Writer(fd)
    try:
        yield writer
    finally:
        writer.close()
        os.close(fd)


def boot_area_end(head: bytes) -> int:
    """Where the first partition starts, from the image's MBR (1 MiB if unknown, at most 16 MiB)."""
    if len(head) < 512 or head[510:512] != b"\x55\xaa":
        return HEAD_BYTES
    starts = []
    for i in range(4):
        entry = head[446 + 16 * i: 446 + 16 * (i + 1)]
        kind, lba = entry[4], int.from_bytes(entry[8:12], "little")
        if kind == 0xEE:  # GPT: partitions are found elsewhere; stay with the first MiB
            return HEAD_BYTES
        if kind and lba:
            starts.append(lba * 512)
    return max(HEAD_BYTES, min(min(starts, default=HEAD_BYTES), 16 << 20))


def _device_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


def write_image(image: Path, bmap: Bmap, target: Path, *, is_device: bool = True,
                progress: Progress | None = None, keep_from: int | None = None,
                blank: tuple[tuple[int, int], ...] = ()) -> WriteStats:
    """Write the bmap's ranges of ``image`` to ``target``; the first MiB goes last.

    ``keep_from``: nothing from this byte on is touched (--system-only: the data partition);
    ``blank``: (start, end) spans zeroed before the first MiB goes in.

    The image's data is checked against the bmap's checksums on the way through, so a
    corrupt download stops the write before the (still blank) first MiB is written.
    """
    started = time.monotonic()
    head_len = min(HEAD_BYTES, bmap.image_size)
    report = progress or (lambda _done: None)
    try:
        with open_target(target, is_device) as out, open_image(image) as stream:
            source = _SequentialSource(stream, seekable=compression_of(image) == "")
            head = source.read_at(0, head_len)
            if is_device:
                out.write(0, bytes(head_len))
                # the rest of the boot area too (the Mk II's U-Boot env lives at 1 MiB): holes
                # in the image must not leave a previous card's environment behind
                boot_end = min(boot_area_end(head), bmap.image_size)
                for pos in range(head_len, boot_end, CHUNK_BYTES):
                    out.write(pos, bytes(min(CHUNK_BYTES, boot_end - pos)))
                dev_size = _device_size(out.fd)
                tail = max(dev_size - HEAD_BYTES, _round_up(bmap.image_size, HEAD_BYTES))
                if tail < dev_size and keep_from is None:  # a stale backup GPT could still "boot"
                    out.write(tail, bytes(dev_size - tail))
            else:
                if keep_from is None:
                    os.ftruncate(out.fd, 0)
                os.ftruncate(out.fd, max(bmap.image_size, os.fstat(out.fd).st_size))
            out.sync()
            done = 0
            for r in bmap.ranges:
                start, end = r.byte_span(bmap.block_size, bmap.image_size)
                digest = hashlib.new(bmap.checksum_type)
                if start < head_len:
                    digest.update(head[start:min(end, head_len)])
                    done += min(end, head_len) - start
                pos = max(start, head_len)
                while pos < end:
                    data = source.read_at(pos, min(CHUNK_BYTES, end - pos))
                    digest.update(data)
                    out.write(pos, data)
                    pos += len(data)
                    done += len(data)
                    report(done)
                if r.checksum and digest.hexdigest() != r.checksum:
                    raise FlashError(f"the image does not match its bmap at {r.label()} "
                                     f"(corrupt image or wrong bmap); {target} is not bootable")
            for start, end in blank:
                for pos in range(start, end, CHUNK_BYTES):
                    out.write(pos, bytes(min(CHUNK_BYTES, end - pos)))
            out.sync()
            out.write(0, head)
            out.sync()
            report(done)
            written = out.written
    except KeyboardInterrupt:
        raise FlashInterrupted(f"interrupted: {target} is NOT bootable (its first MiB is blank);"
                               " flash it again") from None
    except OSError as e:
        raise FlashError(f"writing {target} failed: {e.strerror}; it is not bootable") from None
    return WriteStats(written, time.monotonic() - started)


def verify_target(target: Path, bmap: Bmap, progress: Progress | None = None) -> VerifyStats:
    """Read every mapped range back from ``target`` and compare it with the bmap's checksum."""
    started = time.monotonic()
    report = progress or (lambda _done: None)
    align = 4096 if bmap.block_size % 4096 == 0 else 512
    try:
        fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
        direct = True
    except OSError:
        try:
            fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise FlashError(f"cannot open {target} to verify it: {e.strerror}") from None
        direct = False
    buf = mmap.mmap(-1, CHUNK_BYTES + align)
    view = memoryview(buf)
    done = 0
    try:
        if not direct:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # read the medium, not the cache
        for r in bmap.ranges:
            if not r.checksum:
                continue
            start, end = r.byte_span(bmap.block_size, bmap.image_size)
            digest = hashlib.new(bmap.checksum_type)
            pos = start
            while pos < end:
                want = min(CHUNK_BYTES, end - pos)
                if direct:
                    got = os.preadv(fd, [view[:_round_up(want, align)]], pos)
                    data = view[:min(got, want)]
                else:
                    data = memoryview(os.pread(fd, want, pos))
                if not len(data):
                    raise FlashError(f"verification failed: {target} ends at byte {pos}, inside "
                                     f"{r.label()}")
                digest.update(data)
                pos += len(data)
                done += len(data)
                report(done)
            if digest.hexdigest() != r.checksum:
                raise FlashError(f"verification failed: {r.label()} (bytes {start}-{end - 1}) on "
                                 f"{target} differ from the image; the card may be faulty")
    except KeyboardInterrupt:
        raise FlashInterrupted(f"interrupted while verifying {target}; it was not verified") from None
    except OSError as e:
        raise FlashError(f"reading {target} back failed: {e.strerror}") from None
    finally:
        data = view = memoryview(b"")  # drop every view of buf so it can be closed
        buf.close()
        os.close(fd)
    return VerifyStats(done, time.monotonic() - started)


def _mbr_entries(head: bytes, what: str) -> list[tuple[int, int]]:
    if len(head) < 512 or head[510:512] != b"\x55\xaa":
        raise FlashError(f"{what} has no MBR partition table")
    return [(int.from_bytes(head[454 + 16 * i:458 + 16 * i], "little") * 512,
             int.from_bytes(head[458 + 16 * i:462 + 16 * i], "little") * 512) for i in range(4)]


def system_only_plan(image: Path, bmap: Bmap, target: Path) -> tuple[Bmap, int, tuple[tuple[int, int], ...]]:
    """What --system-only writes: the image's ranges before its data partition (p3), which must be
    where the target's is; slot B's first MiB is blanked (its system belongs to the old table).
    Returns (the clipped bmap, the data partition's first byte, the spans to blank)."""
    with open_image(image) as stream:
        mine = _mbr_entries(stream.read(512), str(image))
    try:
        with target.open("rb") as f:
            theirs = _mbr_entries(f.read(512), str(target))
    except FlashError:
        raise FlashError(f"{target} has no partition table: flash the whole image (without "
                         "--system-only; that erases the data partition)") from None
    except OSError as e:
        raise FlashError(f"cannot read {target}'s partition table: {e.strerror}") from None
    data_start, data_size = mine[2]
    if not data_size:
        raise FlashError(f"{image} has no data partition (p3): it is not an A/B image")
    if theirs[2] != mine[2]:
        raise FlashError(f"{target}'s data partition is not where this image has it (p3 at byte "
                         f"{data_start}, {data_size} bytes): --system-only would lose it; flash the whole "
                         "image instead, which erases the keys")
    ranges = []
    for r in bmap.ranges:
        start, end = r.byte_span(bmap.block_size, bmap.image_size)
        if end <= data_start:
            ranges.append(r)
        elif start < data_start:  # a range across the boundary: its checksum covers bytes we skip
            ranges.append(bmaplib.Range(r.first, data_start // bmap.block_size - 1, None))
    clipped = dataclasses.replace(bmap, ranges=tuple(ranges))
    slot_b = mine[1][0]
    return clipped, data_start, ((slot_b, slot_b + HEAD_BYTES),) if mine[1][1] else ()


def blank_head(target: Path, is_device: bool = True) -> None:
    """Zero the first MiB so a card that failed verification cannot boot."""
    with open_target(target, is_device) as out:
        out.write(0, bytes(HEAD_BYTES))
        out.sync()


def eject(dev: blockdev.BlockDevice) -> str:
    """Flush and, for USB, power the device off; returns what the user should do next."""
    if dev.transport == "usb":
        if shutil.which("udisksctl"):
            run = subprocess.run(["udisksctl", "power-off", "-b", str(dev.path)],
                                 capture_output=True, text=True, timeout=60, check=False)
            if run.returncode == 0:
                return f"{dev.path} was powered off; you can unplug it"
        delete = blockdev.SYS_BLOCK / dev.name / "device" / "delete"
        with contextlib.suppress(OSError):
            delete.write_text("1")
            return f"{dev.path} was detached; you can unplug it"
    if dev.transport in ("usb", "mmc"):
        return f"all data is on {dev.path}; you can remove it"
    return f"{dev.path} is not removable; nothing to eject"


# ---------------------------------------------------------------- Mk II eMMC


def _sdp_present() -> bool:
    for d in Path("/sys/bus/usb/devices").glob("*"):
        ids = ((d / "idVendor"), (d / "idProduct"))
        with contextlib.suppress(OSError):
            if tuple(p.read_text().strip() for p in ids) == SDP_USB_ID:
                return True
    return False


# armory-boot-usb, built with Go from a pinned module version (Go checks it against go.sum and the
# checksum database). Its newest tag, v2026.02.02, is not a semantic version, so Go names that commit
# (55996d854eee, 2026-02-02 12:05:19 UTC) by this pseudo-version.
ARMORY_BOOT_MODULE = "github.com/usbarmory/armory-boot"
ARMORY_BOOT_VERSION = "v0.0.0-20260202120519-55996d854eee"
# armory-ums.imx is a release binary (no digest has been verified by this project).
ARMORY_UMS_RELEASE = "https://github.com/usbarmory/armory-ums/releases/tag/v20231018"


def armory_boot_usb(cache_dir: Path, log: Callable[[str], None] = print) -> Path:
    """The pinned armory-boot-usb, built once with Go (cgo: it talks to hidraw) and cached."""
    from clef_armory import clef
    from clef_armory.errors import PrerequisiteError

    try:
        go = clef.go_binary()
        gover = clef.go_version(go)
    except PrerequisiteError as e:
        raise FlashError(f"cannot build armory-boot-usb: {e}") from None
    cached = cache_dir / "tools" / f"armory-boot-usb-{ARMORY_BOOT_VERSION}-{gover}" / "armory-boot-usb"
    if cached.is_file():
        return cached
    log(f"building armory-boot-usb {ARMORY_BOOT_VERSION} with {gover}")
    with tempfile.TemporaryDirectory(prefix="armory-boot-usb-") as tmp:
        env = {**clef.go_env(cache_dir, Path(tmp)), "CGO_ENABLED": "1"}
        argv = [str(go), "install", "-trimpath", "-buildvcs=false",
                f"{ARMORY_BOOT_MODULE}/cmd/armory-boot-usb@{ARMORY_BOOT_VERSION}"]
        run = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        built = Path(tmp) / "bin" / "armory-boot-usb"
        if run.returncode != 0 or not built.is_file():
            last = run.stderr.strip().splitlines()[-1:] or ["no output"]
            raise FlashError(f"building armory-boot-usb failed: {last[0]} (needs Go >= 1.21, gcc and "
                             "the Go module proxy; or install imx_usb)")
        cached.parent.mkdir(parents=True, exist_ok=True)
        part = cached.with_name(f".{cached.name}.tmp-{os.getpid()}")
        shutil.copyfile(built, part)
        part.chmod(0o755)
        os.replace(part, cached)
    return cached


def _installed_loader(ums_image: Path) -> list[str] | None:
    if shutil.which("armory-boot-usb"):
        return ["armory-boot-usb", "-i", str(ums_image)]
    if shutil.which("imx_usb"):
        return ["imx_usb", str(ums_image)]
    return None


def emmc_tools(settings: Settings, ums_image: Path | None,
               say: Callable[[str], None] = print) -> tuple[list[str], Path]:
    """The USB loader's command line and armory-ums.imx, or one error naming every missing piece."""
    from clef_armory import clef
    from clef_armory.errors import PrerequisiteError

    image = ums_image or settings.cache_path / "armory-ums" / "armory-ums.imx"
    loader = _installed_loader(image)
    missing = []
    if not image.is_file():
        missing.append(f"armory-ums.imx at {image} (download armory-ums.imx from {ARMORY_UMS_RELEASE}, "
                       "github.com/usbarmory/armory-ums/releases, and put it there or pass --ums-image)")
    if loader is None:
        try:
            clef.go_binary()
        except PrerequisiteError:
            missing.append("a USB loader: armory-boot-usb (built here with Go >= 1.21: run ./do to "
                           "install Go) or imx_usb (github.com/boundarydevices/imx_usb_loader)")
    if missing:
        raise FlashError(f"--emmc needs {'; and '.join(missing)}")
    if loader is None:
        loader = [str(armory_boot_usb(settings.cache_path, say)), "-i", str(image)]
    return loader, image


def expose_emmc(settings: Settings, ums_image: Path | None, say: Callable[[str], None],
                timeout: float = 180.0) -> str:
    """Guide the user into USB boot mode, load armory-ums, return the eMMC's /dev path."""
    loader, image = emmc_tools(settings, ums_image, say)
    say("To expose the Mk II's eMMC over USB:\n"
        "  1. unplug the USB armory and take out its microSD card;\n"
        "  2. slide the boot switch toward the microSD slot;\n"
        "  3. plug it in (it starts in USB download mode, 15a2:0080).")
    deadline = time.monotonic() + timeout
    while not _sdp_present():
        if time.monotonic() > deadline:
            raise FlashError("no USB armory in USB download mode appeared (15a2:0080); "
                             "check the boot switch and that no microSD card is inserted")
        time.sleep(1)
    before = set(blockdev.whole_disks())
    say(f"loading {image.name} with {loader[0]}")
    run = subprocess.run(loader, capture_output=True, text=True, timeout=120, check=False)
    if run.returncode != 0:
        last = (run.stderr or run.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FlashError(f"{loader[0]} failed: {last[0]}")
    while True:
        new = [n for n in blockdev.whole_disks()
               if n not in before and blockdev.transport_of(n) == "usb"]
        if len(new) == 1:
            return f"/dev/{new[0]}"
        if len(new) > 1:
            raise FlashError(f"several new USB disks appeared ({', '.join(new)}); "
                             "pass the eMMC's one with --device")
        if time.monotonic() > deadline:
            raise FlashError("the eMMC did not appear as a USB disk; unplug, replug and retry")
        time.sleep(1)


# ---------------------------------------------------------------- the whole flow


def _confirm(dev: blockdev.BlockDevice, ask: Callable[[str], str]) -> None:
    try:
        answer = ask(f"Everything on {dev.path} will be erased. Type its name ({dev.name}) "
                     "to continue: ").strip()
    except EOFError:
        answer = ""
    if answer not in (dev.name, str(dev.path)):
        raise FlashError(f"not confirmed; nothing was written to {dev.path}")


def _check_to_file(path: Path) -> None:
    resolved = Path(os.path.realpath(path))
    if resolved == Path("/dev") or Path("/dev") in resolved.parents:
        raise FlashError(f"--to-file {path} is under /dev; use --device for disks")
    if resolved.exists() and not resolved.is_file():
        raise FlashError(f"--to-file {path} exists and is not a regular file")
    if not resolved.parent.is_dir():
        raise FlashError(f"--to-file {path}: directory {resolved.parent} does not exist")


def flash(settings: Settings, request: FlashRequest, *,
          say: Callable[[str], None] = print, ask: Callable[[str], str] = input,
          stream: TextIO | None = None) -> FlashResult:
    """Check the target, confirm with the user, write, verify, eject."""
    image = find_image(settings, request.image)
    bmap_path = find_bmap(image, request.bmap)
    dev: blockdev.BlockDevice | None = None
    if request.to_file is not None:
        if request.device:
            raise FlashError("give either --device or --to-file, not both")
        _check_to_file(request.to_file)
    else:
        dev = blockdev.inspect(request.device)  # refuse a wrong path before any slow work
    with tempfile.TemporaryDirectory(prefix="clef-armory-bmap-") as tmp:
        if bmap_path is None:
            if compression_of(image):
                raise FlashError(f"no bmap next to {image}; pass --bmap or use the raw .img")
            say(f"no bmap next to {image.name}; mapping it now")
            bmap_path = Path(tmp) / "image.bmap"
            bmaplib.create(image, bmap_path)
        bmap = bmaplib.parse(bmap_path)
    if not compression_of(image) and image.stat().st_size != bmap.image_size:
        raise FlashError(f"{image} is {image.stat().st_size} bytes but its bmap says "
                         f"{bmap.image_size}: wrong bmap?")

    if dev is None:
        assert request.to_file is not None
        target = request.to_file
        if target.exists() and target.stat().st_size and not request.yes:
            answer = ask(f"{target} exists; type 'overwrite' to replace it: ").strip()
            if answer != "overwrite":
                raise FlashError(f"not confirmed; {target} was left as it was")
    else:
        dev = blockdev.inspect(request.device)  # again: the facts as of now
        blockdev.check(dev, bmap.image_size, force=request.force)
        target = dev.path
        say(f"Writing {image.name} ({human_size(bmap.mapped_bytes)} of "
            f"{human_size(bmap.image_size)} mapped) to:\n{dev.describe()}")
        if not request.yes:
            _confirm(dev, ask)
            now = blockdev.inspect(str(dev.path))
            if now.identity() != dev.identity():
                raise FlashError(f"{dev.path} changed while waiting for confirmation (card "
                                 "swapped?); nothing was written")
            blockdev.check(now, bmap.image_size, force=request.force)

    keep_from: int | None = None
    blank: tuple[tuple[int, int], ...] = ()
    if request.system_only:
        bmap, keep_from, blank = system_only_plan(image, bmap, target)
        say(f"--system-only: the boot area and system slots only; the data partition from byte "
            f"{keep_from} on is left as it is")
    bar = ProgressBar("writing", bmap.mapped_bytes, stream)
    wrote = write_image(image, bmap, target, is_device=dev is not None, progress=bar, keep_from=keep_from,
                        blank=blank)
    bar.finish(bmap.mapped_bytes)
    checked = None
    if request.verify:
        bar = ProgressBar("verifying", bmap.mapped_bytes, stream)
        try:
            checked = verify_target(target, bmap, progress=bar)
        except FlashInterrupted:
            raise
        except FlashError as e:
            blank_head(target, is_device=dev is not None)
            raise FlashError(f"{e}; its first MiB was blanked so it will not boot") from None
        bar.finish(checked.bytes_read)
    note = eject(dev) if dev is not None and request.eject else ""
    return FlashResult(target, image, wrote, checked, note)
