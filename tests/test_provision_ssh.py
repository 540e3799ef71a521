"""SSH with a pinned host key against a real sshd in a test network namespace."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from clef_armory.errors import HostKeyError, ProvisionError
from provision import ssh
from tests.sshd_helpers import DEVICE_IP, Link, Sshd, sshd, usb_link, write_known_hosts

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Link, Sshd]]:
    with usb_link() as link, sshd(tmp_path_factory.mktemp("sshd"), link) as s:
        yield link, s


def _target(s: Sshd, known_hosts: Path | None = None, identity: Path | None = None) -> ssh.Target:
    return ssh.Target(host=DEVICE_IP, port=s.port, user="root", identity=identity or s.client_key,
                      known_hosts=known_hosts or s.known_hosts, timeout=5.0)


def _connect(link: Link, target: ssh.Target) -> ssh.Connection:
    return ssh.connect(target, sock=link.connect(DEVICE_IP, target.port, 5.0))


def _log_after(s: Sshd, offset: int) -> str:
    time.sleep(0.3)  # sshd writes its log line when the connection closes
    return s.log.read_text()[offset:]


def test_pinned_key_connects_and_runs_with_stdin(server: tuple[Link, Sshd]) -> None:
    link, s = server
    with _connect(link, _target(s)) as conn:
        result = conn.run(["cat"], stdin=b"only on stdin\n")
    assert result.status == 0
    assert result.stdout == b"only on stdin\n"


def test_changed_host_key_refused_with_both_fingerprints_before_login(
    server: tuple[Link, Sshd], tmp_path: Path
) -> None:
    link, s = server
    other = paramiko.Ed25519Key.from_private_key_file(str(s.client_key))  # any other ed25519 key
    known = tmp_path / "known_hosts"
    write_known_hosts(known, DEVICE_IP, s.port, other)
    offset = len(s.log.read_text())
    with pytest.raises(HostKeyError) as e:
        _connect(link, _target(s, known))
    message = str(e.value)
    assert "\n" not in message
    assert "HOST KEY CHANGED" in message
    assert ssh.fingerprint(other) in message  # pinned
    assert ssh.fingerprint(s.host_key) in message  # offered
    log = _log_after(s, offset)
    # No user name or key was ever offered: sshd saw the connection end before authentication.
    assert "Accepted" not in log and "publickey" not in log and "root" not in log
    assert "preauth" in log


def test_unknown_host_refused(server: tuple[Link, Sshd], tmp_path: Path) -> None:
    link, s = server
    known = tmp_path / "known_hosts"
    known.write_text("")
    with pytest.raises(HostKeyError, match=r"not pinned.*expected none.*SHA256:"):
        _connect(link, _target(s, known))


def test_key_pinned_for_another_port_is_unknown(server: tuple[Link, Sshd], tmp_path: Path) -> None:
    link, s = server
    known = tmp_path / "known_hosts"
    write_known_hosts(known, DEVICE_IP, s.port + 1, s.host_key)
    with pytest.raises(HostKeyError, match="not pinned"):
        _connect(link, _target(s, known))


def test_missing_known_hosts_is_one_line(server: tuple[Link, Sshd], tmp_path: Path) -> None:
    link, s = server
    with pytest.raises(ProvisionError, match="does not exist: pass the build's --known-hosts"):
        _connect(link, _target(s, tmp_path / "nope"))


def test_encrypted_identity_asks_for_its_passphrase(server: tuple[Link, Sshd], tmp_path: Path) -> None:
    import subprocess

    link, s = server
    key = tmp_path / "locked"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "correct horse", "-f", str(key)], check=True)
    authorized = s.config.parent / "authorized_keys"
    original = authorized.read_text()
    authorized.write_text(original + Path(f"{key}.pub").read_text())
    try:
        asked: list[str] = []
        target = _target(s, identity=key)
        conn = ssh.connect(target, sock=link.connect(DEVICE_IP, s.port, 5.0),
                           passphrase=lambda p: asked.append(p) or "correct horse")  # type: ignore[func-returns-value]
        conn.close()
        assert asked == [f"passphrase for {key}: "]
        with pytest.raises(ProvisionError, match="wrong passphrase"):
            ssh.connect(target, sock=link.connect(DEVICE_IP, s.port, 5.0), passphrase=lambda p: "nope")
    finally:
        authorized.write_text(original)


def test_wrong_client_key_is_one_line(server: tuple[Link, Sshd], tmp_path: Path) -> None:
    link, s = server
    stranger = tmp_path / "stranger"
    paramiko.RSAKey.generate(2048).write_private_key_file(str(stranger))
    with pytest.raises(ProvisionError) as e:
        _connect(link, _target(s, identity=stranger))
    assert "refused" in str(e.value) and "\n" not in str(e.value)


def test_connection_refused_is_one_line(server: tuple[Link, Sshd]) -> None:
    link, s = server
    target = _target(s)
    with pytest.raises(ConnectionRefusedError):
        link.connect(DEVICE_IP, 2222, 2.0)  # nothing listens there: the laptop side sees a refusal
    # Without a prepared socket the library dials itself; 127.0.0.1:1 is closed on any machine.
    with pytest.raises(ProvisionError, match=r"^cannot connect to 127\.0\.0\.1:1: Connection refused$"):
        ssh.connect(ssh.Target(host="127.0.0.1", port=1, known_hosts=target.known_hosts, timeout=2.0))


def test_silent_peer_times_out_in_one_line(tmp_path: Path) -> None:
    """A TCP peer that never speaks SSH: the banner wait ends with one line."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    known = tmp_path / "known_hosts"
    known.write_text("")
    try:
        with pytest.raises(ProvisionError) as e:
            ssh.connect(ssh.Target(host="127.0.0.1", port=port, known_hosts=known, timeout=1.0))
        assert "\n" not in str(e.value)
        assert "127.0.0.1" in str(e.value)
    finally:
        listener.close()
