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


def _read_yaml(path: Path) -> Any:
    """The YAML document in ``path`` ({} when empty); unreadable or invalid files are a ConfigError."""
    try:
        return yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None


def load(path: Path = DEFAULTS_FILE, overrides: Mapping[str, Any] | None = None) -> Settings:
    """Read the ``armory:`` section of ``path`` and apply ``overrides``."""
    data = _read_yaml(path)
    section = data.get("armory", {})
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: 'armory' must be a mapping")
    merged = {**section, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    return from_mapping(merged)


# --- `./do wallet` (wallet/): its own section, `wallet:` in invoke.yaml ---

DEFAULT_WALLET_PORT = 8552  # not 8545/8546 (anvil, geth), 8550/8551 (the armory, Clef)
_ORIGIN_RE = re.compile(r"^https?://[^/\s]+$")


@dataclasses.dataclass(frozen=True)
class WalletSettings:
    """The wallet endpoint's settings; see invoke.yaml's ``wallet:`` section for what each one means."""

    rpc: str = ""
    listen: str = f"127.0.0.1:{DEFAULT_WALLET_PORT}"
    armory: str = "http://10.0.0.1:8550"
    public: bool = False
    hosts: tuple[str, ...] = ()
    origins: tuple[str, ...] = ()
    gas_margin_percent: int = 20
    node_timeout: float = 30.0
    sign_timeout: float = 130.0

    def __post_init__(self) -> None:
        if not self.rpc:
            raise ConfigError("the wallet needs a node: pass --rpc URL (e.g. http://127.0.0.1:8545)")
        for name, url in (("rpc", self.rpc), ("armory", self.armory)):
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"--{name} {url!r} must be an http:// or https:// URL")
        host, _port = self.listen_address
        if not self.public and not _is_loopback(host):
            raise ConfigError(f"--listen {self.listen} is not a loopback address: add --public to serve "
                              "other machines (anyone who reaches it can ask the armory to sign)")
        for origin in self.origins:
            if not _ORIGIN_RE.match(origin):
                raise ConfigError(f"origin {origin!r} must look like https://app.example[:port]")
        if not 0 <= self.gas_margin_percent <= 500:
            raise ConfigError("gas_margin_percent must be between 0 and 500")
        if self.node_timeout <= 0 or self.sign_timeout <= 0:
            raise ConfigError("node_timeout and sign_timeout must be positive (seconds)")

    @property
    def listen_address(self) -> tuple[str, int]:
        """(host, port) of --listen; IPv6 literals are written [::1]:8552."""
        host, sep, port = self.listen.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"--listen {self.listen!r} must be HOST:PORT, "
                              f"e.g. 127.0.0.1:{DEFAULT_WALLET_PORT}")
        return host, int(port)

    @property
    def allowed_hosts(self) -> frozenset[str]:
        """Host header values accepted (DNS rebinding): the loopback names with the port, --listen, extras."""
        host, port = self.listen_address
        names = {f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", self.listen.lower()}
        if ":" in host:
            names.add(f"[{host}]:{port}")
        return frozenset(names | {h.lower() for h in self.hosts})


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def wallet_from_mapping(values: Mapping[str, Any]) -> WalletSettings:
    """WalletSettings from invoke.yaml's ``wallet:`` mapping plus flags (None = not given)."""
    fields = {f.name: f for f in dataclasses.fields(WalletSettings)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown wallet setting(s): {', '.join(unknown)}")
    converted: dict[str, Any] = {}
    for name, value in values.items():
        if value is None:
            continue
        default = fields[name].default
        try:
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ValueError
                converted[name] = value
            elif isinstance(default, tuple):
                items = value.split(",") if isinstance(value, str) else list(value)
                converted[name] = tuple(str(x).strip() for x in items if str(x).strip())
            elif isinstance(default, int):
                converted[name] = int(str(value), 0)
            elif isinstance(default, float):
                converted[name] = float(value)
            else:
                converted[name] = str(value)
        except (TypeError, ValueError):
            raise ConfigError(f"wallet setting {name} has the wrong type: {value!r}") from None
    return WalletSettings(**converted)


def load_wallet(path: Path = DEFAULTS_FILE, overrides: Mapping[str, Any] | None = None) -> WalletSettings:
    """Read the ``wallet:`` section of ``path`` and apply ``overrides``."""
    data = _read_yaml(path)
    section = data.get("wallet") or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: 'wallet' must be a mapping")
    return wallet_from_mapping({**section, **{k: v for k, v in (overrides or {}).items() if v is not None}})
