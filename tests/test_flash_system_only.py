"""`./do flash --system-only` on a real loop device: the system slots are rewritten, the data partition
(keys, host keys, audit log) stays byte-identical; a card without the same data partition is refused."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from clef_armory.config import Settings
from clef_armory.errors import FlashError
from image import bmap as bmaplib
from image import disk, flash
from image.inspect import Image

pytestmark = pytest.mark.integration
MiB = 1 << 20
SIZE, SLOT = 96 * MiB, 32 * MiB
EPOCH = 1_700_000_000


def _image(root: Path, version: str) -> Path:
    tree, data = root / f"tree-{version}", root / f"data-{version}"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "version").write_text(version + "\n")
    (tree / "bin").mkdir()
    (tree / "bin" / "big").write_bytes(hashlib.sha256(version.encode()).digest() * 40_000)
    (data / "agent").mkdir(parents=True)
    (data / "agent" / "keystore").write_text(f"image {version}'s empty state\n")
    img = root / f"{version}.img"
    disk.assemble(img, tree, SIZE, seed=f"seed-{version}", epoch=EPOCH, slot_size=SLOT, data_tree=data,
                  bootloader=None)
    bmaplib.create(img, img.with_suffix(".img.bmap"))
    return img


@pytest.fixture
def loop(tmp_path: Path) -> Iterator[Path]:
    backing = tmp_path / "card.bin"
    backing.write_bytes(b"\xa5" * SIZE)
    dev = Path(subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True, text=True,
                              check=True).stdout.strip())
    yield dev
    subprocess.run(["losetup", "-d", str(dev)], check=False)


def _read(dev: Path, start: int, length: int) -> bytes:
    fd = os.open(dev, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return os.pread(fd, length, start)
    finally:
        os.close(fd)


def _flash(settings: Settings, dev: Path, img: Path, **kw: bool) -> flash.FlashResult:
    req = flash.FlashRequest(device=str(dev), image=img, yes=True, force=True, eject=False, **kw)
    return flash.flash(settings, req, say=lambda _s: None, stream=io.StringIO())


def test_system_only_keeps_the_data_partition(tmp_path: Path, loop: Path) -> None:
    settings = Settings(output_dir=tmp_path / "build")
    old, new = _image(tmp_path, "1.0"), _image(tmp_path, "2.0")
    layout = disk.Layout(SIZE, SLOT)
    _flash(settings, loop, old)
    # The device lived: its data partition now holds keys the image never had (written through the
    # block device, like the running system would), and slot B an updated system.
    fd = os.open(loop, os.O_WRONLY)
    try:
        os.pwrite(fd, os.urandom(MiB), layout.data.start + 4 * MiB)
        os.pwrite(fd, b"an updated system" * 1000, layout.slots[1].start)
        os.fsync(fd)
    finally:
        os.close(fd)
    data_before = _read(loop, layout.data.start, layout.data.size)

    result = _flash(settings, loop, new, system_only=True)

    assert _read(loop, layout.data.start, layout.data.size) == data_before, "p3 changed"
    assert _read(loop, 0, 512) == new.read_bytes()[:512]  # the new table (and boot code)
    image_bytes = new.read_bytes()
    for start, end in bmaplib.parse(new.with_suffix(".img.bmap")).spans():
        end = min(end, layout.data.start)
        if start < end:
            assert _read(loop, start, end - start) == image_bytes[start:end], f"bytes {start}-{end}"
    assert _read(loop, layout.slots[1].start, MiB) == bytes(MiB), "slot B's old system was not blanked"
    assert result.verify is not None and result.write.bytes_written < layout.data.start
    copy = tmp_path / "card-copy.img"
    copy.write_bytes(_read(loop, 0, SIZE))
    assert Image(copy).read("/etc/version") == b"2.0\n"


def test_system_only_refuses_a_card_without_the_same_data_partition(tmp_path: Path, loop: Path) -> None:
    settings = Settings(output_dir=tmp_path / "build")
    new = _image(tmp_path, "2.0")
    # A card from before the A/B layout: one partition from 5 MiB to the end.
    subprocess.run(["sfdisk", "--no-reread", "--no-tell-kernel", "--wipe=never", "-q", str(loop)],
                   input="label: dos\nstart=10240, type=83\n", text=True, check=True)
    before = hashlib.sha256(_read(loop, 0, SIZE)).hexdigest()
    with pytest.raises(FlashError, match=r"data partition is not where this image has it .* erases the keys"):
        _flash(settings, loop, new, system_only=True)
    assert hashlib.sha256(_read(loop, 0, SIZE)).hexdigest() == before, "something was written"
