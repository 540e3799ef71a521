"""Where things live on the device: every path, user and command provisioning relies on.

The defaults are the image's layout (docs/design.md). Tests override single fields to
point a "device" at a temporary directory on this machine. The layout travels to the
device-side helper (``armory_agent.device_admin``) as JSON on stdin, so both halves
always agree on paths without anything being assembled on a command line.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from armory_agent.usblink import AGENT_PORT, CLEF_HTTP_PORT, DEVICE_ADDRESS, HOST_ADDRESS, SSH_PORT
from clef_armory.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DeviceLayout:
    """The device's paths, users and commands (image defaults)."""

    # How to start the device-side helper (runs as root; reads JSON on stdin).
    admin_command: tuple[str, ...] = ("sudo", "-n", "python3", "-m", "armory_agent.device_admin")
    # Clef and its service user.
    clef: str = "/usr/local/bin/clef"
    clef_user: str = "clef"
    # Prefix that runs a command as clef_user from root; empty when already that user.
    as_clef_user: tuple[str, ...] = ("runuser", "-u", "clef", "--")
    lightkdf: bool = False  # tests only: cheaper scrypt for new keys; never on a real device
    # The agent's subtree of the data partition (mounted at /var/lib/clef-armory).
    state_dir: str = "/var/lib/clef-armory/agent"
    configdir: str = "/var/lib/clef-armory/agent/clef"
    keystore: str = "/var/lib/clef-armory/agent/keystore"
    rules: str = "/var/lib/clef-armory/agent/rules.js"
    # Public record of the attested rules hash, written only after a successful attest.
    rules_record: str = "/var/lib/clef-armory/agent/rules.js.sha256"
    # Where new keys are made before they join the keystore (same filesystem: rename is atomic).
    staging_dir: str = "/var/lib/clef-armory/agent/staging"
    # The agent.
    agent_config: str = "/etc/clef-armory/agent.toml"
    agent_config_mode: int = 0o640
    agent_config_group: str = "clef"
    agent_restart: tuple[str, ...] = ("systemctl", "restart", "clef-armory-agent")
    agent_command: tuple[str, ...] = ("python3", "-m", "armory_agent")
    agent_pythonpath: str = ""  # tests only: where armory_agent lives when it is not installed
    # Expected listeners (host:port).
    agent_listen: str = f"{DEVICE_ADDRESS}:{AGENT_PORT}"
    clef_listen: str = f"127.0.0.1:{CLEF_HTTP_PORT}"
    sshd_listen: str = f"{DEVICE_ADDRESS}:{SSH_PORT}"
    # UDP sockets allowed on a non-loopback address (the DHCP server on usb0).
    allowed_udp: tuple[str, ...] = ("0.0.0.0:67", f"{DEVICE_ADDRESS}:67")
    # Checks.
    sshd_effective_config: tuple[str, ...] = (
        "sshd", "-T", "-C", f"user=armory,host=laptop,addr={HOST_ADDRESS}"
    )
    journal_command: tuple[str, ...] = ("journalctl", "--no-pager", "--output=cat", "--all")
    search_roots: tuple[str, ...] = ("/",)
    search_skip: tuple[str, ...] = ("/proc", "/sys", "/dev")
    nft_command: tuple[str, ...] = ("nft", "-j", "list", "ruleset")

    def __post_init__(self) -> None:
        for name in ("agent_listen", "clef_listen", "sshd_listen"):
            host, sep, port = getattr(self, name).rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ConfigError(f"layout {name} must be HOST:PORT, not {getattr(self, name)!r}")
        if not self.admin_command:
            raise ConfigError("layout admin_command must not be empty")

    def as_json(self) -> dict[str, Any]:
        """The layout as plain JSON types, for the device-side helper."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> DeviceLayout:
        return dataclasses.replace(self, **changes)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


DEFAULT = DeviceLayout()
