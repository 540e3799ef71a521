"""The laptop's end of the USB cable, for the emulated device: a tap interface at 10.0.0.2/24.

A USB armory plugged in gives the laptop one Ethernet interface (CDC-ECM) with 10.0.0.2/24 on it and the
device at 10.0.0.1; nothing routes through it. ``tap_link`` makes the same for the qemu board: a tap named
like a USB NIC (``armory0``), the laptop side's address and MAC, no gateway, no NAT, forwarding off on it.
QEMU attaches the guest's NIC (the device's MAC) to it, so ``./do provision --host 10.0.0.1``, ``curl`` and
``geth --signer`` reach the guest as they reach a real device.

The interface is ours only if we made it: we refuse when its name exists or when 10.0.0.0/24 is already on
any interface (a real armory plugged in, another guest), and we delete it when the with-block ends, also on
Ctrl-C, SIGTERM/SIGHUP (``signals_as_interrupt``) and when QEMU dies. Making it needs CAP_NET_ADMIN.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from armory_agent import usblink
from clef_armory.errors import PrerequisiteError, QemuError

DEFAULT_NAME = "armory0"
HOST_INTERFACE = ipaddress.IPv4Interface(f"{usblink.HOST_ADDRESS}/{usblink.PREFIX}")
NETWORK = HOST_INTERFACE.network
HOST_MAC = usblink.HOST_MAC  # what the laptop's USB NIC gets from the device
_CAP_NET_ADMIN = 12
# Linux interface names: 1..15 bytes, no '/', ':' or whitespace.
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


@dataclasses.dataclass(frozen=True)
class Tap:
    """The tap as made: its name and the laptop side's address and MAC."""

    name: str
    address: ipaddress.IPv4Interface = HOST_INTERFACE
    mac: str = HOST_MAC


def has_net_admin(status: Path = Path("/proc/self/status")) -> bool:
    """Whether this process may create interfaces (CAP_NET_ADMIN in its effective set)."""
    for line in status.read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> _CAP_NET_ADMIN & 1)
    return False


def _ip(*args: str, what: str) -> str:
    """Run ``ip ARGS``; a failure is one line naming what we were doing."""
    try:
        result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=30)
    except OSError as e:
        raise QemuError(f"cannot run ip ({what}): {e.strerror}") from None
    except subprocess.TimeoutExpired:
        raise QemuError(f"ip did not answer within 30 s ({what})") from None
    if result.returncode != 0:
        why = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        raise QemuError(f"{what} failed: {why}")
    return result.stdout


def interface_exists(name: str) -> bool:
    result = subprocess.run(["ip", "-o", "link", "show", "dev", name], capture_output=True, check=False,
                            timeout=30)
    return result.returncode == 0


def users_of_network(network: ipaddress.IPv4Network = NETWORK) -> list[str]:
    """'interface address' for every IPv4 address on this machine that overlaps ``network``."""
    found = []
    for line in _ip("-o", "-4", "addr", "show", what="listing addresses").splitlines():
        fields = line.split()
        if "inet" not in fields:
            continue
        iface = ipaddress.IPv4Interface(fields[fields.index("inet") + 1])
        if iface.network.overlaps(network):
            found.append(f"{fields[1]} {iface}")
    return found


def check_free(name: str) -> None:
    """Refuse before anything is made: a bad name, no CAP_NET_ADMIN, a taken name or 10.0.0.0/24."""
    if not _NAME.match(name):
        raise QemuError(f"--tap {name!r} is not a usable interface name: 1-15 letters, digits, '.', '_', '-'")
    if shutil.which("ip") is None:
        raise PrerequisiteError("ip (iproute2) is missing: run sudo apt-get install -y iproute2")
    if not has_net_admin():
        raise PrerequisiteError(
            f"the real link needs CAP_NET_ADMIN to make interface {name}: run sudo ./do run-qemu, "
            "or use --link user (loopback ports, no root)")
    if not Path("/dev/net/tun").exists():
        raise PrerequisiteError("/dev/net/tun is missing: run sudo modprobe tun")
    if interface_exists(name):
        raise QemuError(f"interface {name} already exists (another guest? remove it with "
                        f"sudo ip link del {name}, or choose --tap NAME)")
    taken = users_of_network()
    if taken:
        raise QemuError(f"{NETWORK} is already in use on this machine ({', '.join(taken)}): unplug the "
                        "USB armory or stop the other guest first")


@contextlib.contextmanager
def tap_link(name: str = DEFAULT_NAME) -> Iterator[Tap]:
    """Make the tap (checked free first), yield it, and delete it however the block ends."""
    check_free(name)
    tap = Tap(name)
    _ip("tuntap", "add", "dev", name, "mode", "tap", what=f"creating tap {name}")
    try:
        _ip("link", "set", "dev", name, "address", tap.mac, what=f"setting {name}'s MAC")
        _ip("addr", "add", str(tap.address), "dev", name, what=f"giving {name} {tap.address}")
        # A USB NIC is an end, not a router: nothing is forwarded between it and other interfaces.
        with contextlib.suppress(OSError):
            Path(f"/proc/sys/net/ipv4/conf/{name}/forwarding").write_text("0\n")
        _ip("link", "set", "dev", name, "up", what=f"bringing {name} up")
        yield tap
    finally:
        remove(name)


def remove(name: str) -> None:
    """Delete the interface if it is there (idempotent: QEMU or a signal may have got there first)."""
    if interface_exists(name):
        subprocess.run(["ip", "link", "del", "dev", name], capture_output=True, check=False, timeout=30)


class _Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, so with-blocks unwind as after Ctrl-C."""


@contextlib.contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """Inside the block, SIGTERM and SIGHUP unwind like Ctrl-C (so the tap and the guest are cleaned up)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise _Terminated(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
