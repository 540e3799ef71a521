"""Block maps: which blocks of a sparse disk image hold data, with a SHA-256 per range.

A 3.5 GB image is mostly holes; writing only the mapped blocks is what makes flashing
fast, and the per-range checksums are what make read-back verification possible.
The file format is bmaptool's version 2.0 XML, so ``bmaptool copy`` accepts our maps and
we accept maps that ``bmaptool create`` wrote.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

from clef_armory.errors import FlashError

BLOCK_SIZE = 4096
FORMAT_VERSION = "2.0"
_MAX_BMAP_BYTES = 64 << 20
_CHECKSUM_LEN = {"sha256": 64, "sha1": 40}
_HASH_CHUNK = 4 << 20


@dataclasses.dataclass(frozen=True)
class Range:
    """Blocks ``first``..``last`` (inclusive) and the checksum of their bytes."""

    first: int
    last: int
    checksum: str | None

    @property
    def blocks(self) -> int:
        return self.last - self.first + 1

    def byte_span(self, block_size: int, image_size: int) -> tuple[int, int]:
        """[start, end) in bytes; the image's last block may be partial."""
        return self.first * block_size, min((self.last + 1) * block_size, image_size)

    def label(self) -> str:
        return f"blocks {self.first}-{self.last}" if self.first != self.last else f"block {self.first}"


@dataclasses.dataclass(frozen=True)
class Bmap:
    """A parsed or freshly created block map."""

    image_size: int
    block_size: int
    blocks_count: int
    checksum_type: str
    ranges: tuple[Range, ...]

    @property
    def mapped_blocks(self) -> int:
        return sum(r.blocks for r in self.ranges)

    @property
    def mapped_bytes(self) -> int:
        return sum(e - s for s, e in self.spans())

    def spans(self) -> Iterator[tuple[int, int]]:
        """Byte spans [start, end) of every mapped range, in order."""
        for r in self.ranges:
            yield r.byte_span(self.block_size, self.image_size)


def mapped_ranges(path: Path, block_size: int = BLOCK_SIZE) -> list[tuple[int, int]]:
    """(first, last) block pairs that hold data, found with SEEK_DATA/SEEK_HOLE.

    Data extents are widened to whole blocks and merged, so a block that is only
    partly data is still copied in full.
    """
    size = path.stat().st_size
    blocks_count = -(-size // block_size)
    out: list[tuple[int, int]] = []
    with path.open("rb") as f:
        fd = f.fileno()
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data after pos
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            first, last = start // block_size, min(-(-end // block_size), blocks_count) - 1
            if out and first <= out[-1][1] + 1:
                out[-1] = (out[-1][0], max(out[-1][1], last))
            else:
                out.append((first, last))
            pos = end
    return out


def _hash_span(f: object, start: int, end: int, checksum_type: str) -> str:
    h = hashlib.new(checksum_type)
    fd = f.fileno()  # type: ignore[attr-defined]
    pos = start
    while pos < end:
        chunk = os.pread(fd, min(_HASH_CHUNK, end - pos), pos)
        if not chunk:
            raise FlashError(f"image ended early at byte {pos} while hashing it")
        h.update(chunk)
        pos += len(chunk)
    return h.hexdigest()


def create(image_path: Path, bmap_path: Path, block_size: int = BLOCK_SIZE) -> Bmap:
    """Write the block map of ``image_path`` to ``bmap_path`` (atomically) and return it."""
    image_path, bmap_path = Path(image_path), Path(bmap_path)
    try:
        size = image_path.stat().st_size
        pairs = mapped_ranges(image_path, block_size)
        with image_path.open("rb") as f:
            ranges = []
            for first, last in pairs:
                start, end = first * block_size, min((last + 1) * block_size, size)
                ranges.append(Range(first, last, _hash_span(f, start, end, "sha256")))
    except OSError as e:
        raise FlashError(f"cannot read image {image_path}: {e.strerror}") from None
    bmap = Bmap(size, block_size, -(-size // block_size), "sha256", tuple(ranges))
    text = render(bmap)
    tmp = bmap_path.with_name(bmap_path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, bmap_path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise FlashError(f"cannot write bmap {bmap_path}: {e.strerror}") from None
    return bmap


def human_size(n: int) -> str:
    """1536 -> '1.5 KiB': sizes as a person reads them."""
    if n < 1024:
        return f"{n} bytes"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} TiB"


def render(bmap: Bmap) -> str:
    """The bmap 2.0 XML text, with its own checksum filled in."""
    cs_len = _CHECKSUM_LEN[bmap.checksum_type]
    percent = 100.0 * bmap.mapped_blocks / bmap.blocks_count if bmap.blocks_count else 0.0
    lines = [
        '<?xml version="1.0" ?>',
        "<!-- Block map of a sparse disk image written by clef-armory: only the blocks",
        "     listed in BlockMap hold data; all others read as zeros and need not be",
        "     written. Compatible with bmaptool (format 2.0). -->",
        f'<bmap version="{FORMAT_VERSION}">',
        f"    <!-- Image size in bytes: {human_size(bmap.image_size)} -->",
        f"    <ImageSize> {bmap.image_size} </ImageSize>",
        "",
        "    <!-- Size of a block in bytes -->",
        f"    <BlockSize> {bmap.block_size} </BlockSize>",
        "",
        "    <!-- Count of blocks in the image file -->",
        f"    <BlocksCount> {bmap.blocks_count} </BlocksCount>",
        "",
        f"    <!-- Count of mapped blocks: {human_size(bmap.mapped_bytes)} or {percent:.1f}% -->",
        f"    <MappedBlocksCount> {bmap.mapped_blocks} </MappedBlocksCount>",
        "",
        "    <!-- Type of checksum used in this file -->",
        f"    <ChecksumType> {bmap.checksum_type} </ChecksumType>",
        "",
        "    <!-- Checksum of this file, computed while this value is all ASCII zeros -->",
        f"    <BmapFileChecksum> {'0' * cs_len} </BmapFileChecksum>",
        "",
        "    <!-- Mapped ranges of blocks; 'chksum' is the checksum of the range's bytes -->",
        "    <BlockMap>",
    ]
    for r in bmap.ranges:
        attr = f' chksum="{r.checksum}"' if r.checksum else ""
        span = f"{r.first}-{r.last}" if r.first != r.last else f"{r.first}"
        lines.append(f"        <Range{attr}> {span} </Range>")
    lines += ["    </BlockMap>", "</bmap>", ""]
    text = "\n".join(lines)
    digest = hashlib.new(bmap.checksum_type, text.encode()).hexdigest()
    return text.replace("0" * cs_len, digest, 1)


_RANGE_RE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+))?\s*$")


def parse(bmap_path: Path) -> Bmap:
    """Read and check a bmap file: its own checksum, version, and the range layout."""
    bmap_path = Path(bmap_path)
    try:
        with bmap_path.open("rb") as f:
            raw = f.read(_MAX_BMAP_BYTES + 1)
    except OSError as e:
        raise FlashError(f"cannot read bmap {bmap_path}: {e.strerror}") from None
    if len(raw) > _MAX_BMAP_BYTES:
        raise FlashError(f"bmap {bmap_path} is larger than {_MAX_BMAP_BYTES >> 20} MiB")
    # A bmap never needs a DTD; refusing one rules out entity-expansion tricks.
    if b"<!DOCTYPE" in raw or b"<!ENTITY" in raw:
        raise FlashError(f"bmap {bmap_path} contains a DOCTYPE/ENTITY, which a bmap never has")
    try:
        root = ET.fromstring(raw)  # noqa: S314 - no DTD possible (checked above)
    except ET.ParseError as e:
        raise FlashError(f"bmap {bmap_path} is not valid XML: {e}") from None

    def bad(why: str) -> FlashError:
        return FlashError(f"bmap {bmap_path}: {why}")

    version = root.get("version", "")
    if root.tag != "bmap" or not version.startswith("2."):
        raise bad(f"unsupported bmap version {version!r} (need 2.x)")

    def number(tag: str) -> int:
        node = root.find(tag)
        if node is None or not (node.text or "").strip().isdigit():
            raise bad(f"missing or bad <{tag}>")
        return int((node.text or "").strip())

    image_size, block_size, blocks_count = (
        number("ImageSize"), number("BlockSize"), number("BlocksCount"))
    mapped_count = number("MappedBlocksCount")
    if block_size <= 0 or block_size % 512:
        raise bad(f"block size {block_size} is not a multiple of 512")
    if blocks_count != -(-image_size // block_size):
        raise bad(f"BlocksCount {blocks_count} does not match ImageSize {image_size}")
    cs_node = root.find("ChecksumType")
    cs_type = (cs_node.text or "").strip().lower() if cs_node is not None else ""
    if cs_type not in _CHECKSUM_LEN:
        raise bad(f"unsupported checksum type {cs_type!r}")
    file_cs_node = root.find("BmapFileChecksum")
    file_cs = (file_cs_node.text or "").strip() if file_cs_node is not None else ""
    if len(file_cs) != _CHECKSUM_LEN[cs_type]:
        raise bad("missing or bad <BmapFileChecksum>")
    pos = raw.find(file_cs.encode())
    zeroed = raw[:pos] + b"0" * len(file_cs) + raw[pos + len(file_cs):]
    if hashlib.new(cs_type, zeroed).hexdigest() != file_cs:
        raise bad("its own checksum does not match (file damaged or edited)")

    block_map = root.find("BlockMap")
    if block_map is None:
        raise bad("missing <BlockMap>")
    ranges: list[Range] = []
    for node in block_map.iter("Range"):
        m = _RANGE_RE.match(node.text or "")
        if not m:
            raise bad(f"bad range {node.text!r}")
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) else first
        if last < first or last >= blocks_count or (ranges and first <= ranges[-1].last):
            raise bad(f"range {first}-{last} is out of order or outside the image")
        checksum = node.get("chksum")
        if checksum is not None and not re.fullmatch(
                rf"[0-9a-f]{{{_CHECKSUM_LEN[cs_type]}}}", checksum):
            raise bad(f"range {first}-{last} has a malformed checksum")
        ranges.append(Range(first, last, checksum))
    result = Bmap(image_size, block_size, blocks_count, cs_type, tuple(ranges))
    if result.mapped_blocks != mapped_count:
        raise bad(f"MappedBlocksCount {mapped_count} does not match its ranges "
                  f"({result.mapped_blocks})")
    return result


def ranges_within(bmap: Bmap, start: int, end: int) -> list[tuple[int, int]]:
    """The mapped bytes of [start, end) of the image as (offset from ``start``, length) pairs: what
    has to be written to reproduce that part of the image on a device (a system slot, say)."""
    out: list[tuple[int, int]] = []
    for first, last in bmap.spans():
        lo, hi = max(first, start), min(last, end)
        if lo < hi:
            out.append((lo - start, hi - lo))
    return out


def ranges_digest(image: Path, base: int, ranges: list[tuple[int, int]]) -> str:
    """sha256 of the bytes of ``ranges`` (relative to ``base``), in order: the device computes the same
    over what it wrote, so both ends agree on every mapped byte."""
    digest = hashlib.sha256()
    with image.open("rb") as f:
        for offset, length in ranges:
            f.seek(base + offset)
            left = length
            while left:
                chunk = f.read(min(left, 1 << 20))
                if not chunk:
                    raise FlashError(f"{image} ends before byte {base + offset + length}")
                digest.update(chunk)
                left -= len(chunk)
    return digest.hexdigest()
