"""invoke flash against real loop devices: what is written, what is refused, what an interrupt leaves.

Needs root and losetup (CI runs as root). Every loop device, mount and dm target a test
makes is removed in its fixture's teardown.
"""

from __future__ import annotations

import hashlib
import io
import lzma
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zstandard

from clef_armory.config import Settings
from clef_armory.errors import FlashError
from image import blockdev, flash
from image import bmap as bmaplib

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
IMAGE_SIZE = 48 * MiB
OLD_BYTE = 0xA5  # what a "used" card holds before we write to it


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


def make_image(path: Path, seed: int = 1) -> bmaplib.Bmap:
    """A sparse disk image shaped like ours: MBR, bootloader at 1 KiB, data extents after 1 MiB."""
    rng = random.Random(seed)
    with path.open("wb") as f:
        f.truncate(IMAGE_SIZE)
        f.write(rng.randbytes(512))  # boot code; sfdisk adds the partition table below
        f.seek(1024)
        f.write(rng.randbytes(300_000))  # "bootloader"
        for _ in range(25):
            f.seek(rng.randrange(MiB, IMAGE_SIZE - MiB) // 4096 * 4096)
            f.write(rng.randbytes(rng.randrange(4096, 700_000)) if rng.random() < 0.5
                    else b"clef-armory typical text line\n" * rng.randrange(100, 20_000))
    subprocess.run(["sfdisk", "--no-reread", "--no-tell-kernel", "--wipe=never", "-q", str(path)],
                   input="label: dos\nstart=10240, type=83\n", text=True, check=True)
    return bmaplib.create(path, path.with_suffix(".bmap"))


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bmaplib.Bmap]:
    img = tmp_path / "armory.img"
    return img, make_image(img)


@pytest.fixture
def loop_factory(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Make loop devices over files full of OLD_BYTE; detach them all afterwards."""
    made: list[Path] = []

    def make(size: int = 64 * MiB, partscan: bool = False) -> Path:
        backing = tmp_path / f"backing{len(made)}.bin"
        backing.write_bytes(bytes([OLD_BYTE]) * size)
        argv = ["losetup", "--find", "--show", *(["--partscan"] if partscan else []), str(backing)]
        dev = Path(run(*argv))
        made.append(dev)
        return dev

    yield make
    for dev in made:
        subprocess.run(["losetup", "-d", str(dev)], check=False)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(output_dir=tmp_path / "build")


def read(dev: Path, start: int, length: int) -> bytes:
    fd = os.open(dev, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return os.pread(fd, length, start)
    finally:
        os.close(fd)


def assert_mapped_ranges_equal(dev: Path, img: Path, bmap: bmaplib.Bmap) -> None:
    data = img.read_bytes()
    for start, end in bmap.spans():
        assert read(dev, start, end - start) == data[start:end], f"bytes {start}-{end} differ"


def request(dev: Path, img: Path, **kw: object) -> flash.FlashRequest:
    base: dict[str, object] = {"device": str(dev), "image": img, "yes": True, "force": True,
                               "eject": False}
    return flash.FlashRequest(**{**base, **kw})  # type: ignore[arg-type]


def quiet() -> io.StringIO:
    return io.StringIO()


# ---------------------------------------------------------------- writing


@pytest.mark.integration
@pytest.mark.parametrize("compression", ["", "zst", "xz"])
def test_flash_writes_exactly_the_mapped_ranges(
        settings: Settings, image: tuple[Path, bmaplib.Bmap], loop_factory: Callable[..., Path],
        compression: str) -> None:
    img, bmap = image
    source = img
    if compression:
        source = img.with_name(img.name + "." + compression)
        raw = img.read_bytes()
        source.write_bytes(zstandard.ZstdCompressor().compress(raw) if compression == "zst"
                           else lzma.compress(raw))
    dev = loop_factory()
    result = flash.flash(settings, request(dev, source), say=lambda _s: None, stream=quiet())

    assert_mapped_ranges_equal(dev, img, bmap)
    # the whole first MiB is the image's, holes included
    assert read(dev, 0, MiB) == img.read_bytes()[:MiB]
    # so is the rest of the boot area up to the partition (holes there become zeros)
    assert read(dev, MiB, 4 * MiB) == img.read_bytes()[MiB:5 * MiB]
    # unmapped blocks after it were not touched: they still hold the old card's bytes
    mapped = {b for r in bmap.ranges for b in range(r.first, r.last + 1)}
    hole = next(b for b in range(5 * MiB // 4096, bmap.blocks_count) if b not in mapped)
    assert read(dev, hole * 4096, 4096) == bytes([OLD_BYTE]) * 4096
    # bytes written: the mapped data, blanking the boot area and last MiB, the first MiB again
    assert result.write.bytes_written < bmap.mapped_bytes + 7 * MiB
    assert result.write.bytes_written < IMAGE_SIZE // 2
    assert result.verify is not None and result.verify.bytes_read == bmap.mapped_bytes


@pytest.mark.integration
@pytest.mark.parametrize("pipelined", [True, False])
def test_writeback_windows_keep_the_data_intact(
        image: tuple[Path, bmaplib.Bmap], loop_factory: Callable[..., Path],
        monkeypatch: pytest.MonkeyPatch, pipelined: bool) -> None:
    """Small windows so the periodic writeback (sync_file_range, or fdatasync) really runs."""
    img, bmap = image
    monkeypatch.setattr(flash._Writer, "_SYNC_EVERY", 256 * 1024)
    if not pipelined:
        monkeypatch.setattr(flash, "_sync_file_range", None)
    else:
        assert flash._sync_file_range is not None
    dev = loop_factory()
    flash.write_image(img, bmap, dev)
    flash.verify_target(dev, bmap)
    assert_mapped_ranges_equal(dev, img, bmap)


@pytest.mark.integration
def test_stale_partition_table_at_the_disk_end_is_wiped(
        settings: Settings, image: tuple[Path, bmaplib.Bmap], loop_factory: Callable[..., Path]) -> None:
    img, _ = image
    dev = loop_factory(96 * MiB)
    flash.flash(settings, request(dev, img), say=lambda _s: None, stream=quiet())
    assert read(dev, 95 * MiB, MiB) == bytes(MiB)


@pytest.mark.integration
def test_to_file_gives_an_identical_image(settings: Settings, image: tuple[Path, bmaplib.Bmap],
                                          tmp_path: Path) -> None:
    img, _ = image
    out = tmp_path / "vm.img"
    req = flash.FlashRequest(image=img, to_file=out, yes=True)
    flash.flash(settings, req, say=lambda _s: None, stream=quiet())
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(img.read_bytes()).digest()
    assert out.stat().st_blocks * 512 < IMAGE_SIZE // 2  # holes stay holes


def test_to_file_under_dev_is_refused(settings: Settings, image: tuple[Path, bmaplib.Bmap]) -> None:
    img, _ = image
    target = Path("/dev/clef-armory-test-never-created")
    with pytest.raises(FlashError, match="under /dev"):
        flash.flash(settings, flash.FlashRequest(image=img, to_file=target, yes=True),
                    say=lambda _s: None, stream=quiet())
    assert not target.exists()


@pytest.mark.integration
def test_the_cli_flashes_a_loop_device(image: tuple[Path, bmaplib.Bmap],
                                       loop_factory: Callable[..., Path]) -> None:
    img, bmap = image
    dev = loop_factory()
    cli = subprocess.run([str(REPO / ".venv/bin/inv"), "flash", "--device", str(dev), "--image", str(img),
                          "--yes", "--force", "--no-eject"], cwd=REPO, capture_output=True, text=True,
                         check=False)
    assert cli.returncode == 0, cli.stderr
    assert f"to {dev}" in cli.stdout and "verified" in cli.stdout
    assert_mapped_ranges_equal(dev, img, bmap)

    refused = subprocess.run([str(REPO / ".venv/bin/inv"), "flash", "--device", str(dev), "--image",
                              str(img), "--yes"], cwd=REPO, capture_output=True, text=True, check=False)
    assert refused.returncode == 1
    assert refused.stderr.strip().count("\n") == 0 and "loop disk" in refused.stderr


# ---------------------------------------------------------------- verification


@pytest.mark.integration
def test_a_byte_changed_between_write_and_verify_is_caught(
        image: tuple[Path, bmaplib.Bmap], loop_factory: Callable[..., Path]) -> None:
    img, bmap = image
    dev = loop_factory()
    flash.write_image(img, bmap, dev)
    bad = bmap.ranges[3]
    start, _ = bad.byte_span(bmap.block_size, bmap.image_size)
    old = read(dev, start + 5, 1)
    fd = os.open(dev, os.O_WRONLY)
    try:
        os.pwrite(fd, bytes([old[0] ^ 0xFF]), start + 5)
        os.fsync(fd)
    finally:
        os.close(fd)
    with pytest.raises(FlashError, match=f"verification failed: {bad.label()} "):
        flash.verify_target(dev, bmap)


@pytest.mark.integration
def test_an_image_that_does_not_match_its_bmap_is_never_made_bootable(
        image: tuple[Path, bmaplib.Bmap], loop_factory: Callable[..., Path]) -> None:
    img, bmap = image
    start, _ = bmap.ranges[-1].byte_span(bmap.block_size, bmap.image_size)
    with img.open("r+b") as f:
        f.seek(start)
        f.write(b"\x00\x01\x02\x03 corrupted")
    dev = loop_factory()
    with pytest.raises(FlashError, match=f"does not match its bmap at {bmap.ranges[-1].label()}"):
        flash.write_image(img, bmap, dev)
    assert read(dev, 0, MiB) == bytes(MiB)


# ---------------------------------------------------------------- refusals


def _refused(settings: Settings, img: Path, device: str, match: str, **kw: object) -> None:
    with pytest.raises(FlashError, match=match):
        flash.flash(settings, request(Path(device), img, **kw), say=lambda _s: None, stream=quiet())


@pytest.mark.integration
def test_a_loop_device_needs_force_for_its_transport(
        settings: Settings, image: tuple[Path, bmaplib.Bmap], loop_factory: Callable[..., Path]) -> None:
    img, _ = image
    dev = loop_factory()
    _refused(settings, img, str(dev), "loop disk, not a USB or MMC card", force=False)
    assert read(dev, 0, MiB) == bytes([OLD_BYTE]) * MiB


@pytest.mark.integration
def test_a_mounted_loop_device_is_refused(
        settings: Settings, image: tuple[Path, bmaplib.Bmap], loop_factory: Callable[..., Path],
        tmp_path: Path) -> None:
    img, _ = image
    dev = loop_factory()
    run("mkfs.ext4", "-q", str(dev))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run("mount", str(dev), str(mnt))
    try:
        before = read(dev, 0, 2 * MiB)
        _refused(settings, img, str(dev), "is mounted .* on " + str(mnt))
        assert read(dev, 0, 2 * MiB) == before
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.integration
def test_o_excl_stops_a_write_when_the_checks_are_raced(
        image: tuple[Path, bmaplib.Bmap], loop_factory: Callable[..., Path], tmp_path: Path) -> None:
    """If a mount appears after the checks, the exclusive open still refuses."""
    img, bmap = image
    dev = loop_factory()
    run("mkfs.ext4", "-q", str(dev))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run("mount", str(dev), str(mnt))
    try:
        with pytest.raises(FlashError, match="busy"):
            flash.write_image(img, bmap, dev)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.integration
def test_a_partition_is_refused(settings: Settings, image: tuple[Path, bmaplib.Bmap],
                                loop_factory: Callable[..., Path]) -> None:
    img, _ = image
    dev = loop_factory(128 * MiB, partscan=True)
    subprocess.run(["sfdisk", "-q", str(dev)], input="label: dos\n,100M,L\n", text=True, check=True)
    part = Path(f"{dev}p1")
    for _ in range(50):
        if part.exists():
            break
        subprocess.run(["partx", "-u", str(dev)], check=False)
    assert part.exists()
    _refused(settings, img, str(part), f"is a partition; give the whole disk {dev}")


@pytest.mark.integration
def test_a_disk_used_by_device_mapper_is_refused(
        settings: Settings, image: tuple[Path, bmaplib.Bmap], loop_factory: Callable[..., Path]) -> None:
    if "device-mapper" not in Path("/proc/misc").read_text():
        pytest.skip("this kernel has no device-mapper driver")
    img, _ = image
    dev = loop_factory()
    name = f"clef-armory-test-{os.getpid()}"
    sectors = int(run("blockdev", "--getsz", str(dev)))
    run("dmsetup", "create", name, "--table", f"0 {sectors} linear {dev} 0")
    try:
        _refused(settings, img, str(dev), "in use by dm-")
    finally:
        subprocess.run(["dmsetup", "remove", name], check=False)


def test_a_missing_path_is_refused_and_not_created(settings: Settings,
                                                   image: tuple[Path, bmaplib.Bmap]) -> None:
    img, _ = image
    missing = "/dev/clef-armory-test-missing"
    _refused(settings, img, missing, "does not exist")
    assert not os.path.lexists(missing)


def test_a_regular_file_under_dev_is_refused(settings: Settings,
                                             image: tuple[Path, bmaplib.Bmap]) -> None:
    img, _ = image
    plain = Path("/dev/shm") / f"clef-armory-test-{os.getpid()}"
    plain.write_bytes(b"keep me")
    try:
        _refused(settings, img, str(plain), "is a regular file, not a disk")
        assert plain.read_bytes() == b"keep me"
    finally:
        plain.unlink()


@pytest.mark.integration
def test_a_too_small_device_is_refused(settings: Settings, image: tuple[Path, bmaplib.Bmap],
                                       loop_factory: Callable[..., Path]) -> None:
    img, _ = image
    dev = loop_factory(16 * MiB)
    _refused(settings, img, str(dev), "smaller than the image")
    assert read(dev, 0, MiB) == bytes([OLD_BYTE]) * MiB


@pytest.mark.integration
def test_the_root_disk_is_refused(settings: Settings, image: tuple[Path, bmaplib.Bmap]) -> None:
    img, _ = image
    source = run("findmnt", "-n", "-o", "SOURCE", "/")
    if not source.startswith("/dev/"):
        pytest.skip(f"/ is not on a block device here ({source})")
    parent = run("lsblk", "-n", "-d", "-o", "PKNAME", source) or Path(source).name
    disk = f"/dev/{parent}"

    def first_mib() -> bytes | None:
        try:  # some sandboxes forbid even reading the host disk; the refusal is still tested
            return hashlib.sha256(read(Path(disk), 0, MiB)).digest()
        except PermissionError:
            return None

    before = first_mib()
    _refused(settings, img, disk, "holds / of this computer")
    assert first_mib() == before


@pytest.mark.integration
def test_a_symlink_is_followed_to_the_disk(loop_factory: Callable[..., Path], tmp_path: Path) -> None:
    dev = loop_factory()
    link = tmp_path / "by-id-usb-card"
    link.symlink_to(dev)
    info = blockdev.inspect(str(link))
    assert info.path == dev and info.transport == "loop" and info.size == 64 * MiB


@pytest.mark.integration
def test_the_typed_name_must_match(settings: Settings, image: tuple[Path, bmaplib.Bmap],
                                   loop_factory: Callable[..., Path]) -> None:
    img, _ = image
    dev = loop_factory()
    with pytest.raises(FlashError, match="not confirmed"):
        flash.flash(settings, request(dev, img, yes=False), say=lambda _s: None,
                    ask=lambda _q: "sdb", stream=quiet())
    assert read(dev, 0, MiB) == bytes([OLD_BYTE]) * MiB
    prompts: list[str] = []
    flash.flash(settings, request(dev, img, yes=False), say=lambda _s: None,
                ask=lambda q: prompts.append(q) or dev.name, stream=quiet())  # type: ignore[func-returns-value]
    assert dev.name in prompts[0]


@pytest.mark.integration
def test_a_card_swapped_during_confirmation_is_not_written(
        settings: Settings, image: tuple[Path, bmaplib.Bmap], loop_factory: Callable[..., Path],
        tmp_path: Path) -> None:
    img, _ = image
    dev = loop_factory()
    other = tmp_path / "other-card.bin"
    other.write_bytes(bytes([OLD_BYTE]) * 64 * MiB)

    def swap_then_answer(_question: str) -> str:
        run("losetup", "-d", str(dev))
        for _ in range(50):  # detaching is asynchronous
            if subprocess.run(["losetup", str(dev), str(other)], check=False).returncode == 0:
                break
            time.sleep(0.1)
        return dev.name

    with pytest.raises(FlashError, match="changed while waiting for confirmation"):
        flash.flash(settings, request(dev, img, yes=False), say=lambda _s: None,
                    ask=swap_then_answer, stream=quiet())
    assert other.read_bytes()[:MiB] == bytes([OLD_BYTE]) * MiB


# ---------------------------------------------------------------- interruption

_WRITER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from clef_armory.errors import FlashError
    from image import bmap, flash
    img, dev, sig, after = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    def stop_midway(done):
        if done > after:
            os.kill(os.getpid(), sig)
    try:
        flash.write_image(img, bmap.parse(img.with_suffix(".bmap")), dev, progress=stop_midway)
    except FlashError as e:
        print(e)
        sys.exit(3)
""")


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_an_interrupted_write_leaves_the_first_mib_blank(
        image: tuple[Path, bmaplib.Bmap], loop_factory: Callable[..., Path], sig: int) -> None:
    img, bmap = image
    dev = loop_factory()
    proc = subprocess.run([sys.executable, "-c", _WRITER, str(img), str(dev), str(int(sig)),
                           str(bmap.mapped_bytes // 2)],
                          cwd=REPO, capture_output=True, text=True, check=False, timeout=120)
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL, proc.stderr
    else:
        assert proc.returncode == 3, proc.stderr
        assert f"interrupted: {dev} is NOT bootable" in proc.stdout
    assert read(dev, 0, MiB) == bytes(MiB)
    # it really was midway: some ranges after the first MiB are already written, others not
    data = img.read_bytes()
    matches = [read(dev, s, e - s) == data[s:e] for s, e in bmap.spans() if s >= MiB]
    assert any(matches) and not all(matches)


# ---------------------------------------------------------------- pure logic


def _mbr(*entries: tuple[int, int]) -> bytes:
    sector = bytearray(512)
    for i, (kind, lba) in enumerate(entries):
        sector[446 + 16 * i + 4] = kind
        sector[446 + 16 * i + 8: 446 + 16 * i + 12] = lba.to_bytes(4, "little")
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


@pytest.mark.parametrize(
    ("head", "end"),
    [
        (bytes(512), MiB),  # no MBR signature
        (_mbr((0x83, 10240)), 5 * MiB),  # our images: partition at 5 MiB
        (_mbr((0x0C, 8192), (0x83, 20480)), 4 * MiB),  # first partition wins
        (_mbr((0xEE, 1)), MiB),  # GPT
        (_mbr((0x83, 1 << 20)), 16 * MiB),  # capped
        (_mbr((0x83, 100)), MiB),  # never less than the first MiB
    ],
)
def test_boot_area_end_comes_from_the_mbr(head: bytes, end: int) -> None:
    assert flash.boot_area_end(head) == end


def test_find_image_prefers_the_raw_image_of_a_build(tmp_path: Path) -> None:
    folder = tmp_path / "build" / "mk2"
    folder.mkdir(parents=True)
    for name in ("a.img", "a.img.zst", "a.img.bmap"):
        (folder / name).write_bytes(b"x")
    settings = Settings(output_dir=tmp_path / "build", board="mk2")
    assert flash.find_image(settings, None).name == "a.img"
    assert flash.find_bmap(folder / "a.img.zst", None) == folder / "a.img.bmap"
    with pytest.raises(FlashError, match="no image in"):
        flash.find_image(Settings(output_dir=tmp_path / "none"), None)


def test_emmc_without_armory_ums_says_where_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(FlashError, match=r"github\.com/usbarmory/armory-ums/releases"):
        flash.expose_emmc(Settings(cache_dir=tmp_path), None, lambda _s: None, timeout=1)


def test_emmc_without_a_usb_loader_says_how_to_install_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ums = tmp_path / "armory-ums.imx"
    ums.write_bytes(b"imx")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(flash, "_installed_loader", lambda _image: None)
    from clef_armory import clef
    from clef_armory.errors import PrerequisiteError

    def no_go() -> Path:
        raise PrerequisiteError("Go is not installed")

    monkeypatch.setattr(clef, "go_binary", no_go)
    with pytest.raises(FlashError, match=r"armory-boot-usb.*run \./do.*imx_usb"):
        flash.expose_emmc(Settings(cache_dir=tmp_path), ums, lambda _s: None, timeout=1)


# ---------------------------------------------------------------- progress


def test_progress_prints_plain_lines_when_not_a_tty() -> None:
    out = io.StringIO()
    bar = flash.ProgressBar("writing", 100 * MiB, out)
    for done in range(0, 100 * MiB + 1, MiB):
        bar(done)
    bar.finish(100 * MiB)
    lines = out.getvalue().splitlines()
    assert len(lines) == 11
    assert "100.0%" in lines[-1] and "100.0 MiB of 100.0 MiB" in lines[-1] and "/s" in lines[-1]
