"""The provisioning steps, each decided from the device's state so a re-run only finishes the job.

Order: master seed -> accounts (one at a time; each is complete before it joins
the keystore) -> stored passwords for any account lacking one -> rules (temp,
attest, rename, record) -> agent config -> restart -> unlock -> wait for ready.
A second run with the same inputs changes nothing and says so.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clef_armory.errors import ConfigError, ProvisionError
from provision import rules as rules_mod
from provision import words as words_mod
from provision.device import Device
from provision.link import Link
from provision.secrets import Passwords, Secret
from provision.words import Terminal


@dataclasses.dataclass(frozen=True)
class Step:
    """One step's outcome: what it is, whether it changed the device, a short detail."""

    name: str
    changed: bool
    detail: str


@dataclasses.dataclass(frozen=True)
class Options:
    accounts: int = 1
    import_keystore: Path | None = None
    rules_text: str | None = None  # the rules to install (from --rules or rendered from --policy)
    agent_config: str | None = None  # rendered agent.toml to install
    link: Link | None = None  # where to wait for /health; None skips the agent steps
    ready_timeout: float = 120.0
    # Asked after the new rules are shown and before anything changes; None: do not ask.
    confirm: Callable[[str], bool] | None = None
    # New accounts: "words" (generated, shown once, --lightkdf) or "ask" (user-chosen, standard scrypt).
    account_password: str = words_mod.GENERATED
    # Where generated words are shown and typed back; None: the controlling terminal (/dev/tty).
    terminal: Callable[[], Terminal] | None = None

    def __post_init__(self) -> None:
        if self.accounts < 0:
            raise ConfigError("--accounts must be 0 or more")
        if self.account_password not in words_mod.MODES:
            raise ConfigError("--account-password must be 'words' or 'ask'")


def provision(
    device: Device,
    passwords: Passwords,
    options: Options,
    say: Callable[[str], None] = print,
) -> list[Step]:
    """Bring the device to the wanted state; returns the steps with what changed."""
    state = device.call("state")
    say_state(state, say)
    digest, rules_wanted = _show_rules(state, options, say)
    plan = _plan(state, passwords, options)
    steps = [_master_seed(device, state, plan.master)]
    steps += _accounts(device, plan, say)
    rule_steps, restart = _rules(device, state, options, plan.master, digest, rules_wanted)
    steps += rule_steps
    if options.agent_config is not None:
        r = device.call("install-config", content=options.agent_config)
        steps.append(Step("agent config", bool(r["changed"]), "installed" if r["changed"] else "unchanged"))
        restart = restart or bool(r["changed"])
    if options.link is not None:
        steps.extend(_agent_up(device, options, restart, plan.master, say))
    return steps


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What a run will do to the accounts, and every secret it needs, decided before any change."""

    master: Secret
    account: Secret | None
    generated: list[Secret]
    have: set[str]
    imported_text: str | None
    import_address: str | None
    importing: bool
    missing_pw: list[str]
    to_create: int
    generate: bool


def _show_rules(
    state: dict[str, Any], options: Options, say: Callable[[str], None]
) -> tuple[str | None, bool]:
    """New rules are shown (and confirmed, if asked for) before anything on the device changes;
    returns (their sha256, whether they still need attesting)."""
    digest = rules_mod.sha256(options.rules_text) if options.rules_text is not None else None
    rules_wanted = digest is not None and not (state["rules_sha256"] == digest == state["rules_record"])
    if options.rules_text is not None and rules_wanted:
        say("rules to be attested:\n" + options.rules_text.rstrip())
        if options.confirm is not None and not options.confirm("attest these rules?"):
            raise ConfigError("cancelled before any change: the rules were not accepted")
    return digest, rules_wanted


def _plan(state: dict[str, Any], passwords: Passwords, options: Options) -> _Plan:
    """Every secret is at hand before the first change: a mistyped word or password creates nothing."""
    accounts = state["accounts"]
    have = {a["address"] for a in accounts}
    imported_text = _read_import(options.import_keystore) if options.import_keystore else None
    import_address = _keystore_address(imported_text) if imported_text else None
    importing = imported_text is not None and import_address is not None and import_address not in have
    missing_pw = [a["address"] for a in accounts if not a["credential"]]
    to_create = max(0, options.accounts - len(have) - (1 if importing else 0))
    generate = options.account_password == words_mod.GENERATED

    master = passwords.get("master", new=not state["masterseed"])
    account: Secret | None = None
    if importing or missing_pw or (to_create and not generate):
        account = passwords.get("account", new=to_create > 0 and not generate and not importing)
    generated = _generate(to_create, options, passwords) if generate and to_create else []
    return _Plan(master, account, generated, have, imported_text, import_address, importing, missing_pw,
                 to_create, generate)


def _master_seed(device: Device, state: dict[str, Any], master: Secret) -> Step:
    if state["masterseed"]:
        return Step("master seed", False, "exists")
    device.call("init", secrets={"master": master})
    return Step("master seed", True, "created (clef init)")


def _accounts(device: Device, plan: _Plan, say: Callable[[str], None]) -> list[Step]:
    """Imported keystore first, stored passwords where missing, then new ones up to the wanted count."""
    steps: list[Step] = []
    master, account, have = plan.master, plan.account, set(plan.have)
    if plan.importing:
        assert account is not None
        say(
            "warning: importing a key that has existed off the device; "
            "anyone who had that file and its password can still sign"
        )
        r = device.call(
            "add-account", secrets={"master": master, "account": account}, import_keystore=plan.imported_text
        )
        have.add(r["address"])
        steps.append(Step("import account", True, r["address"]))
    elif plan.import_address is not None:
        steps.append(Step("import account", False, f"{plan.import_address} already on the device"))

    for address in plan.missing_pw:
        assert account is not None
        device.call("setpw", secrets={"master": master, "account": account}, address=address)
        steps.append(Step("store password", True, address))
    for i in range(plan.to_create):
        say(f"creating account {i + 1} of {plan.to_create} on the device ...")
        secret = plan.generated[i] if plan.generate else account
        assert secret is not None
        started = time.monotonic()
        r = device.call("add-account", secrets={"master": master, "account": secret}, light_kdf=plan.generate)
        have.add(r["address"])
        kdf = f"word set {i + 1}, light scrypt" if plan.generate else "standard scrypt"
        say(f"account {r['address']} ({kdf}) ready in {time.monotonic() - started:.1f} s")
        steps.append(Step("new account", bool(r["changed"]), r["address"]))
    steps.append(Step("accounts", False, f"{len(have)} on the device"))
    return steps


def _rules(device: Device, state: dict[str, Any], options: Options, master: Secret, digest: str | None,
           rules_wanted: bool) -> tuple[list[Step], bool]:
    """Install and attest the rules when they differ; returns (steps, whether the agent must restart)."""
    if options.rules_text is not None and digest is not None:
        if not rules_wanted:
            return [Step("rules", False, f"sha256 {digest[:16]}… already attested")], False
        r = device.call("install-rules", secrets={"master": master}, rules=options.rules_text)
        return [Step("rules", bool(r["changed"]), f"attested sha256 {digest[:16]}…")], bool(r["changed"])
    if state["rules_sha256"] is None:
        raise ConfigError("no rules on the device yet: pass --rules FILE or --policy FILE")
    return [Step("rules", False, "kept (no --rules or --policy given)")], False


def _generate(count: int, options: Options, passwords: Passwords) -> list[Secret]:
    """One generated password per new account, each shown once and confirmed on the terminal."""
    term = options.terminal() if options.terminal is not None else words_mod.TtyTerminal()
    try:
        out = []
        for i in range(count):
            label = f"new account {i + 1} of {count} (word set {i + 1})"
            secret = words_mod.new_account_password(term, label)
            passwords.add_generated(secret)
            out.append(secret)
        return out
    finally:
        term.close()


def _agent_up(device: Device, options: Options, restart: bool, master: Any,
              say: Callable[[str], None]) -> list[Step]:
    assert options.link is not None
    steps: list[Step] = []
    status = agent_status(device)
    if restart or status is None or status.get("state") in (None, "error"):
        say("restarting the agent ...")
        device.call("restart-agent")
        steps.append(Step("agent restart", True, "restarted"))
        status = None
    state = (status or {}).get("state")
    if state != "ready":
        unlock(device, master, options.link, options.ready_timeout)
        steps.append(Step("agent unlock", True, "unlocked, ready"))
    else:
        steps.append(Step("agent", False, "ready"))
    return steps


def agent_status(device: Device) -> dict[str, Any] | None:
    """The agent's own status JSON, or None when it does not answer."""
    r = device.call("agent", action="status")
    if r["status"] != 0:
        return None
    js = r.get("json")
    return js if isinstance(js, dict) else None


def unlock(device: Device, master: Any, link: Link, timeout: float = 120.0) -> dict[str, Any]:
    """Give the agent the master password (on stdin, via the device helper), wait for ready."""
    _wait_until_locked(device, timeout)
    deadline_tries = 3
    for _ in range(deadline_tries):
        r = device.call("agent", action="unlock", secrets={"master": master})
        if r["status"] == 0:
            return link.wait_ready(timeout)
        reason = " ".join(r.get("stderr") or []) or r.get("stdout") or f"exit status {r['status']}"
        if "not running" not in reason and "connect" not in reason.lower():
            raise ProvisionError(f"agent unlock failed: {reason}")
        time.sleep(1.0)
    raise ProvisionError("agent unlock failed: the agent's control socket does not answer")


def _wait_until_locked(device: Device, timeout: float) -> None:
    """After a restart the agent is 'starting' for a moment; unlock once it asks for the password."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = agent_status(device)
        if status is not None and status.get("state") in ("locked", "ready", "error"):
            return
        time.sleep(0.5)


def say_state(state: dict[str, Any], say: Callable[[str], None]) -> None:
    n = len(state["accounts"])
    seed = "present" if state["masterseed"] else "absent"
    rules = "installed" if state["rules_sha256"] else "none"
    say(f"device: master seed {seed}, {n} account(s), rules {rules}")


def _read_import(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read keystore file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"keystore file {path} is not text") from None


def _keystore_address(text: str) -> str:
    try:
        data = json.loads(text)
    except ValueError:
        raise ConfigError("the keystore to import is not JSON") from None
    address = data.get("address") if isinstance(data, dict) else None
    crypto = (data.get("crypto") or data.get("Crypto")) if isinstance(data, dict) else None
    if not isinstance(address, str) or len(address.removeprefix("0x")) != 40 or not isinstance(crypto, dict):
        raise ConfigError("the file to import is not an encrypted (v3) keystore with an address")
    return "0x" + address.lower().removeprefix("0x")
