"""A real OpenSSH sshd as "the device", inside network namespaces the test creates.

Two namespaces joined by a veth pair stand in for the USB link: the device side
has ``usb0`` = 10.0.0.1/24 and runs sshd on 10.0.0.1:22 (its own host key and an
authorized_keys for a test key); the laptop side has 10.0.0.2/24. The test
process stays in the default namespace and reaches the laptop namespace with
sockets made in a short-lived thread that switched namespace (setns), so
10.0.0.x never exists in the default namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paramiko

from provision.commands import Session
from provision.device import Device
from provision.layout import DeviceLayout
from provision.link import Link as AgentLink
from provision.ssh import Target

CLONE_NEWNET = 0x40000000
SSHD = "/usr/sbin/sshd"
DEVICE_IP = "10.0.0.1"
LAPTOP_IP = "10.0.0.2"


def require_tools() -> None:
    """Fail (not skip) when a tool the fast tier relies on is missing."""
    for tool in (SSHD, "ip", "nft", "ssh-keygen"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is required for the provisioning tests "
                               "(apt-get install openssh-server nftables iproute2)")


def run(*argv: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kw)  # type: ignore[call-overload,no-any-return]


def connect_in_netns(netns: str, host: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection made from inside ``netns`` (the socket keeps its namespace)."""
    box: dict[str, object] = {}

    def worker() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns failed")
            finally:
                os.close(fd)
            box["sock"] = socket.create_connection((host, port), timeout=timeout)
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["sock"]  # type: ignore[return-value]


@dataclasses.dataclass
class Link:
    """The two namespaces and the veth pair between them."""

    device_ns: str
    laptop_ns: str

    def connect(self, host: str, port: int, timeout: float) -> socket.socket:
        return connect_in_netns(self.laptop_ns, host, port, timeout)

    def device_exec(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.device_ns, *argv]


@contextlib.contextmanager
def usb_link() -> Iterator[Link]:
    tag = secrets.token_hex(3)
    link = Link(f"armdev-{tag}", f"armlap-{tag}")
    run("ip", "netns", "add", link.device_ns)
    try:
        run("ip", "netns", "add", link.laptop_ns)
        run("ip", "link", "add", "usb0", "netns", link.device_ns, "type", "veth",
            "peer", "name", "lap0", "netns", link.laptop_ns)
        for ns, dev, addr in ((link.device_ns, "usb0", DEVICE_IP), (link.laptop_ns, "lap0", LAPTOP_IP)):
            run("ip", "-n", ns, "link", "set", "lo", "up")
            run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            run("ip", "-n", ns, "link", "set", dev, "up")
        yield link
    finally:
        for ns in (link.device_ns, link.laptop_ns):
            _kill_netns_processes(ns)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def _kill_netns_processes(ns: str) -> None:
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False)
    for pid in pids.stdout.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


DEVICE_RULESET = """\
flush ruleset
table inet filter {
  chain input {
    type filter hook input priority 0; policy drop;
    iif "lo" accept
    ct state established,related accept
    iifname "usb0" tcp dport { 22, 8550 } accept
    iifname "usb0" udp dport 67 accept
  }
  chain forward { type filter hook forward priority 0; policy drop; }
}
"""


def load_firewall(link: Link) -> None:
    run(*link.device_exec("nft", "-f", "-"), input=DEVICE_RULESET)


@dataclasses.dataclass
class Sshd:
    """A running sshd: where it listens, its config, the client key and a known_hosts pinning it."""

    process: subprocess.Popen[bytes]
    config: Path
    host_key: paramiko.PKey
    client_key: Path
    known_hosts: Path
    port: int
    log: Path


def write_known_hosts(path: Path, host: str, port: int, key: paramiko.PKey) -> None:
    name = host if port == 22 else f"[{host}]:{port}"
    path.write_text(f"{name} {key.get_name()} {key.get_base64()}\n")


@contextlib.contextmanager
def sshd(workdir: Path, link: Link, port: int = 22) -> Iterator[Sshd]:
    """sshd -D -e on DEVICE_IP:port inside the device namespace; killed afterwards."""
    require_tools()
    workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(workdir, 0o700)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir (Debian's RuntimeDirectory)
    host_key = workdir / "ssh_host_ed25519_key"
    client_key = workdir / "client_ed25519"
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key))
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(client_key))
    authorized = workdir / "authorized_keys"
    shutil.copy(f"{client_key}.pub", authorized)
    os.chmod(authorized, 0o600)
    config = workdir / "sshd_config"
    log = workdir / "sshd.log"
    config.write_text(
        f"ListenAddress {DEVICE_IP}:{port}\n"
        f"HostKey {host_key}\n"
        f"AuthorizedKeysFile {authorized}\n"
        f"PidFile {workdir / 'sshd.pid'}\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\n"  # the test logs in as root (no sudo on the host)
        "StrictModes no\n"
        "UsePAM no\n"
        "Subsystem sftp internal-sftp\n"
    )
    with open(log, "wb") as logf:
        proc = subprocess.Popen(link.device_exec(SSHD, "-D", "-e", "-f", str(config)),
                                stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _wait_listening(link, port, proc, log)
        key = paramiko.PKey.from_path(host_key)
        known_hosts = workdir / "known_hosts"
        write_known_hosts(known_hosts, DEVICE_IP, port, key)
        yield Sshd(proc, config, key, client_key, known_hosts, port, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_listening(link: Link, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    for _ in range(200):  # bounded: 10 s
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited: {log.read_text()[-500:]}")
        try:
            link.connect(DEVICE_IP, port, 1.0).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("sshd did not start listening within 10 s")


# ---------------------------------------------------------------- a whole "device" for provisioning

REPO = Path(__file__).resolve().parent.parent
DEVICE_PYTHON = "/usr/bin/python3"  # the system python, like Debian's on the device: stdlib only

RESTART_SCRIPT = """\
import os, resource, signal, subprocess, sys, time
pidfile, config, log, repo = sys.argv[1:5]
user = sys.argv[5] if len(sys.argv) > 5 else None  # run the agent as Clef's service user, as systemd does
try:
    pid = int(open(pidfile).read())
    os.kill(pid, signal.SIGTERM)
    for _ in range(200):
        os.kill(pid, 0)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
except (OSError, ValueError):
    pass
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # as the unit's LimitCORE=0 does on the device
env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": repo, "LANG": "C.UTF-8"}
with open(log, "ab") as out:
    p = subprocess.Popen([sys.executable, "-m", "armory_agent", "serve", "--verbose", "--config", config],
                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                         start_new_session=True, cwd="/", user=user, group=user, extra_groups=[])
open(pidfile, "w").write(str(p.pid))
"""


@dataclasses.dataclass
class DeviceEnv:
    """Everything a provisioning test needs: the link, sshd, the device layout and the SSH target."""

    link: Link
    sshd: Sshd
    root: Path  # the device's files live under here
    layout: DeviceLayout
    target: Target
    agent_log: Path

    def session(self, before_call: Callable[[Device, str], None] | None = None) -> Session:
        """Provisioning session: SSH and the agent's link both reached from the laptop namespace."""
        agent = AgentLink(DEVICE_IP, 8550, connect=self.link.connect, timeout=40.0)
        return Session(self.target, self.layout, agent,
                       ssh_socket=lambda: self.link.connect(DEVICE_IP, self.sshd.port, 10.0),
                       before_call=before_call)


@contextlib.contextmanager
def service_user() -> Iterator[str]:
    """A throw-away system user standing in for the device's `clef` user (removed afterwards)."""
    name = f"armtest{secrets.token_hex(3)}"
    run("useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
        "--shell", "/usr/sbin/nologin", name)
    try:
        yield name
    finally:
        subprocess.run(["pkill", "-KILL", "-u", name], capture_output=True, check=False)
        subprocess.run(["userdel", name], capture_output=True, check=False)


@contextlib.contextmanager
def device_env(
    workdir: Path, clef_binary: Path, firewall: bool = True, user: str | None = None
) -> Iterator[DeviceEnv]:
    """A device on this machine: sshd + agent in a namespace, all state under ``workdir/device``.

    With ``user``, Clef and the agent run as that user (runuser / setuid), like the device's
    `clef` user; ``workdir`` must then be reachable by it (e.g. 0755 under /tmp).
    """
    from provision.layout import DeviceLayout
    from provision.ssh import Target
    from tests.agent_helpers import write_agent_config

    root = workdir / "device"
    state = root / "var/lib/clef-armory"
    etc = root / "etc/clef-armory"
    run_dir = root / "run/clef-armory"
    workdir.mkdir(parents=True, exist_ok=True)
    if user is not None:  # the service user must reach its files and run Clef (the cache is under /root)
        (workdir / "bin").mkdir(exist_ok=True)
        clef_binary = Path(shutil.copy(clef_binary, workdir / "bin" / "clef"))
        os.chmod(workdir / "bin", 0o755)  # noqa: S103 - the service user must reach it
        for d in (workdir, workdir / "device", workdir / "device" / "var", workdir / "device" / "var/lib",
                  workdir / "device" / "run"):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o755)  # noqa: S103 - the service user must reach it
    (workdir / "journal.txt").write_text("systemd[1]: Started clef-armory-agent.service\n")
    for d in (state, etc, run_dir):
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
    with usb_link() as link:
        if firewall:
            load_firewall(link)
        with sshd(workdir / "sshd", link) as server:
            agent_config = etc / "agent.json"
            write_agent_config(agent_config, clef_binary, state, interface="usb0", address=DEVICE_IP,
                               port=8550, clef_port=8551, bind_to_device=True,
                               control_socket=run_dir / "control.sock", leds=root / "no-leds")
            if user is not None:
                shutil.chown(run_dir, user, user)
                shutil.chown(agent_config, "root", user)
                os.chmod(agent_config, 0o640)
                os.chmod(etc, 0o750)  # noqa: S103 - the service user must reach it
                shutil.chown(etc, "root", user)
                os.chmod(etc.parent, 0o755)  # noqa: S103 - the service user must reach it
            restart = root / "restart-agent.py"
            restart.write_text(RESTART_SCRIPT)
            agent_log = root / "agent.log"
            layout = DeviceLayout(
                admin_command=("env", f"PYTHONPATH={REPO}", DEVICE_PYTHON, "-m", "armory_agent.device_admin"),
                clef=str(clef_binary),
                clef_user=user or "root",
                as_clef_user=("runuser", "-u", user, "--") if user else (),
                lightkdf=True,
                state_dir=str(state),
                configdir=str(state / "clef"),
                keystore=str(state / "keystore"),
                rules=str(state / "rules.js"),
                rules_record=str(state / "rules.js.sha256"),
                staging_dir=str(state / "staging"),
                agent_config=str(agent_config),
                agent_config_group=user or "root",
                agent_restart=(DEVICE_PYTHON, str(restart), str(root / "agent.pid"), str(agent_config),
                               str(agent_log), str(REPO), *([user] if user else [])),
                agent_command=(DEVICE_PYTHON, "-m", "armory_agent"),
                agent_pythonpath=str(REPO),
                sshd_effective_config=(SSHD, "-T", "-f", str(server.config), "-C",
                                       f"user=root,host=laptop,addr={LAPTOP_IP}"),
                # Stands in for journalctl: the test writes "journal" lines here (outside search_roots).
                journal_command=("cat", str(workdir / "journal.txt")),
                search_roots=(str(root),),
                search_skip=(),
            )
            target = Target(host=DEVICE_IP, port=server.port, user="root", identity=server.client_key,
                            known_hosts=server.known_hosts, timeout=10.0)
            try:
                yield DeviceEnv(link, server, root, layout, target, agent_log)
            finally:
                _stop_agent(root / "agent.pid")


def _stop_agent(pidfile: Path) -> None:
    try:
        pid = int(pidfile.read_text())
    except (OSError, ValueError):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            os.kill(pid, 0)
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
