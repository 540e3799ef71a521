"""`./do run-qemu` refuses bad inputs in one line and leaves no interface behind.

Each test runs the real command line inside a network namespace it made (10.0.0.x never in the default
namespace). Nothing here boots a guest: every refusal comes before QEMU starts. The paths that do boot (the
tap removed after Ctrl-C and after QEMU is killed) are in tests/test_system.py, on its one guest.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns_helpers import ip, links, namespace, run_do

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture
def ns() -> Iterator[str]:
    with namespace("rq") as name:
        yield name


def _build_dir(tmp_path: Path, board: str) -> Path:
    """What find_image reads of a build (no real image: nothing here gets as far as booting)."""
    out = tmp_path / board
    out.mkdir()
    (out / "clef-armory-qemu-trixie.img").write_bytes(b"\0" * 4096)
    (out / "u-boot.bin").write_bytes(b"\0" * 4096)
    (out / "known_hosts").write_text("10.0.0.1 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB1n0wkKHQ2D\n")
    (out / "manifest.json").write_text(json.dumps({"board": board, "files": {"firmware": "u-boot.bin"}}))
    return out / "clef-armory-qemu-trixie.img"


def _one_line_error(result: object) -> str:
    import subprocess

    assert isinstance(result, subprocess.CompletedProcess)
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    errors = [line for line in result.stderr.splitlines() if not line.startswith("clef-armory:")]
    assert len(errors) == 1 and errors[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "booting" not in result.stdout, "QEMU was started"
    return str(errors[0])


def test_tap_name_taken(ns: str, tmp_path: Path) -> None:
    image = _build_dir(tmp_path, "qemu")
    ip("link", "add", "armory0", "type", "veth", "peer", "name", "other0", ns=ns)
    line = _one_line_error(run_do(ns, "run-qemu", "--image", str(image)))
    assert "interface armory0 already exists" in line and "--tap NAME" in line, line
    assert sorted(links(ns)) == ["armory0", "lo", "other0"]  # someone else's interface is left alone
    # --tap picks another name; then 10.0.0.0/24 on other0 is what is in the way.
    ip("addr", "add", "10.0.0.9/24", "dev", "other0", ns=ns)
    line = _one_line_error(run_do(ns, "run-qemu", "--image", str(image), "--tap", "armory7"))
    assert "10.0.0.0/24 is already in use on this machine (other0 10.0.0.9/24)" in line, line
    assert sorted(links(ns)) == ["armory0", "lo", "other0"]


def test_network_taken_by_a_real_armory(ns: str, tmp_path: Path) -> None:
    """A plugged-in armory gives the laptop 10.0.0.2/24 on its USB NIC: the guest must not collide."""
    image = _build_dir(tmp_path, "qemu")
    ip("link", "add", "usb0", "type", "veth", "peer", "name", "peer0", ns=ns)
    ip("addr", "add", "10.0.0.2/24", "dev", "usb0", ns=ns)
    line = _one_line_error(run_do(ns, "run-qemu", "--image", str(image)))
    assert "10.0.0.0/24 is already in use" in line and "usb0 10.0.0.2/24" in line, line
    assert "armory0" not in links(ns)


def test_not_a_qemu_image(ns: str, tmp_path: Path) -> None:
    image = _build_dir(tmp_path, "mk2")
    line = _one_line_error(run_do(ns, "run-qemu", "--image", str(image)))
    assert "is built for board 'mk2', not qemu" in line, line
    assert links(ns) == ["lo"]


def test_bad_tap_name_and_link(ns: str, tmp_path: Path) -> None:
    image = _build_dir(tmp_path, "qemu")
    line = _one_line_error(run_do(ns, "run-qemu", "--image", str(image), "--tap", "no/such:name"))
    assert "is not a usable interface name" in line, line
    line = _one_line_error(run_do(ns, "run-qemu", "--image", str(image), "--link", "bridge"))
    assert "--link 'bridge'" in line and "user" in line, line
    assert links(ns) == ["lo"]


def test_without_cap_net_admin_names_the_user_link(ns: str, tmp_path: Path) -> None:
    """Root without CAP_NET_ADMIN stands for a normal user: the message says how to do without."""
    image = _build_dir(tmp_path, "qemu")
    import subprocess

    from tests.netns_helpers import REPO

    result = subprocess.run(
        ["ip", "netns", "exec", ns, "setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin",
         str(REPO / "do"), "run-qemu", "--image", str(image)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    line = _one_line_error(result)
    assert "needs CAP_NET_ADMIN" in line and "--link user" in line and "sudo ./do run-qemu" in line, line
    assert links(ns) == ["lo"]


def test_via_flags_are_host_port(ns: str, tmp_path: Path) -> None:
    """--ssh-via / --agent-via take HOST:PORT; a bad one is refused before anything is dialled."""
    kh = tmp_path / "known_hosts"
    kh.write_text("")
    for flag in ("--ssh-via", "--agent-via"):
        result = run_do(ns, "status", "--known-hosts", str(kh), flag, "127.0.0.1")
        line = _one_line_error(result)
        assert f"{flag} '127.0.0.1' is not HOST:PORT" in line, line


# -- pure logic: the tap guest's command line and addresses, --*-via parsing, the capability check ----------


def test_tap_guest_dials_the_device_itself(tmp_path: Path) -> None:
    from clef_armory import config
    from provision import qemu

    image = qemu.find_image(config.Settings(board="qemu", output_dir=tmp_path), _build_dir(tmp_path, "qemu"))
    guest = qemu.QemuGuest(image, workdir=tmp_path / "run", tap="armory0")
    guest.workdir, guest.overlay = tmp_path / "run", tmp_path / "run" / "disk.qcow2"
    guest._files = {"u-boot.bin": image.firmware}
    command = " ".join(guest._command())
    assert "-netdev tap,id=n,ifname=armory0,script=no,downscript=no" in command
    assert "hostfwd" not in command and "user," not in command
    assert "virtio-net-device,netdev=n,mac=1a:55:89:a2:69:41" in command  # the device's MAC
    target = guest.ssh_target()
    assert (target.host, target.port, target.known_hosts) == ("10.0.0.1", 22, image.known_hosts)
    link = guest.link()
    assert (link.host, link.port, link.connect) == ("10.0.0.1", 8550, None)


def test_via_parsing() -> None:
    from clef_armory.errors import ConfigError
    from provision.commands import parse_via

    assert parse_via("127.0.0.1:2222", "--ssh-via") == ("127.0.0.1", 2222)
    assert parse_via("[::1]:8550", "--agent-via") == ("::1", 8550)
    for bad in ("127.0.0.1", ":22", "host:0", "host:70000", "host:x"):
        with pytest.raises(ConfigError, match="is not HOST:PORT"):
            parse_via(bad, "--ssh-via")


def test_via_session_keeps_the_device_identity(tmp_path: Path) -> None:
    """--ssh-via/--agent-via change only where sockets go: the host key looked up is 10.0.0.1's and the
    agent is spoken to as 10.0.0.1:8550 (its Host header)."""
    import socket

    from clef_armory import config
    from provision.commands import session_for

    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        session = session_for(config.Settings(board="qemu", output_dir=tmp_path), "10.0.0.1",
                              ssh_via=f"127.0.0.1:{port}", agent_via=f"127.0.0.1:{port}")
        assert (session.target.host, session.target.port) == ("10.0.0.1", 22)
        assert session.target.known_hosts == tmp_path / "qemu" / "known_hosts"
        assert session.link is not None and (session.link.host, session.link.port) == ("10.0.0.1", 8550)
        assert session.ssh_socket is not None and session.link.connect is not None
        for sock in (session.ssh_socket(), session.link.connect("10.0.0.1", 8550, 5.0)):
            with sock, server.accept()[0]:
                assert sock.getpeername() == ("127.0.0.1", port)


def test_cap_net_admin_is_read_from_the_effective_set(tmp_path: Path) -> None:
    from provision.tap import has_net_admin

    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapEff:\t000001ffffffffff\n")
    assert has_net_admin(status)
    status.write_text("Name:\tx\nCapEff:\t0000000000000000\n")
    assert not has_net_admin(status)
    status.write_text("Name:\tx\nCapEff:\t0000000000001000\n")  # bit 12 alone
    assert has_net_admin(status)
