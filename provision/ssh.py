"""SSH to the device with the host key pinned from the build's known_hosts.

We drive paramiko's Transport ourselves instead of SSHClient so the host key is
compared with the pinned one right after key exchange and before authentication:
an unknown or changed key stops the connection with both fingerprints shown, and
nothing of ours (no user name, no key, no secret) has been sent. There is no
policy that adds keys; a key gets pinned only by the image build writing it.
"""

from __future__ import annotations

import base64
import dataclasses
import getpass
import hashlib
import shlex
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import paramiko

from clef_armory.errors import HostKeyError, ProvisionError
from image.sshkey import device_key

# Which signature algorithms to offer for each pinned key type, so the server
# presents the very key we pinned (not another one it also has).
_KEY_ALGORITHMS = {
    "ssh-ed25519": ("ssh-ed25519",),
    "ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"),
    "ecdsa-sha2-nistp256": ("ecdsa-sha2-nistp256",),
    "ecdsa-sha2-nistp384": ("ecdsa-sha2-nistp384",),
    "ecdsa-sha2-nistp521": ("ecdsa-sha2-nistp521",),
}


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH-style fingerprint: 'SHA256:<base64 without padding>'."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def known_hosts_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


@dataclasses.dataclass(frozen=True)
class Target:
    """Where and how to log in."""

    host: str
    port: int = 22
    user: str = "armory"
    identity: Path | None = None
    known_hosts: Path = Path("known_hosts")
    timeout: float = 15.0


@dataclasses.dataclass(frozen=True)
class Result:
    """A finished remote command."""

    status: int
    stdout: bytes
    stderr: bytes


def pinned_keys(known_hosts: Path, host: str, port: int) -> dict[str, paramiko.PKey]:
    """The pinned keys for host:port from known_hosts ({key type: key})."""
    hostkeys = paramiko.HostKeys()
    try:
        hostkeys.load(str(known_hosts))
    except FileNotFoundError:
        raise ProvisionError(
            f"known_hosts file {known_hosts} does not exist: pass the build's --known-hosts"
        ) from None
    except (OSError, paramiko.SSHException, ValueError) as e:
        raise ProvisionError(f"cannot read known_hosts file {known_hosts}: {e}") from None
    entry = hostkeys.lookup(known_hosts_name(host, port))
    return dict(entry) if entry else {}


class Connection:
    """One authenticated SSH transport to the device; run commands with stdin."""

    def __init__(self, transport: paramiko.Transport, target: Target) -> None:
        self.transport = transport
        self.target = target

    def run(
        self, argv: Sequence[str], stdin: bytes = b"", timeout: float | None = 600.0
    ) -> Result:
        """Run argv on the device, feed it stdin, wait for it to finish.

        Secrets travel only in ``stdin`` (the channel's data stream); argv is for
        fixed words. The command line is quoted so no shell on the device
        interprets anything we send.
        """
        return self.run_stream(argv, stdin, (), timeout)

    def run_stream(
        self, argv: Sequence[str], head: bytes, chunks: Iterable[bytes], timeout: float | None = 600.0
    ) -> Result:
        """Like run, with ``head`` and then every chunk of ``chunks`` on stdin (a data stream the
        device reads as it arrives; ``timeout`` counts from when the stream has been sent)."""
        command = " ".join(shlex.quote(a) for a in argv)
        try:
            chan = self.transport.open_session(timeout=self.target.timeout)
            chan.settimeout(timeout)
            chan.exec_command(command)
            if head:
                chan.sendall(head)
            for chunk in chunks:
                chan.sendall(chunk)
            chan.shutdown_write()
            out, err = bytearray(), bytearray()
            deadline = None if timeout is None else time.monotonic() + timeout
            while not chan.exit_status_ready() or chan.recv_ready() or chan.recv_stderr_ready():
                if chan.recv_ready():
                    out += chan.recv(65536)
                elif chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                elif not self.transport.is_active() or (chan.closed and not chan.exit_status_ready()):
                    raise ProvisionError(
                        f"connection to {self.target.host} dropped while running {argv[-1]}"
                    )
                elif deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError
                else:
                    time.sleep(0.005)
            status = chan.recv_exit_status()
            chan.close()
        except TimeoutError:
            raise ProvisionError(
                f"{self.target.host}: {argv[-1]} did not finish within {timeout:.0f} s"
            ) from None
        except (paramiko.SSHException, EOFError, OSError) as e:
            raise ProvisionError(f"connection to {self.target.host} failed: {_one_line(e)}") from None
        if status == -1:
            raise ProvisionError(f"connection to {self.target.host} dropped while running {argv[-1]}")
        return Result(status, bytes(out), bytes(err))

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(
    target: Target,
    sock: socket.socket | None = None,
    passphrase: Callable[[str], str] = getpass.getpass,
) -> Connection:
    """Open an SSH connection whose host key matches the pinned one, then log in.

    ``sock`` is an already connected socket (tests reach into network namespaces
    that way); otherwise we dial target.host:target.port.
    """
    pinned = pinned_keys(target.known_hosts, target.host, target.port)
    where = f"{target.host}:{target.port}"
    if sock is None:
        try:
            sock = socket.create_connection((target.host, target.port), timeout=target.timeout)
        except TimeoutError:
            why = f"cannot connect to {where}: timed out after {target.timeout:.0f} s"
            raise ProvisionError(why) from None
        except OSError as e:
            raise ProvisionError(f"cannot connect to {where}: {e.strerror or e}") from None
    transport = paramiko.Transport(sock)
    try:
        transport.banner_timeout = target.timeout
        transport.handshake_timeout = target.timeout
        if pinned:
            offered = [a for t in pinned for a in _KEY_ALGORITHMS.get(t, (t,))]
            transport.get_security_options().key_types = offered
        transport.start_client(timeout=target.timeout)
        _verify_host_key(transport.get_remote_server_key(), pinned, target)
        _authenticate(transport, target, passphrase)
    except ProvisionError:
        transport.close()
        raise
    except (paramiko.SSHException, EOFError, OSError) as e:
        transport.close()
        raise ProvisionError(f"SSH to {where} failed: {_one_line(e)}") from None
    return Connection(transport, target)


def _verify_host_key(offered: paramiko.PKey, pinned: dict[str, paramiko.PKey], target: Target) -> None:
    name = known_hosts_name(target.host, target.port)
    got = f"{offered.get_name()} {fingerprint(offered)}"
    if not pinned:
        raise HostKeyError(
            f"host key of {name} is not pinned in {target.known_hosts}: "
            f"expected none, device offers {got}; refusing to connect"
        )
    expected = pinned.get(offered.get_name())
    if expected is None or expected.asbytes() != offered.asbytes():
        want = ", ".join(f"{k.get_name()} {fingerprint(k)}" for k in pinned.values())
        raise HostKeyError(
            f"HOST KEY CHANGED for {name}: pinned {want}, device offers {got}; refusing to connect"
        )


_KEY_TYPES: tuple[type[paramiko.PKey], ...] = (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey)


def _load_identity(path: Path, passphrase: Callable[[str], str]) -> paramiko.PKey:
    try:
        return paramiko.PKey.from_path(path)
    except (paramiko.PasswordRequiredException, TypeError):
        # Old PEM keys raise the former, new OpenSSH-format keys (via cryptography) the latter.
        pass
    except FileNotFoundError:
        raise ProvisionError(f"SSH key {path} does not exist") from None
    except (paramiko.SSHException, OSError, ValueError) as e:
        raise ProvisionError(f"cannot load SSH key {path}: {_one_line(e)}") from None
    phrase = passphrase(f"passphrase for {path}: ")
    for key_type in _KEY_TYPES:
        try:
            return key_type.from_private_key_file(str(path), password=phrase)
        except (paramiko.SSHException, ValueError, TypeError):
            continue
    raise ProvisionError(f"wrong passphrase for SSH key {path} (or not an ed25519/ecdsa/rsa key)")


DEFAULT_IDENTITY_NAMES = ("id_ed25519", "id_ecdsa", "id_rsa")


def default_identities() -> list[Path]:
    """Key files tried after ssh-agent's keys: the key the image build makes when the laptop has
    none (image.sshkey), then OpenSSH's usual names."""
    ssh_dir = Path("~/.ssh").expanduser()
    return [device_key(), *(ssh_dir / name for name in DEFAULT_IDENTITY_NAMES)]


def _authenticate(
    transport: paramiko.Transport, target: Target, passphrase: Callable[[str], str]
) -> None:
    """Public key only: the given identity, else the ssh-agent's keys, else the default key files.

    Key files are loaded one at a time, only if the keys before them were refused, so a passphrase
    is asked for only when that key is really needed.
    """
    tried = 0

    def accepted(key: paramiko.PKey) -> bool:
        nonlocal tried
        tried += 1
        try:
            transport.auth_publickey(target.user, key)
        except paramiko.AuthenticationException:
            return False
        return transport.is_authenticated()

    if target.identity is not None:
        if accepted(_load_identity(target.identity.expanduser(), passphrase)):
            return
    else:
        for agent_key in paramiko.Agent().get_keys():
            if accepted(agent_key):
                return
        for path in default_identities():
            if path.exists() and accepted(_load_identity(path, passphrase)):
                return
    if not tried:
        raise ProvisionError("no SSH key to log in with: pass --identity KEY or load one into ssh-agent")
    raise ProvisionError(
        f"SSH login as {target.user}@{target.host} refused for "
        f"{tried} key(s): is the key in the image's authorized_keys?"
    )


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
