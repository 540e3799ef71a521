"""Settings: one frozen dataclass fed from ``invoke.yaml`` and task flags.

``invoke.yaml`` holds every default under its ``armory:`` key. Task flags
override single fields. Library code receives a ``Settings`` and never reads
the YAML or the environment itself.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from clef_armory.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULTS_FILE = REPO_ROOT / "invoke.yaml"

BOARDS = ("mk2", "mk1", "qemu")
# The Mk II U-Boot's build switches (the vendor's BOOT, DDR and SoC choices; image/uboot.py).
BOOT_MEDIA = ("uSD", "eMMC")
MEMORY_SIZES = ("512M", "1G")
SOCS = ("imx6ulz", "imx6ul")
# Whether the rootfs takes <suite>-security and <suite>-updates (image/archive.py).
SECURITY_UPDATES = ("include", "require", "off")
_SIZE_RE = re.compile(r"^(\d+)([KMG]?)$")
_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Project-wide settings; see invoke.yaml for what each one means."""

    board: str = "mk2"
    suite: str = "trixie"
    mirror: str = "http://deb.debian.org/debian"
    security_mirror: str = "http://deb.debian.org/debian-security"
    security_updates: str = "include"
    clef_version: str = "1.17.3"
    clef_source: str = "source"
    chain_id: int = 1
    output_dir: Path = Path("build")
    cache_dir: Path = Path("~/.cache/clef-armory")
    image_size: str = "3500M"
    ssh_key: Path = Path("~/.ssh/id_ed25519.pub")
    boot_medium: str = "uSD"
    memory: str = "512M"
    soc: str = "imx6ulz"
    uboot_patch: Path | None = None

    def __post_init__(self) -> None:
        if self.board not in BOARDS:
            raise ConfigError(f"unknown board {self.board!r}: choose one of {', '.join(BOARDS)}")
        check_choice("boot_medium", self.boot_medium, BOOT_MEDIA)
        check_choice("memory", self.memory, MEMORY_SIZES)
        check_choice("soc", self.soc, SOCS)
        check_choice("security_updates", self.security_updates, SECURITY_UPDATES)
        if not _VERSION_RE.match(self.clef_version):
            raise ConfigError(f"clef_version {self.clef_version!r} is not of the form X.Y.Z")
        if not isinstance(self.chain_id, int) or self.chain_id <= 0:
            raise ConfigError(f"chain_id must be a positive integer, not {self.chain_id!r}")
        parse_size(self.image_size)
        for name in ("mirror", "security_mirror"):
            if not getattr(self, name).startswith(("http://", "https://", "file:/")):
                raise ConfigError(f"{name} {getattr(self, name)!r} must be an http(s):// or file:/ URL")

    @property
    def cache_path(self) -> Path:
        """The cache directory with ``~`` expanded."""
        return self.cache_dir.expanduser()

    @property
    def image_size_bytes(self) -> int:
        return parse_size(self.image_size)

    def replace(self, **changes: Any) -> Settings:
        """A copy with the non-None ``changes`` applied (task flags default to None)."""
        return from_mapping({**self.as_dict(), **{k: v for k, v in changes.items() if v is not None}})

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} {value!r} is not one of {', '.join(allowed)}")


def parse_size(text: str) -> int:
    """'3500M' -> bytes. Units K, M, G are powers of 1024; a bare number is bytes."""
    m = _SIZE_RE.match(str(text).strip().upper().removesuffix("IB").removesuffix("B"))
    if not m:
        raise ConfigError(f"size {text!r} is not a number with an optional K, M or G suffix")
    return int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)]


def from_mapping(values: Mapping[str, Any]) -> Settings:
    """Build Settings from a plain mapping, converting and checking each field."""
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
    converted: dict[str, Any] = {}
    for name, value in values.items():
        if value is None:
            continue
        default = fields[name].default
        if isinstance(default, Path) or fields[name].type == "Path | None":
            converted[name] = Path(str(value))
        elif isinstance(default, int) and not isinstance(default, bool):
            try:
                converted[name] = int(str(value), 0)
            except ValueError:
                raise ConfigError(f"setting {name} must be an integer, not {value!r}") from None
        else:
            converted[name] = str(value)
    return Settings(**converted)


def load(path: Path = DEFAULTS_FILE, overrides: Mapping[str, Any] | None = None) -> Settings:
    """Read the ``armory:`` section of ``path`` and apply ``overrides``."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    section = data.get("armory", {})
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: 'armory' must be a mapping")
    merged = {**section, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    return from_mapping(merged)
