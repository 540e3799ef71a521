"""The typed, versioned contract between the laptop (provision/) and the device's helper
(armory_agent.device_admin), shared by both sides; standard library only (it runs on the device).

Every request carries the laptop's contract ``VERSION``; the device answers ``hello`` with its own.
When they differ the laptop stops with "device runs contract N, this laptop needs M: run ./do update"
before asking for anything. The calls ``./do update`` needs (``FROZEN``) keep their names and request
and response shapes in every later version (fields may only be added, with defaults), so a newer
laptop can always update an older device. ``from_json`` ignores fields it does not know for the same
reason. History: 1 = the untyped helper before the A/B layout (no ``hello``); 2 = this module.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

VERSION = 2
# Callable on a device of any contract >= 2, whatever the laptop's version.
FROZEN = ("hello", "slots", "write-slot", "activate-slot", "reboot")
# The device of contract 1 has no ``hello``: its usage error names the commands it knows.
NO_HELLO = 1

T = TypeVar("T", bound="Message")


class Message:
    """A dataclass that travels as a JSON object."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload, no-any-return]

    @classmethod
    def from_json(cls: type[T], data: Any) -> T:
        """The message from a JSON object: unknown fields are ignored, missing ones take their
        defaults; a missing field without a default or a wrong type is a ValueError."""
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__}: expected an object, got {type(data).__name__}")
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):  # type: ignore[arg-type]
            if field.name in data:
                values[field.name] = _check(cls.__name__, field, data[field.name])
            elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ValueError(f"{cls.__name__}: missing field {field.name!r}")
        return cls(**values)


_TYPES: dict[str, type | tuple[type, ...]] = {
    "int": int, "str": str, "bool": bool, "list": list, "dict": dict, "float": (int, float),
}


def _check(name: str, field: dataclasses.Field[Any], value: Any) -> Any:
    text = str(field.type)
    optional = text.endswith("| None")
    base = text.removesuffix("| None").strip().split("[", 1)[0]
    if value is None and optional:
        return value
    allowed = _TYPES.get(base)
    wrong_bool = isinstance(value, bool) and base != "bool"
    if allowed is not None and (not isinstance(value, allowed) or wrong_bool):
        raise ValueError(f"{name}.{field.name}: expected {text}, got {type(value).__name__}")
    return value


# -- hello (frozen) ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Hello(Message):
    """Who the device is: its contract, agent version and board (from /etc/clef-armory/release.json)."""

    contract: int
    agent_version: str
    board: str = ""
    frozen: list[str] = dataclasses.field(default_factory=lambda: list(FROZEN))


# -- slots (frozen) ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Slot(Message):
    number: int  # MBR partition number: 1 = A, 2 = B
    device: str  # /dev/vda2, /dev/mmcblk0p2
    size: int
    complete: bool  # holds a whole, verified system (the running one always does)
    release: dict[str, Any] | None = None  # its /etc/clef-armory/release.json, when known


@dataclasses.dataclass(frozen=True)
class Slots(Message):
    """The disk's system slots: which one runs, which one is marked bootable."""

    disk: str  # /dev/vda
    disk_id: str  # the MBR's disk id, 8 hex digits (PARTUUID = <disk_id>-<nn>)
    running: int
    bootable: int  # 0: none marked (U-Boot then boots partition 1)
    slots: list[dict[str, Any]]  # Slot.to_json() each
    release: dict[str, Any] | None = None  # the running system's release.json
    debian_version: str = ""
    kernel: str = ""
    # /proc/sys/kernel/random/boot_id: new on every boot, so ./do update can tell the system that came
    # back from the one still shutting down ("" from a device that predates the field).
    boot_id: str = ""

    def slot(self, number: int) -> Slot:
        for s in self.slots:
            if s.get("number") == number:
                return Slot.from_json(s)
        raise ValueError(f"the device has no system slot {number}")

    @property
    def inactive(self) -> int:
        return 2 if self.running == 1 else 1


# -- write-slot (frozen): the request is followed on stdin by the zlib stream of the mapped bytes -----


@dataclasses.dataclass(frozen=True)
class WriteSlot(Message):
    slot: int
    ranges: list[list[int]]  # [offset in the slot, length], in order: where the stream's bytes go
    sha256: str  # of the stream's bytes (decompressed), in order
    release: dict[str, Any] | None = None  # recorded for the slot once verified


@dataclasses.dataclass(frozen=True)
class SlotWritten(Message):
    slot: int
    bytes_written: int
    sha256: str  # read back from the slot after writing
    seconds: float = 0.0


# -- activate-slot (frozen) --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ActivateSlot(Message):
    """Make ``slot`` the one that boots: write its extlinux.conf (when given), mark it bootable."""

    slot: int
    extlinux: str | None = None


@dataclasses.dataclass(frozen=True)
class Activated(Message):
    slot: int
    previous: int


# -- reboot (frozen) ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rebooting(Message):
    seconds: float  # the reboot starts this long after the answer


def mismatch(device: int, laptop: int) -> str:
    """The one line shown when the two sides cannot talk (what to do included)."""
    if device < laptop:
        return f"device runs contract {device}, this laptop needs {laptop}: run ./do update"
    return f"device runs contract {device}, this laptop needs {laptop}: update this checkout (git pull)"
