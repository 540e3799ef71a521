"""Block maps: created from real sparse files, parsed strictly, and interchangeable with bmaptool."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
from pathlib import Path

import pytest

from clef_armory.errors import FlashError
from image import bmap

BS = bmap.BLOCK_SIZE


def make_sparse(path: Path, size: int, extents: list[tuple[int, bytes]]) -> None:
    """A sparse file of ``size`` bytes with ``extents`` of data and holes elsewhere."""
    with path.open("wb") as f:
        f.truncate(size)
        for offset, data in extents:
            f.seek(offset)
            f.write(data)


def test_create_maps_only_data_blocks_with_their_checksums(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    a, b = os.urandom(3 * BS), os.urandom(BS + 10)
    make_sparse(image, 64 * BS, [(0, a), (40 * BS, b)])
    result = bmap.create(image, tmp_path / "disk.bmap")
    assert [(r.first, r.last) for r in result.ranges] == [(0, 2), (40, 41)]
    data = image.read_bytes()
    for r in result.ranges:
        start, end = r.byte_span(BS, result.image_size)
        assert r.checksum == hashlib.sha256(data[start:end]).hexdigest()
    assert result.blocks_count == 64
    assert result.mapped_blocks == 5
    assert bmap.parse(tmp_path / "disk.bmap") == result


def test_partial_last_block_and_merged_neighbours(tmp_path: Path) -> None:
    image = tmp_path / "odd.img"
    size = 10 * BS + 512  # last block is partial
    make_sparse(image, size, [(BS * 3 + 100, b"x" * 10), (BS * 4, b"y"), (size - 20, b"z" * 20)])
    result = bmap.create(image, tmp_path / "odd.bmap")
    assert [(r.first, r.last) for r in result.ranges] == [(3, 4), (10, 10)]
    last = result.ranges[-1]
    assert last.byte_span(BS, size) == (10 * BS, size)
    assert last.checksum == hashlib.sha256(image.read_bytes()[10 * BS:]).hexdigest()
    assert result.mapped_bytes == 2 * BS + 512


def test_all_holes_gives_an_empty_map(tmp_path: Path) -> None:
    image = tmp_path / "empty.img"
    make_sparse(image, 16 * BS, [])
    result = bmap.create(image, tmp_path / "empty.bmap")
    assert result.ranges == ()
    assert bmap.parse(tmp_path / "empty.bmap").mapped_blocks == 0


@pytest.fixture
def good_bmap(tmp_path: Path) -> Path:
    image = tmp_path / "g.img"
    make_sparse(image, 32 * BS, [(0, os.urandom(BS)), (8 * BS, os.urandom(2 * BS))])
    bmap.create(image, tmp_path / "g.bmap")
    return tmp_path / "g.bmap"


def test_parse_rejects_an_edited_file(good_bmap: Path) -> None:
    text = good_bmap.read_text().replace("> 8-9 <", "> 8-10 <")
    good_bmap.write_text(text)
    with pytest.raises(FlashError, match="own checksum does not match"):
        bmap.parse(good_bmap)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace('version="2.0"', 'version="1.4"'), "unsupported bmap version"),
        (lambda t: t.replace("<?xml version=\"1.0\" ?>",
                             '<?xml version="1.0" ?><!DOCTYPE x [<!ENTITY a "b">]>'), "DOCTYPE"),
        (lambda t: t.replace("<BlockSize> 4096", "<BlockSize> 1000"), "multiple of 512"),
        (lambda t: "not xml at all", "not valid XML"),
    ],
)
def test_parse_rejects_malformed_maps(good_bmap: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    good_bmap.write_text(edit(good_bmap.read_text()))
    with pytest.raises(FlashError, match=message):
        bmap.parse(good_bmap)


def test_parse_rejects_unordered_ranges(tmp_path: Path) -> None:
    broken = bmap.Bmap(32 * BS, BS, 32, "sha256",
                       (bmap.Range(8, 9, None), bmap.Range(0, 0, None)))
    path = tmp_path / "unordered.bmap"
    path.write_text(bmap.render(broken))
    with pytest.raises(FlashError, match="out of order"):
        bmap.parse(path)


def test_parse_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(FlashError, match="cannot read bmap"):
        bmap.parse(tmp_path / "nope.bmap")


def _random_image(path: Path, seed: int) -> None:
    rng = random.Random(seed)
    extents = [(0, rng.randbytes(70_000))]
    for _ in range(20):
        offset = rng.randrange(1, 1000) * BS + rng.randrange(BS)
        extents.append((offset, rng.randbytes(rng.randrange(1, 50_000))))
    make_sparse(path, 1024 * BS + 1536, extents)


@pytest.mark.integration
def test_bmaptool_accepts_our_map_and_we_accept_its_map(tmp_path: Path) -> None:
    image = tmp_path / "r.img"
    _random_image(image, seed=7)
    ours = bmap.create(image, tmp_path / "ours.bmap")

    out = tmp_path / "copy.img"
    run = subprocess.run(["bmaptool", "copy", "--bmap", str(tmp_path / "ours.bmap"), str(image), str(out)],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert out.read_bytes() == image.read_bytes()

    run = subprocess.run(["bmaptool", "create", "-o", str(tmp_path / "theirs.bmap"), str(image)],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    theirs = bmap.parse(tmp_path / "theirs.bmap")
    assert theirs == ours


@pytest.mark.integration
def test_bmaptool_detects_data_that_does_not_match_our_checksums(tmp_path: Path) -> None:
    image = tmp_path / "r.img"
    _random_image(image, seed=8)
    bmap.create(image, tmp_path / "ours.bmap")
    with image.open("r+b") as f:
        f.seek(100)
        f.write(b"\xff" if f.read(1) != b"\xff" else b"\x00")
    run = subprocess.run(["bmaptool", "copy", "--bmap", str(tmp_path / "ours.bmap"), str(image),
                          str(tmp_path / "copy.img")], capture_output=True, text=True, check=False)
    assert run.returncode != 0
    assert "checksum mismatch" in run.stderr
