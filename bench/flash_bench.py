"""Benchmark: bmap flashing vs a plain full sequential write of the same image, same run.

Makes a sparse --size image, either like the real build (--layout ext4: MBR, bootloader at
1 KiB, ext4 from 5 MiB made by mke2fs -d from real directories) or as a worst case
(--layout spread: synthetic extents scattered evenly, a third random like compressed
packages, a third text, a third zero-filled but allocated). It then writes it to fresh
loop devices backed by files (direct I/O): dd-style, every byte in 4 MiB writes (buffered +
fsync, and O_DIRECT; the ratio uses the faster of the two), then with
`image.flash.write_image` (and, with --zst, from a .zst of the image), and times read-back
verification.

A file-backed loop device stands in for a real card: absolute numbers are the host
disk's, the ratios are what carries over. Needs root (losetup).

    sudo .venv/bin/python bench/flash_bench.py --size 3500M --layout ext4 --zst --workdir /work/tmp
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from clef_armory.config import parse_size
from image import bmap as bmaplib
from image import flash

MiB = 1 << 20
CHUNK = 4 * MiB
# many small files, a few big ones: roughly how a Debian root file system's extents look
_EXTENT_SIZES = (4096, 16384, 65536, 262144, MiB, 4 * MiB, 16 * MiB)
_EXTENT_WEIGHTS = (30, 25, 20, 12, 8, 4, 1)


def generate(path: Path, size: int, mapped: float, seed: int = 1) -> None:
    """A sparse image: 1 MiB head, then extents of 4 KiB..16 MiB spread over the rest."""
    rng = random.Random(seed)
    text = b"".join(f"Package: lib{n}\nVersion: 1.{n}\nDepends: libc6 (>= 2.36)\n".encode()
                    for n in range(4000))
    lengths, total = [], MiB
    while total < size * mapped:
        length = min(rng.choices(_EXTENT_SIZES, _EXTENT_WEIGHTS)[0], int(size * mapped) - total)
        length = max(4096, length // 4096 * 4096)
        lengths.append(length)
        total += length
    # spread the free space between extents at random, the way a used file system looks
    free = size - 2 * MiB - total
    weights = [rng.expovariate(1.0) for _ in lengths]
    scale = free / sum(weights)
    with path.open("wb") as f:
        f.truncate(size)
        f.write(rng.randbytes(MiB))
        pos = 2 * MiB
        for length, weight in zip(lengths, weights, strict=True):
            kind = rng.random()
            if kind < 1 / 3:
                data = rng.randbytes(length)
            elif kind < 2 / 3:
                data = (text * (length // len(text) + 1))[:length]
            else:
                data = bytes(length)
            f.seek(pos)
            f.write(data)
            pos += length + int(weight * scale) // 4096 * 4096


def generate_ext4(path: Path, size: int, trees: list[Path], work: Path) -> None:
    """Like our real image: MBR, a bootloader at 1 KiB, ext4 from 5 MiB made by mke2fs -d."""
    start = 5 * MiB
    staging = work / "tree"
    staging.mkdir()
    for tree in trees:  # hard links: no copy, same file system as the work dir
        subprocess.run(["cp", "-al", str(tree), str(staging / tree.name)], check=True)
    with path.open("wb") as f:
        f.truncate(size)
        f.seek(1024)
        f.write(random.Random(2).randbytes(600 * 1024))
    subprocess.run(["sfdisk", "--no-reread", "--no-tell-kernel", "--wipe=never", "-q", str(path)],
                   input=f"label: dos\nstart={start // 512}, type=83\n", text=True, check=True)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-E", f"offset={start}", "-d", str(staging),
                    str(path), f"{(size - start) // 1024}k"], check=True)
    subprocess.run(["rm", "-rf", str(staging)], check=True)


@contextmanager
def loop_device(workdir: Path, size: int) -> Iterator[Path]:
    """A fresh file-backed loop device with direct I/O, removed afterwards."""
    backing = workdir / "bench-backing.bin"
    with backing.open("wb") as f:
        f.truncate(size)
    dev = Path(subprocess.run(["losetup", "--find", "--show", "--direct-io=on", str(backing)],
                              check=True, capture_output=True, text=True).stdout.strip())
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", str(dev)], check=False)
        backing.unlink()


def full_write(image: Path, dev: Path, direct: bool) -> tuple[int, float]:
    """dd if=image of=dev bs=4M conv=fsync (and oflag=direct when ``direct``), in Python."""
    started = time.monotonic()
    buf = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT needs
    view = memoryview(buf)
    written = 0
    fd = os.open(dev, os.O_WRONLY | os.O_EXCL | (os.O_DIRECT if direct else 0))
    try:
        with image.open("rb", buffering=0) as src:
            while n := src.readinto(view):
                padded = (n + 511) // 512 * 512
                os.pwrite(fd, view[:padded], written)
                written += n
        os.fsync(fd)
    finally:
        os.close(fd)
        view.release()
        buf.close()
    return written, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="3500M", help="image size (default 3500M)")
    parser.add_argument("--layout", choices=("ext4", "spread"), default="ext4",
                        help="ext4: a real file system made with mke2fs -d from --tree dirs, like "
                        "the image build does; spread: synthetic extents scattered evenly over "
                        "the whole image (a worst case)")
    parser.add_argument("--tree", type=Path, action="append",
                        help="directory to put in the ext4 layout (repeatable; default "
                        "/usr/bin and /usr/include, about 23%% of 3.5 GB here)")
    parser.add_argument("--mapped", type=float, default=0.22,
                        help="fraction of mapped blocks for --layout spread")
    parser.add_argument("--workdir", type=Path, default=Path("/work/tmp"), help="scratch directory")
    parser.add_argument("--zst", action="store_true",
                        help="also flash from a .zst of the image (stream decompression)")
    args = parser.parse_args()
    size = parse_size(args.size)
    args.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="flash-bench-") as tmp:
        work = Path(tmp)
        image = work / "bench.img"
        t0 = time.monotonic()
        if args.layout == "ext4":
            generate_ext4(image, size, args.tree or [Path("/usr/bin"), Path("/usr/include")], work)
        else:
            generate(image, size, args.mapped)
        bmap = bmaplib.create(image, work / "bench.bmap")
        print(f"image ({args.layout}): {bmaplib.human_size(size)}, "
              f"mapped {bmaplib.human_size(bmap.mapped_bytes)} "
              f"({100 * bmap.mapped_blocks / bmap.blocks_count:.1f}% of blocks, "
              f"{len(bmap.ranges)} ranges); generated + mapped in {time.monotonic() - t0:.1f} s")
        dev_size = size + 64 * MiB

        full = {}
        for direct in (False, True):
            with loop_device(work, dev_size) as dev:
                full[direct] = full_write(image, dev, direct)
        full_bytes, full_s = min(full.values(), key=lambda r: r[1])
        with loop_device(work, dev_size) as dev:
            stats = flash.write_image(image, bmap, dev)
            verified = flash.verify_target(dev, bmap)

        zst_row = ""
        if args.zst:
            compressed = work / "bench.img.zst"
            subprocess.run(["zstd", "-q", "-T0", "-3", "-f", "-o", str(compressed), str(image)],
                           check=True)
            with loop_device(work, dev_size) as dev:
                zst = flash.write_image(compressed, bmap, dev)
            zst_row = (f"{'bmap from .zst':<24}{zst.bytes_written:>16}{zst.seconds:>10.2f}"
                       f"{zst.bytes_written / MiB / zst.seconds:>10.1f}")

        print(f"{'method':<24}{'bytes written':>16}{'seconds':>10}{'MiB/s':>10}")
        for direct, (nbytes, secs) in full.items():
            label = "full, dd oflag=direct" if direct else "full, dd conv=fsync"
            print(f"{label:<24}{nbytes:>16}{secs:>10.2f}{nbytes / MiB / secs:>10.1f}")
        print(f"{'bmap (flash)':<24}{stats.bytes_written:>16}{stats.seconds:>10.2f}"
              f"{stats.bytes_written / MiB / stats.seconds:>10.1f}")
        if zst_row:
            print(zst_row)
        print(f"{'verify (read back)':<24}{verified.bytes_read:>16}{verified.seconds:>10.2f}"
              f"{verified.bytes_read / MiB / verified.seconds:>10.1f}")
        print(f"ratio bmap/full (the faster full write): bytes {stats.bytes_written / full_bytes:.3f}, "
              f"time {stats.seconds / full_s:.3f} (target <= 0.35)")
        print("note: loop device over a file on the host disk stands in for a real card")


if __name__ == "__main__":
    main()
