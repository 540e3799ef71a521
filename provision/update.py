"""`./do update`: a new system into the device's inactive slot over SSH, then boot it (docs/updating.md).

Only the blocks the new system file system uses (its bmap) travel, zlib-compressed, in one SSH channel;
the device writes them into the inactive slot, reads them back and compares the sha256 with the
image's; only then is the slot's extlinux.conf pointed at its own partition and the MBR's bootable
flag flipped. A cut stream or a dropped link before the flip leaves the old slot booting, and the next
run writes the inactive slot again. The data partition (keys, host keys, audit log) is never written.
Every call used here is frozen in armory_agent/contract.py, so this laptop can update an older device.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from armory_agent import contract
from clef_armory.errors import ContractError, HostKeyError, ProvisionError, UpdateError
from image import bmap as bmaplib
from image.inspect import Image
from provision.commands import Session
from provision.device import Device
from provision.ssh import Connection

Log = Callable[[str], None]
EXTLINUX = "/boot/extlinux/extlinux.conf"
_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class NewSystem:
    """The system file system of a built image, as ./do update sends it."""

    image: Path
    manifest: dict[str, Any]
    offset: int  # slot A's first byte in the image
    ranges: tuple[tuple[int, int], ...]  # mapped (offset in the slot, length)
    sha256: str  # of the mapped bytes in order
    extlinux: str  # the image's /boot/extlinux/extlinux.conf

    @property
    def mapped_bytes(self) -> int:
        return sum(n for _, n in self.ranges)

    def release(self) -> dict[str, Any]:
        """What the device records for the slot and reports as "new"."""
        m = self.manifest
        return {"board": m.get("board"), "suite": m.get("suite"), "kernel": m.get("kernel_version"),
                "clef": (m.get("clef") or {}).get("version"), "agent": (m.get("agent") or {}).get("version"),
                "contract": (m.get("agent") or {}).get("contract"), "image": m.get("name"),
                "security_updates": m.get("security_updates")}


def load_system(path: Path) -> NewSystem:
    """The image (a .img, or a build directory holding one) with its manifest and bmap, checked."""
    path = path.expanduser()
    if path.is_dir():
        found = sorted(path.glob("*.img"))
        if not found:
            raise UpdateError(f"no image in {path}/: build one with ./do build-image")
        path = found[-1]
    if not path.is_file():
        raise UpdateError(f"image {path} does not exist")
    try:
        manifest = json.loads((path.parent / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise UpdateError(f"cannot read the manifest.json next to {path}: {e}") from None
    system = manifest.get("system")
    if not isinstance(system, dict):
        raise UpdateError(f"{path.name} was built before the A/B layout (no system slot in its manifest): "
                          "rebuild it with ./do build-image")
    bmap_file = path.parent / str((manifest.get("files") or {}).get("bmap", path.name + ".bmap"))
    try:
        block_map = bmaplib.parse(bmap_file)
    except OSError as e:
        raise UpdateError(f"cannot read the block map {bmap_file}: {e.strerror}") from None
    offset, size = int(system["offset"]), int(system["size"])
    ranges = tuple(bmaplib.ranges_within(block_map, offset, offset + size))
    extlinux = Image(path, partition=1).read(EXTLINUX).decode()
    return NewSystem(path, manifest, offset, ranges, str(system["sha256"]), extlinux)


def check_compatible(new: NewSystem, hello: contract.Hello, slots: contract.Slots) -> None:
    """Refuse an image for another board, or one whose agent this laptop could not talk to."""
    board = hello.board or str((slots.release or {}).get("board", ""))
    if new.manifest.get("board") != board:
        raise UpdateError(f"{new.image.name} is for board {new.manifest.get('board')!r}, the device is "
                          f"{board!r}: build one with ./do build-image --board {board}")
    speaks = (new.manifest.get("agent") or {}).get("contract")
    if speaks != contract.VERSION:
        raise UpdateError(f"the image's agent speaks contract {speaks}, this laptop {contract.VERSION}: "
                          "build the image from this checkout")
    slot = slots.slot(slots.inactive)
    end = max((o + n for o, n in new.ranges), default=0)
    if end > slot.size:
        raise UpdateError(f"the new system needs {end >> 20} MiB, slot {slot.number} has "
                          f"{slot.size >> 20} MiB")


def extlinux_for(new: NewSystem, disk_id: str, slot: int) -> str:
    """The image's extlinux.conf with the kernel's root pointing at ``slot`` of this device's disk."""
    image_root = f"root=PARTUUID={new.manifest['disk']['partuuid']}"
    if image_root not in new.extlinux:
        raise UpdateError(f"{new.image.name}'s extlinux.conf does not name its root as {image_root}")
    return new.extlinux.replace(image_root, f"root=PARTUUID={disk_id}-{slot:02x}")


class Stream:
    """The mapped bytes of the new system, zlib-compressed, counted and hashed as they go."""

    def __init__(self, new: NewSystem, log: Log, cut_after: int | None = None) -> None:
        self.new = new
        self.log = log
        self.cut_after = cut_after  # tests: stop after this many raw bytes (a pulled cable)
        self.raw = 0
        self.sent = 0
        self.digest = hashlib.sha256()

    def __iter__(self) -> Iterator[bytes]:
        deflate = zlib.compressobj(6)
        total, next_note = self.new.mapped_bytes, 0.0
        started = time.monotonic()
        with self.new.image.open("rb") as f:
            for offset, length in self.new.ranges:
                f.seek(self.new.offset + offset)
                left = length
                while left:
                    data = f.read(min(_CHUNK, left))
                    if not data:
                        raise UpdateError(f"{self.new.image} ends inside its own system slot")
                    left -= len(data)
                    self.raw += len(data)
                    self.digest.update(data)
                    out = deflate.compress(data)
                    if out:
                        self.sent += len(out)
                        yield out
                    if self.cut_after is not None and self.raw >= self.cut_after:
                        raise _Cut()
                    if self.raw / total >= next_note:
                        rate = self.raw / max(time.monotonic() - started, 1e-3) / (1 << 20)
                        self.log(f"    {self.raw * 100 // total:3d}% of {total >> 20} MiB "
                                 f"({self.sent >> 20} MiB sent, {rate:.1f} MiB/s)")
                        next_note += 0.1
        tail = deflate.flush()
        self.sent += len(tail)
        yield tail
        if self.digest.hexdigest() != self.new.sha256:
            raise UpdateError(f"{self.new.image.name} does not match its manifest's sha256 (changed since "
                              "the build?): the device refuses it; rebuild")


class _Cut(Exception):
    """A simulated cable pull (tests)."""


@dataclasses.dataclass(frozen=True)
class Report:
    """What ./do update did: old and new versions, the slot, the bytes and seconds."""

    old: dict[str, Any]
    new: dict[str, Any]
    slot: int
    mapped_bytes: int = 0
    sent_bytes: int = 0
    stream_seconds: float = 0.0
    total_seconds: float = 0.0

    def lines(self) -> list[str]:
        keys = ("debian", "kernel", "clef", "agent", "contract", "security_updates")
        out = [f"{k}: {self.old.get(k)} -> {self.new.get(k)}" for k in keys
               if self.old.get(k) is not None or self.new.get(k) is not None]
        if self.mapped_bytes:
            out.append(f"sent {self.sent_bytes >> 20} MiB for {self.mapped_bytes >> 20} MiB of system "
                       f"in {self.stream_seconds:.0f} s")
        out.append(f"slot {self.slot} boots; {self.total_seconds:.0f} s in all")
        return out


def _facts(hello: contract.Hello, slots: contract.Slots) -> dict[str, Any]:
    release = slots.release or {}
    return {**release, "debian": slots.debian_version, "kernel": slots.kernel, "agent": hello.agent_version,
            "contract": hello.contract}


def _survey(device: Device) -> tuple[contract.Hello, contract.Slots]:
    hello = device.hello()
    if hello.contract < 2:
        raise ContractError(f"device runs contract {hello.contract}, from before A/B updates: "
                            "re-flash it (docs/updating.md)")
    return hello, contract.Slots.from_json(device.frozen("slots"))


def install(device: Device, new: NewSystem, log: Log,
            cut_after: int | None = None) -> tuple[int, Stream, float]:
    """Write, verify and activate the new system in the inactive slot; returns (slot, stream, seconds)."""
    hello, slots = _survey(device)
    check_compatible(new, hello, slots)
    target = slots.inactive
    log(f"writing {new.mapped_bytes >> 20} MiB of system into slot {target} "
        f"({slots.slot(target).device}) over SSH")
    stream = Stream(new, log, cut_after)
    request = contract.WriteSlot(slot=target, ranges=[[o, n] for o, n in new.ranges], sha256=new.sha256,
                                 release=new.release())
    t0 = time.monotonic()
    try:
        device.frozen("write-slot", request, stream=stream, timeout=3600.0)
    except _Cut:
        device.conn.close()
        raise UpdateError("the stream was cut (simulated cable pull): the device still boots "
                          f"slot {slots.running}; run ./do update again") from None
    took = time.monotonic() - t0
    log(f"slot {target} written and read back ({stream.sent >> 20} MiB sent in {took:.0f} s); "
        "making it the one that boots")
    device.frozen("activate-slot", contract.ActivateSlot(slot=target,
                                                         extlinux=extlinux_for(new, slots.disk_id, target)))
    return target, stream, took


def rollback(device: Device, log: Log) -> int:
    """Mark the other slot bootable again (it must hold a complete system); returns it."""
    _, slots = _survey(device)
    target = slots.inactive
    if not slots.slot(target).complete:
        raise UpdateError(f"slot {target} holds no complete system to go back to")
    log(f"making slot {target} the one that boots again")
    device.frozen("activate-slot", contract.ActivateSlot(slot=target))
    return target


def wait_for_reboot(session: Session, boot_id: str, timeout: float) -> tuple[contract.Hello, contract.Slots]:
    """The device's hello and slots once it has rebooted, over a new login with the pinned host key. The
    system still shutting down answers for a moment after "reboot" returns: the one that came back has a
    new boot id (a device too old to report one must first have gone away)."""
    deadline = time.monotonic() + timeout
    last, gone = "", False
    while time.monotonic() < deadline:
        conn: Connection | None = None
        try:
            conn, device = session.open()
            hello, slots = _survey(device)
        except ProvisionError as e:
            if isinstance(e, (HostKeyError, ContractError)):
                raise
            last, gone = str(e), True
        else:
            if (slots.boot_id != boot_id) if slots.boot_id else gone:
                return hello, slots
            last = "still the system from before the reboot"
        finally:
            if conn is not None:
                conn.close()
        time.sleep(3.0)
    raise UpdateError(f"the device did not come back within {timeout:.0f} s ({last}); if it does not boot, "
                      "recover it with ./do flash --system-only (docs/updating.md)")


def wait_for_agent(session: Session, state: str, timeout: float) -> dict[str, Any]:
    if session.link is None:
        return {}
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            health = session.link.health()
            if health.get("state") == state:
                return health
            last = health.get("state")
        except ProvisionError as e:
            last = str(e)
        time.sleep(2.0)
    raise UpdateError(f"the agent did not report {state!r} within {timeout:.0f} s (last: {last})")


def update(session: Session, new: NewSystem | None, *, log: Log = print,
           after_reboot: Callable[[], None] | None = None, boot_timeout: float = 900.0,
           cut_after: int | None = None) -> Report:
    """Install ``new`` (or, with None, roll back to the other slot), reboot, and check the device is
    back on that slot with the same host key and the agent locked. ``after_reboot`` is called once
    the reboot was asked for (the emulator restarts its machine there)."""
    started = time.monotonic()
    conn, device = session.open()
    with conn:
        hello, slots = _survey(device)
        old, boot_id = _facts(hello, slots), slots.boot_id
        if new is None:
            target, stream, took = rollback(device, log), None, 0.0
        else:
            target, stream, took = install(device, new, log, cut_after)
        log("rebooting the device")
        device.frozen("reboot")
    if after_reboot is not None:
        after_reboot()
    hello, slots = wait_for_reboot(session, boot_id, boot_timeout)
    if slots.running != target:
        raise UpdateError(f"the device came back on slot {slots.running}, not {target}: the new system did "
                          "not boot (the old one still works; see docs/updating.md)")
    wait_for_agent(session, "locked", boot_timeout)
    return Report(old, _facts(hello, slots), target, new.mapped_bytes if new else 0,
                  stream.sent if stream else 0, took, time.monotonic() - started)

