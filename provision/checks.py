"""Key-handling checks: named, pass/fail, one-line reason each.

The device-side helper gathers raw facts (modes, owners, listeners, sysctls, sshd's
effective config, a filesystem and journal search for the passwords sent on its
stdin); the judging happens here, in plain functions that unit tests can feed.
The link checks talk to the agent over the USB link like any client would.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import secrets as pyrandom
from collections.abc import Callable, Iterable
from typing import Any

from armory_agent import usblink
from clef_armory.errors import ProvisionError
from provision.device import Device
from provision.layout import DeviceLayout
from provision.link import Link
from provision.secrets import Secret


@dataclasses.dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    reason: str


Judge = Callable[[dict[str, Any], DeviceLayout], CheckResult]


def _mode(entry: dict[str, Any]) -> str:
    return f"{entry['mode']:04o}"


def _perm_problem(entry: dict[str, Any], mode: int, owner: str, kind: str) -> str | None:
    if not entry.get("exists"):
        return f"{entry['path']} is missing"
    if entry["type"] != kind:
        return f"{entry['path']} is not a {'directory' if kind == 'dir' else 'regular file'}"
    if entry["mode"] != mode:
        return f"{entry['path']} is {_mode(entry)}, not {mode:04o}"
    if entry["owner"] != owner:
        return f"{entry['path']} is owned by {entry['owner']}, not {owner}"
    return None


def check_keystore(facts: dict[str, Any], layout: DeviceLayout) -> CheckResult:
    perms = facts["permissions"]
    problems = [_perm_problem(perms["keystore"], 0o700, layout.clef_user, "dir")]
    problems += [_perm_problem(f, 0o600, layout.clef_user, "file") for f in perms["key_files"]]
    found = [p for p in problems if p]
    if found:
        return CheckResult("keystore", False, found[0])
    n = len(perms["key_files"])
    if n == 0:
        return CheckResult("keystore", False, "the keystore holds no key file")
    return CheckResult("keystore", True, f"dir 0700, {n} key file(s) 0600, owner {layout.clef_user}")


def check_stray_keys(facts: dict[str, Any], layout: DeviceLayout) -> CheckResult:
    stray = facts["scan"]["stray_keystores"]
    if stray:
        return CheckResult("stray-keys", False, f"keystore-format file outside the keystore: {stray[0]}"
                           + (f" (+{len(stray) - 1} more)" if len(stray) > 1 else ""))
    return CheckResult("stray-keys", True, f"none among {facts['scan']['files_searched']} files searched")


def check_masterseed(facts: dict[str, Any], layout: DeviceLayout) -> CheckResult:
    problem = _perm_problem(facts["permissions"]["masterseed"], 0o400, layout.clef_user, "file")
    if problem:
        return CheckResult("masterseed", False, problem)
    return CheckResult("masterseed", True, f"0400, owner {layout.clef_user}")


def check_vault(facts: dict[str, Any], layout: DeviceLayout) -> CheckResult:
    perms = facts["permissions"]
    problems = [_perm_problem(perms["configdir"], 0o700, layout.clef_user, "dir")]
    if not perms["vaults"]:
        return CheckResult("vault", False, "no vault directory (no password stored, no rules attested)")
    for vault in perms["vaults"]:
        problems.append(_perm_problem(vault["dir"], 0o700, layout.clef_user, "dir"))
        problems += [_perm_problem(f, 0o600, layout.clef_user, "file") for f in vault["files"]]
    found = [p for p in problems if p]
    if found:
        return CheckResult("vault", False, found[0])
    return CheckResult("vault", True, "configdir and vault 0700, vault files 0600")


def check_secrets(facts: dict[str, Any], layout: DeviceLayout) -> CheckResult:
    scan = facts["scan"]
    files = scan["secret_files"]
    if not files:
        return CheckResult("secrets", False, "no password to search for was given")
    for i, paths in enumerate(files):
        if paths:
            return CheckResult("secrets", False, f"password #{i + 1} found in {paths[0]}")
    journal = scan["journal"]
    for i, count in enumerate(journal.get("hits", [])):
        if count:
            return CheckResult("secrets", False, f"password #{i + 1} found {count} time(s) in the journal")
    where = "filesystems and journal" if journal.get("searched") else "filesystems (no journal searched)"
    if layout.journal_command and not journal.get("searched"):
        return CheckResult("secrets", False, f"the journal could not be searched: {journal.get('error', '')}")
    return CheckResult("secrets", True, f"{len(files)} password(s) absent from {where}")


def _split(hostport: str) -> tuple[str, int]:
    host, _, port = hostport.rpartition(":")
    return host.strip("[]"), int(port)


def _is_loopback(host: str) -> bool:
    return ipaddress.ip_address(host.split("%")[0]).is_loopback


def check_listeners(facts: dict[str, Any], layout: DeviceLayout) -> CheckResult:
    agent, clef, sshd = _split(layout.agent_listen), _split(layout.clef_listen), _split(layout.sshd_listen)
    allowed_udp = {_split(x) for x in layout.allowed_udp}
    seen_agent = False
    for s in facts["listeners"]:
        where = (s["host"], s["port"])
        desc = f"{s['process']} on {s['proto']} {s['host']}:{s['port']}"
        if s["process"] == "clef":
            if not _is_loopback(s["host"]) or where != clef:
                why = f"{desc}; Clef may listen only on {layout.clef_listen}"
                return CheckResult("listeners", False, why)
            continue
        if s["process"] == "sshd" and where != sshd:
            return CheckResult("listeners", False, f"{desc}; sshd may listen only on {layout.sshd_listen}")
        if s["proto"] == "tcp" and where == agent:
            if s["process"] in ("clef", "sshd"):
                return CheckResult("listeners", False, f"{desc}: that is the agent's address")
            seen_agent = True
            continue
        if _is_loopback(s["host"]):
            continue
        if where == sshd and s["process"] == "sshd":
            continue
        if s["proto"] == "udp" and where in allowed_udp:
            continue
        return CheckResult("listeners", False, f"unexpected listener: {desc}")
    if not seen_agent:
        return CheckResult("listeners", False, f"the agent is not listening on {layout.agent_listen}")
    ok = f"agent {layout.agent_listen}, Clef loopback, sshd {layout.sshd_listen}"
    return CheckResult("listeners", True, ok)


def check_firewall(facts: dict[str, Any], layout: DeviceLayout) -> CheckResult:
    nft = facts["nft"]
    if not nft.get("ok"):
        return CheckResult("firewall", False, f"nftables ruleset unreadable: {nft.get('error')}")
    try:
        items = json.loads(nft["text"]).get("nftables", [])
    except ValueError:
        return CheckResult("firewall", False, "nft printed something that is not JSON")
    chains = [i["chain"] for i in items if "chain" in i and i["chain"].get("hook") == "input"]
    if not chains:
        return CheckResult("firewall", False, "no nftables chain hooked to input (no ruleset loaded)")
    open_chains = [c for c in chains if c.get("policy") != "drop"]
    if open_chains:
        c = open_chains[0]
        why = f"input chain {c.get('table')}/{c.get('name')} has policy {c.get('policy')}"
        return CheckResult("firewall", False, why)
    return CheckResult("firewall", True, f"{len(chains)} input chain(s), policy drop")


def check_forwarding(facts: dict[str, Any], layout: DeviceLayout) -> CheckResult:
    sysctl = facts["sysctl"]
    if sysctl["ip_forward"] != "0":
        return CheckResult("forwarding", False, f"net.ipv4.ip_forward is {sysctl['ip_forward']}")
    if sysctl["ipv6_forwarding"] not in ("0", None):
        why = f"net.ipv6.conf.all.forwarding is {sysctl['ipv6_forwarding']}"
        return CheckResult("forwarding", False, why)
    return CheckResult("forwarding", True, "IPv4 and IPv6 forwarding off")


def check_sshd(facts: dict[str, Any], layout: DeviceLayout) -> CheckResult:
    sshd = facts["sshd"]
    if not sshd.get("ok"):
        return CheckResult("sshd", False, f"sshd -T failed: {sshd.get('error')}")
    conf: dict[str, str] = {}
    for line in sshd["text"].splitlines():
        key, _, value = line.partition(" ")
        conf.setdefault(key.lower(), value.strip().lower())
    wanted = {"passwordauthentication": "no", "kbdinteractiveauthentication": "no", "permitrootlogin": "no"}
    for key, value in wanted.items():
        got = conf.get(key)
        if got is None and key == "kbdinteractiveauthentication":
            got = conf.get("challengeresponseauthentication")
        if got != value:
            return CheckResult("sshd", False, f"sshd {key} is {got}, must be {value}")
    methods = conf.get("authenticationmethods", "any")
    if "password" in methods or "keyboard-interactive" in methods:
        return CheckResult("sshd", False, f"sshd authenticationmethods allows {methods}")
    return CheckResult("sshd", True, "public key only, no root login")


def check_swap(facts: dict[str, Any], layout: DeviceLayout) -> CheckResult:
    if facts["swaps"]:
        return CheckResult("swap", False, f"swap in use: {facts['swaps'][0].split()[0]}")
    return CheckResult("swap", True, "no swap")


_DISCARD_CORES = ("|/bin/false", "|/usr/bin/false", "|/bin/true", "|/usr/bin/true")


def check_coredumps(facts: dict[str, Any], layout: DeviceLayout) -> CheckResult:
    pattern = facts["sysctl"]["core_pattern"] or ""
    if pattern.startswith(_DISCARD_CORES):
        return CheckResult("coredumps", True, f"kernel.core_pattern discards cores ({pattern})")
    limits = facts["core_limits"]
    if not limits:
        return CheckResult("coredumps", False, f"core_pattern {pattern!r} and no Clef/agent process to check")
    bad = [x for x in limits if x["soft"] != "0" or x["hard"] != "0"]
    if bad:
        b = bad[0]
        why = f"{b['process']} (pid {b['pid']}) may dump core (limit {b['hard']})"
        return CheckResult("coredumps", False, why)
    return CheckResult("coredumps", True, f"core size limit 0 for {len(limits)} Clef/agent process(es)")


def check_ptrace(facts: dict[str, Any], layout: DeviceLayout) -> CheckResult:
    scope = facts["sysctl"]["ptrace_scope"]
    if scope is None:
        return CheckResult("ptrace", False, "kernel.yama.ptrace_scope missing (Yama not enabled)")
    if scope not in ("1", "2", "3"):
        return CheckResult("ptrace", False, f"kernel.yama.ptrace_scope is {scope}, must be 1 or more")
    return CheckResult("ptrace", True, f"kernel.yama.ptrace_scope = {scope}")


def check_rules_attested(facts: dict[str, Any], layout: DeviceLayout) -> CheckResult:
    digest, record = facts["rules_sha256"], facts["rules_record"]
    if digest is None:
        return CheckResult("rules-attested", False, f"{layout.rules} is missing")
    if record != digest:
        return CheckResult("rules-attested", False,
                           f"rules.js sha256 {digest[:12]}… differs from the attested {str(record)[:12]}…")
    return CheckResult("rules-attested", True, f"sha256 {digest[:16]}… attested")


def check_rules_enabled(facts: dict[str, Any], layout: DeviceLayout) -> CheckResult:
    status = facts.get("agent_status") or {}
    js = status.get("json") if status.get("status") == 0 else None
    if not isinstance(js, dict):
        return CheckResult("rules-enabled", False, "the agent's status is unavailable (agent not running?)")
    if js.get("state") != "ready":
        return CheckResult("rules-enabled", False, f"agent is {js.get('state')}, not ready")
    if js.get("rules") != "enabled":
        return CheckResult("rules-enabled", False, f"Clef rules {js.get('rules')}")
    return CheckResult("rules-enabled", True, "Clef runs with attested rules since its last start")


DEVICE_CHECKS: tuple[Judge, ...] = (
    check_keystore, check_stray_keys, check_masterseed, check_vault, check_secrets, check_listeners,
    check_firewall, check_forwarding, check_sshd, check_swap, check_coredumps, check_ptrace,
    check_rules_attested, check_rules_enabled,
)


def judge(facts: dict[str, Any], layout: DeviceLayout) -> list[CheckResult]:
    return [check(facts, layout) for check in DEVICE_CHECKS]


def device_checks(device: Device, search: Iterable[Secret]) -> list[CheckResult]:
    """Gather facts on the device (passwords to search for go on stdin) and judge them."""
    facts = device.call("facts", secrets={"search": list(search)}, timeout=1800.0)
    return judge(facts, device.layout)


# ---------------------------------------------------------------- over the USB link

# Words that would only appear in an answer carrying key material.
_KEY_WORDS = ("ciphertext", "privatekey", "private_key", "\"crypto\"", "mnemonic", "kdfparams")
# Methods that could hand out keys if the agent let them through.
_KEY_METHODS = ("clef_export", "account_export", "personal_exportRawKey", "clef_listWallets",
                "account_new", "clef_new", "clef_importRawKey")


def link_checks(
    link: Link, accounts: Iterable[str], text_signing: bool | None = True
) -> list[CheckResult]:
    """Probe the agent like a client on the laptop.

    ``text_signing`` is what the rules allow: True (a test message must sign and
    recover), False (it must be refused), None (unknown, e.g. --rules FILE: a
    refusal is reported as such, a signature must still recover).
    """
    expected = sorted(a.lower() for a in accounts)
    answers: list[str] = []

    def rpc(method: str, params: list[Any], headers: dict[str, str] | None = None) -> tuple[int, Any]:
        status, body = link.rpc(method, params, headers)
        answers.append(json.dumps(body))
        return status, body

    results = []
    try:
        status, body = rpc("account_list", [])
        got = sorted(str(a).lower() for a in (body or {}).get("result") or [])
        ok = status == 200 and got == expected
        reason = f"{len(got)} account(s) as provisioned" if ok else f"got {got or body}, expected {expected}"
        results.append(CheckResult("link-accounts", ok, reason))

        status, body = rpc("account_new", [])
        refused = status != 200 or "error" in (body or {})
        results.append(CheckResult("link-method", refused, "account_new refused" if refused
                                   else "account_new was accepted"))

        status, body = rpc("account_version", [], {"Host": f"evil.example:{usblink.AGENT_PORT}"})
        refused = status != 200 or "error" in (body or {})
        results.append(CheckResult("link-host", refused, f"foreign Host refused (HTTP {status})" if refused
                                   else "a foreign Host header was served"))

        status, body = rpc("account_version", [], {"Origin": "https://evil.example"})
        refused = status != 200 or "error" in (body or {})
        why = f"foreign Origin refused (HTTP {status})" if refused else "a foreign Origin was served"
        results.append(CheckResult("link-origin", refused, why))

        results.append(_sign_check(rpc, expected, text_signing is None) if text_signing is not False
                       else _sign_refused(rpc, expected))

        leaks = []
        for method in _KEY_METHODS:
            status, body = rpc(method, [expected[0] if expected else "0x" + "00" * 20])
            if status == 200 and isinstance(body, dict) and "result" in body:
                leaks.append(method)
        text = " ".join(answers).lower()
        word = next((w for w in _KEY_WORDS if w in text), None)
        if leaks:
            why = f"{leaks[0]} answered through the link"
            results.append(CheckResult("link-no-key-material", False, why))
        elif word:
            results.append(CheckResult("link-no-key-material", False, f"an answer contained {word!r}"))
        else:
            results.append(CheckResult("link-no-key-material", True,
                                       f"{len(answers)} answers, none with key material"))
    except ProvisionError as e:
        results.append(CheckResult("link", False, str(e)))
    return results


def _sign_refused(rpc: Callable[..., tuple[int, Any]], expected: list[str]) -> CheckResult:
    if not expected:
        return CheckResult("link-sign", False, "no account to sign with")
    status, body = rpc("account_signData", ["text/plain", expected[0], "0x" + b"clef-armory check".hex()])
    if status == 200 and isinstance(body, dict) and "result" in body:
        return CheckResult("link-sign", False, "text signing succeeded although the policy forbids it")
    return CheckResult("link-sign", True, "text signing refused, as the policy says")


def _sign_check(rpc: Callable[..., tuple[int, Any]], expected: list[str], may_refuse: bool) -> CheckResult:
    if not expected:
        return CheckResult("link-sign", False, "no account to sign with")
    from eth_account import Account
    from eth_account.messages import encode_defunct

    message = f"clef-armory check {pyrandom.token_hex(8)}".encode()
    status, body = rpc("account_signData", ["text/plain", expected[0], "0x" + message.hex()])
    sig = (body or {}).get("result") if isinstance(body, dict) else None
    if status != 200 or not isinstance(sig, str):
        err = (body or {}).get("error", {}).get("message") if isinstance(body, dict) else None
        if may_refuse and status == 200:
            return CheckResult("link-sign", True, f"text signing refused by the rules ({err}); not tested")
        return CheckResult("link-sign", False, f"signing a test message failed: {err or f'HTTP {status}'}")
    try:
        recovered = Account.recover_message(encode_defunct(primitive=message), signature=sig)
    except (ValueError, TypeError) as e:
        return CheckResult("link-sign", False, f"the signature does not recover: {str(e).splitlines()[0]}")
    if recovered.lower() != expected[0]:
        return CheckResult("link-sign", False, f"signature recovers to {recovered}, not {expected[0]}")
    return CheckResult("link-sign", True, f"test message signature recovers to {expected[0]}")
