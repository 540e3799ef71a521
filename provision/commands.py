"""What the provision / unlock / check / status tasks do, callable without invoke.

Tests and the system tier call these with their own layout, sockets and hooks.
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clef_armory.errors import ConfigError, ProvisionError
from provision import agentconfig, checks, policy, rules, setup, words
from provision.device import Device
from provision.layout import DEFAULT, DeviceLayout
from provision.link import Link
from provision.secrets import Passwords
from provision.ssh import Connection, Target, connect
from provision.words import Terminal


@dataclasses.dataclass(frozen=True)
class Session:
    """How to reach the device: SSH target, its layout, the USB link to the agent."""

    target: Target
    layout: DeviceLayout = DEFAULT
    link: Link | None = dataclasses.field(default_factory=Link)
    # Tests: make the SSH socket themselves (inside a network namespace).
    ssh_socket: Callable[[], socket.socket] | None = None
    # Tests: called before each device call with its name (e.g. to drop the connection).
    before_call: Callable[[Device, str], None] | None = None

    def open(self) -> tuple[Connection, Device]:
        conn = connect(self.target, sock=self.ssh_socket() if self.ssh_socket else None)
        return conn, Device(conn, self.layout, self.before_call)


@dataclasses.dataclass(frozen=True)
class ProvisionInputs:
    accounts: int = 1
    import_keystore: Path | None = None
    rules_file: Path | None = None
    policy_file: Path | None = None
    chain_id: int = 1
    write_agent_config: bool = True
    run_checks: bool = True
    confirm: Callable[[str], bool] | None = None  # asked before new rules are attested
    account_password: str = words.GENERATED  # new accounts: generated words (light scrypt) or "ask"
    terminal: Callable[[], Terminal] | None = None  # where the words are shown; None: /dev/tty
    # The built-in samples' verdicts under the policy (a host Clef runs them), shown before anything.
    sample_check: Callable[[policy.Policy, str], str] | None = None

    def __post_init__(self) -> None:
        if self.rules_file and self.policy_file:
            raise ConfigError("give --rules or --policy, not both")
        if self.account_password not in words.MODES:
            raise ConfigError("--account-password must be 'words' or 'ask'")


def resolve_rules(inputs: ProvisionInputs) -> tuple[str | None, policy.Policy | None]:
    if inputs.rules_file:
        return rules.read_file(inputs.rules_file), None
    if inputs.policy_file:
        pol = policy.load(inputs.policy_file, inputs.chain_id)
        return rules.render(pol, inputs.policy_file.name), pol
    return None, None


def provision(
    session: Session, passwords: Passwords, inputs: ProvisionInputs, say: Callable[[str], None] = print
) -> tuple[list[setup.Step], list[checks.CheckResult]]:
    rules_text, pol = resolve_rules(inputs)  # bad local inputs fail before we connect
    if pol is not None and inputs.sample_check is not None and inputs.policy_file is not None:
        say(inputs.sample_check(pol, inputs.policy_file.name))
    agent_config = (
        agentconfig.render(session.layout, inputs.chain_id, pol) if inputs.write_agent_config else None
    )
    conn, device = session.open()
    with conn:
        options = setup.Options(
            accounts=inputs.accounts,
            import_keystore=inputs.import_keystore,
            rules_text=rules_text,
            agent_config=agent_config,
            link=session.link,
            confirm=inputs.confirm,
            account_password=inputs.account_password,
            terminal=inputs.terminal,
        )
        steps = setup.provision(device, passwords, options, say)
        results: list[checks.CheckResult] = []
        if inputs.run_checks:
            say("running the key-handling checks ...")
            text_signing = pol.allow_text_signing if pol else None
            results = _all_checks(session, device, passwords, text_signing)
    return steps, results


def check(
    session: Session, passwords: Passwords | None, text_signing: bool | None = None
) -> list[checks.CheckResult]:
    conn, device = session.open()
    with conn:
        return _all_checks(session, device, passwords, text_signing)


def _all_checks(
    session: Session, device: Device, passwords: Passwords | None, text_signing: bool | None
) -> list[checks.CheckResult]:
    search = passwords.known() if passwords else []
    if passwords and not search:
        # `invoke check` alone: search for the master password, and the account password if given.
        search = [passwords.get("master", new=False)]
        try:
            search.append(passwords.get("account", new=False))
        except ConfigError:
            pass  # no account password at hand: the master password is still searched for
    results = checks.device_checks(device, search)
    if session.link is not None:
        accounts = [a["address"] for a in device.call("state")["accounts"]]
        results += checks.link_checks(session.link, accounts, text_signing)
    return results


def unlock(session: Session, passwords: Passwords) -> dict[str, Any]:
    if session.link is None:
        raise ConfigError("unlock needs the agent's link address")
    conn, device = session.open()
    with conn:
        status = setup.agent_status(device)
        if status and status.get("state") == "ready":
            return status
        return setup.unlock(device, passwords.get("master", new=False), session.link)


def reset_windows(session: Session, passwords: Passwords) -> dict[str, Any]:
    """Empty the rules' spending windows on the device (asks for the master password)."""
    conn, device = session.open()
    with conn:
        return device.call("reset-windows", secrets={"master": passwords.get("master", new=False)})


def status(session: Session) -> dict[str, Any]:
    conn, device = session.open()
    with conn:
        state = device.call("state")
        agent = setup.agent_status(device)
        system = system_facts(device)
    health: dict[str, Any] | str
    try:
        health = session.link.health() if session.link else "no link"
    except Exception as e:
        health = str(e)
    return {"device": state, "agent": agent, "health": health, "system": system}


def system_facts(device: Device) -> dict[str, Any]:
    """Debian point release and the image's record; an older device without the call says so."""
    try:
        return device.call("system")
    except ProvisionError as e:
        return {"debian_version": None, "image": None, "problem": str(e)}


def parse_via(text: str, flag: str) -> tuple[str, int]:
    """HOST:PORT from --ssh-via / --agent-via (e.g. QEMU's forwarded loopback ports of ``--link user``)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{flag} {text!r} is not HOST:PORT (e.g. {flag} 127.0.0.1:2222)")
    return host.strip("[]"), int(port)


def _dial_ssh(address: tuple[str, int], timeout: float) -> socket.socket:
    try:
        return socket.create_connection(address, timeout=timeout)
    except OSError as e:
        why = e.strerror or str(e) or type(e).__name__
        raise ProvisionError(f"cannot connect to --ssh-via {address[0]}:{address[1]}: {why}") from None


def session_for(
    settings: Any,
    host: str,
    port: int = 22,
    user: str = "armory",
    identity: str = "",
    known_hosts: str = "",
    ssh_via: str = "",
    agent_via: str = "",
) -> Session:
    """The session the tasks use: known_hosts defaults to the build's build/<board>/known_hosts.

    ``ssh_via`` / ``agent_via`` (HOST:PORT) are where the sockets are dialled instead of host:port and
    host:8550; everything else stays as for the device itself: the host key pinned for ``host`` and the
    ``Host: host:8550`` header the agent requires.
    """
    pinned = Path(known_hosts) if known_hosts else settings.output_dir / settings.board / "known_hosts"
    target = Target(host=host, port=port, user=user,
                    identity=Path(identity).expanduser() if identity else None, known_hosts=pinned)
    agent_host, _, agent_port = DEFAULT.agent_listen.rpartition(":")
    ssh_socket = None
    if ssh_via:
        ssh_address = parse_via(ssh_via, "--ssh-via")
        ssh_socket = lambda: _dial_ssh(ssh_address, target.timeout)  # noqa: E731
    connect = None
    if agent_via:
        agent_address = parse_via(agent_via, "--agent-via")
        # Link turns an OSError into "agent at 10.0.0.1:8550 unreachable: ..." (and retries while waiting).
        connect = lambda _h, _p, timeout: socket.create_connection(agent_address, timeout)  # noqa: E731
    link = Link(host if host != "localhost" else agent_host, int(agent_port), connect=connect)
    return Session(target, DEFAULT, link, ssh_socket=ssh_socket)


def failed(results: list[checks.CheckResult]) -> list[checks.CheckResult]:
    return [r for r in results if not r.ok]
