"""Render ``overlay/`` into a root filesystem tree from one ``DeviceConfig``.

Every file that lands on the device is a jinja2 template under ``overlay/`` at its device path
(``overlay/etc/nftables.conf.j2`` -> ``/etc/nftables.conf``); files without ``.j2`` are copied as
they are. A template that renders to nothing but whitespace is not installed, which is how a
board-specific file (``extlinux.conf`` on the USB armory, the gadget script) stays out of the
other boards' images. Owners and modes that are not root:root 0644 are listed in ``MODES``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jinja2

from armory_agent import config as agent_config
from armory_agent import usblink
from clef_armory.errors import BuildError
from image.boards import Board

OVERLAY_DIR = Path(__file__).resolve().parent.parent / "overlay"

# Device path -> (owner, group, mode). Everything else rendered is root:root 0644 (dirs 0755).
MODES: dict[str, tuple[str, str, int]] = {
    "/etc/clef-armory/agent.toml": ("root", "clef", 0o640),
    "/etc/sudoers.d/armory": ("root", "root", 0o440),
    "/etc/initramfs-tools/hooks/armory-drivers": ("root", "root", 0o755),
    "/usr/local/lib/clef-armory/usb-gadget": ("root", "root", 0o755),
    "/var/lib/clef-armory/ssh/authorized_keys/armory": ("root", "root", 0o644),
}

USB_FUNCTIONS = ("ecm", "rndis", "ncm")

# Templates provisioning renders on the device later (the agent's state starts empty in the image).
PROVISIONED_LATER = ("var/lib/clef-armory/agent/",)


@dataclasses.dataclass(frozen=True)
class Network:
    """The USB link; values from docs/design.md."""

    interface: str = usblink.INTERFACE
    device_address: str = usblink.DEVICE_ADDRESS
    host_address: str = usblink.HOST_ADDRESS
    prefix: int = usblink.PREFIX
    device_mac: str = usblink.DEVICE_MAC
    host_mac: str = usblink.HOST_MAC
    # ecm: CDC-ECM (Linux, macOS); rndis or ncm: for Windows hosts (one function, always usb0).
    usb_function: str = "ecm"
    # pid.codes test/vendor ID the USB armory project uses for custom gadgets.
    usb_vendor_id: str = "0x1209"
    usb_product_id: str = "0x2702"


@dataclasses.dataclass(frozen=True)
class SystemRecord:
    """What the system knows about itself (``/etc/clef-armory/system.json``): ``./do status`` shows it,
    and it says whether the image was built with Debian's security updates."""

    suite: str = ""
    debian_version: str = ""  # the point release the rootfs was built from, e.g. 13.8
    security_updates: str = ""  # "included", "off" or "unavailable: <reason>"
    archives: tuple[str, ...] = ()  # "deb URI SUITE main (Date)" for each archive used
    agent_version: str = ""


@dataclasses.dataclass(frozen=True)
class DeviceConfig:
    """The one object every template sees (as ``cfg``). Its digest goes into the manifest."""

    board: Board
    suite: str
    kernel_version: str
    root: str  # the kernel's root= value
    authorized_key: str  # one OpenSSH public key line for the admin user
    hostname: str = "armory"
    admin_user: str = "armory"
    service_user: str = "clef"
    agent_port: int = usblink.AGENT_PORT
    clef_http_port: int = usblink.CLEF_HTTP_PORT
    chain_id: int = 1
    clef_version: str = ""
    network: Network = Network()
    dtb_path: str | None = None  # device path of the board's dtb (extlinux boards)
    system: SystemRecord = SystemRecord()

    def __post_init__(self) -> None:
        if self.network.usb_function not in USB_FUNCTIONS:
            raise BuildError(
                f"unknown USB network function {self.network.usb_function!r}: "
                f"choose one of {', '.join(USB_FUNCTIONS)}"
            )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()


def environment(overlay_dir: Path) -> jinja2.Environment:
    """The templates' jinja2 setup; ``agent_defaults`` (the agent's dataclass defaults) is global, so
    agent.toml takes every value it does not set from the one place they are defined."""
    env = jinja2.Environment(  # noqa: S701 - config files, not HTML
        loader=jinja2.FileSystemLoader(str(overlay_dir)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals["agent_defaults"] = agent_config.defaults()
    return env


def render_all(cfg: DeviceConfig, overlay_dir: Path = OVERLAY_DIR) -> dict[str, bytes]:
    """Device path -> content for every overlay file this config installs (pure; used by tests)."""
    env = environment(overlay_dir)
    rendered: dict[str, bytes] = {}
    for src in sorted(p for p in overlay_dir.rglob("*") if p.is_file()):
        rel = src.relative_to(overlay_dir).as_posix()
        if "__pycache__" in rel or rel.startswith(PROVISIONED_LATER):
            continue
        if rel.endswith(".j2"):
            try:
                text = env.get_template(rel).render(cfg=cfg)
            except jinja2.TemplateError as e:
                raise BuildError(f"overlay/{rel}: {e}") from None
            if not text.strip():
                continue
            rendered["/" + rel.removesuffix(".j2")] = text.encode()
        else:
            rendered["/" + rel] = src.read_bytes()
    return rendered


def install(
    tree: Path, rendered: dict[str, bytes], uid_of: dict[str, int], gid_of: dict[str, int]
) -> list[str]:
    """Write rendered files into `tree` with their owners and modes; returns the device paths."""
    for device_path, content in rendered.items():
        dest = tree / device_path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_symlink() or dest.exists():
            dest.unlink()
        owner, group, mode = MODES.get(device_path, ("root", "root", 0o644))
        dest.write_bytes(content)
        os.chown(dest, uid_of[owner], gid_of[group])
        os.chmod(dest, mode)
    return sorted(rendered)


def copy_tree(src: Path, dest: Path) -> None:
    """Copy a Python package into the image: root-owned, 0644 files and 0755 dirs, no caches."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for path in [dest, *dest.rglob("*")]:
        os.chown(path, 0, 0, follow_symlinks=False)
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
