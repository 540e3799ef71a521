"""Pure logic of provisioning: policy, rules rendering, password handling, check verdicts, output."""

from __future__ import annotations

import copy
import hashlib
import http.server
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest

from clef_armory.errors import ConfigError
from provision import checks, policy, report, rules, ssh
from provision.layout import DeviceLayout
from provision.link import Link
from provision.secrets import Passwords, Secret, read_password_file
from provision.setup import Step

ADDR = "0x" + "Ab" * 20


# ---------------------------------------------------------------- policy and rules


def test_policy_parses_and_normalises() -> None:
    p = policy.parse({"recipients": [ADDR], "max_value_eth": "0.05", "origins": ["https://app.example"],
                      "chain_ids": [1, 11155111]})
    assert p.recipients == (ADDR.lower(),)
    assert p.max_value_wei == 5 * 10**16
    assert p.chain_ids == (1, 11155111)
    assert p.allow_no_origin and not p.allow_text_signing


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"recipients": ["0x1234"]}, "not a 0x-prefixed"),
        ({"recipients": []}, "at least one"),
        ({"recipients": [ADDR], "colour": "red"}, "unknown key"),
        ({"recipients": [ADDR], "max_value_eth": "1", "max_value_wei": 1}, "not both"),
        ({"recipients": [ADDR], "max_value_eth": "0.0000000000000000001"}, "18 decimals"),
        ({"recipients": [ADDR], "max_value_eth": "lots"}, "decimal number"),
        ({"recipients": [ADDR], "chain_ids": [0]}, "positive integers"),
        ({"recipients": [ADDR], "origins": ["https://a.example/path"]}, "no path"),
        ({"recipients": [ADDR], "allow_text_signing": "yes"}, "true or false"),
        ([ADDR], "mapping"),
    ],
)
def test_policy_errors_are_one_line(doc: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        policy.parse(doc)
    assert "\n" not in str(e.value)


def test_policy_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read policy file"):
        policy.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("recipients: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        policy.load(bad)


def test_rules_render_carries_the_policy_and_is_stable() -> None:
    p = policy.parse({"recipients": [ADDR], "max_value_wei": 123, "origins": ["https://app.example"],
                      "allow_text_signing": True, "chain_ids": [5]})
    text = rules.render(p, "my-policy.yaml")
    data = json.loads(text.split("var POLICY = ", 1)[1].split(";\n", 1)[0])
    assert data["global"]["recipients"] == [ADDR.lower()]
    assert data["global"]["max_value_wei"] == "123"
    assert data["origins"] == ["https://app.example"]
    assert data["global"]["allow_text_signing"] is True and data["chain_ids"] == [5]
    assert "my-policy.yaml" in text
    assert "//   value per transaction: at most 0.000000000000000123 ETH" in text  # the header in words
    assert rules.render(p, "my-policy.yaml") == text
    assert rules.sha256(text) == hashlib.sha256(text.encode()).hexdigest()
    for fn in ("ApproveTx", "ApproveSignData", "ApproveListing"):
        assert f"function {fn}(" in text


def test_agent_config_renders_from_the_overlay_template() -> None:
    import tomllib

    from armory_agent import config as agent_config
    from provision import agentconfig
    from provision.layout import DEFAULT

    text = agentconfig.render(DEFAULT, 11155111, None)
    cfg = agent_config.from_mapping(tomllib.loads(text))  # the agent accepts what provisioning writes
    assert cfg.clef.chain_id == 11155111
    assert (cfg.listen.address, cfg.listen.port, cfg.clef.http_port) == ("10.0.0.1", 8550, 8551)
    assert str(cfg.clef.rules) == DEFAULT.rules and str(cfg.clef.state_dir) == DEFAULT.state_dir
    assert cfg.policy.origins == ()
    pol = policy.parse({"recipients": [ADDR], "origins": ["https://app.example"]})
    cfg2 = agent_config.from_mapping(tomllib.loads(agentconfig.render(DEFAULT, 1, pol)))
    assert cfg2.policy.origins == ("https://app.example",) and cfg2.policy.cors
    calls = [{"contract": ADDR, "functions": ["deposit(uint256)"]}]
    pol3 = policy.parse({"recipients": [ADDR], "calls": calls})
    cfg3 = agent_config.from_mapping(tomllib.loads(agentconfig.render(DEFAULT, 1, pol3)))
    assert cfg3.eth.method_signatures == ("deposit(uint256)",)  # Clef's validator learns the policy's calls
    # Everything provisioning does not set is the agent's own default (one source: its dataclasses).
    plain = agent_config.from_mapping(tomllib.loads(agentconfig.render(DEFAULT, 1, None)))
    assert plain == agent_config.AgentConfig()


def test_rules_file_must_look_like_rules(tmp_path: Path) -> None:
    f = tmp_path / "rules.js"
    f.write_text("var x = 1;\n")
    with pytest.raises(ConfigError, match="defines no function"):
        rules.read_file(f)


# ---------------------------------------------------------------- passwords


def _pwfile(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    f = tmp_path / "pw"
    f.write_text(text)
    os.chmod(f, mode)
    return f


def test_password_file_read_once_and_must_be_0600(tmp_path: Path) -> None:
    f = _pwfile(tmp_path, "# comment\nmaster: master-password-1\naccount: account-password-1\n")
    got = read_password_file(f)
    assert got["master"].value == "master-password-1" and got["account"].value == "account-password-1"
    os.chmod(f, 0o644)
    with pytest.raises(ConfigError, match="mode 0644; it must be 0600"):
        read_password_file(f)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("master = x\n", "expected 'master: ...'"),
        ("master: short\n", "at least 10"),
        ("master: pässwörter-lang\n", "ASCII"),
        ("master: aaaaaaaaaaaa\nmaster: bbbbbbbbbbbb\n", "given twice"),
    ],
)
def test_password_file_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        read_password_file(_pwfile(tmp_path, text))


def test_password_file_missing_line_named(tmp_path: Path) -> None:
    pw = Passwords(_pwfile(tmp_path, "master: master-password-1\n"))
    assert pw.get("master", new=True).value == "master-password-1"
    with pytest.raises(ConfigError, match="no 'account:' line"):
        pw.get("account", new=True)


def test_typed_twice_must_match_and_secret_never_shows() -> None:
    answers = iter(["first-password-1", "other-password-1"])
    with pytest.raises(ConfigError, match="differ; nothing was changed"):
        Passwords(ask=lambda p: next(answers)).get("master", new=True)
    prompts: list[str] = []
    ok = Passwords(ask=lambda p: prompts.append(p) or "same-password-1")  # type: ignore[func-returns-value]
    secret = ok.get("account", new=True)
    assert prompts == ["new account password: ", "repeat new account password: "]
    assert "same-password-1" not in repr(secret) and "same-password-1" not in str(secret)
    assert "same-password-1" not in repr([secret, {"k": secret}])
    assert ok.get("account", new=True) is secret  # asked once per run
    assert ok.known() == [secret]


def test_secret_repr_in_step_and_exception_text() -> None:
    s = Secret("do-not-print-me")
    assert "do-not-print-me" not in f"{s} {s!r} {[s]}"


# ---------------------------------------------------------------- check verdicts

LAYOUT = DeviceLayout()


def good_facts() -> dict[str, Any]:
    """Facts of a healthy device (shape as armory_agent.device_admin facts returns)."""
    def entry(path: str, mode: int, kind: str) -> dict[str, Any]:
        return {"path": path, "exists": True, "mode": mode, "owner": "clef", "type": kind}

    return {
        "permissions": {
            "keystore": entry("/k", 0o700, "dir"),
            "key_files": [entry("/k/UTC--x", 0o600, "file")],
            "configdir": entry("/c", 0o700, "dir"),
            "masterseed": entry("/c/masterseed.json", 0o400, "file"),
            "vaults": [{"dir": entry("/c/v", 0o700, "dir"),
                        "files": [entry("/c/v/config.json", 0o600, "file")]}],
            "rules": entry("/r", 0o600, "file"),
        },
        "scan": {"files_searched": 10, "stray_keystores": [], "secret_files": [[]],
                 "journal": {"searched": True, "hits": [0]}},
        "listeners": [
            {"proto": "tcp", "host": "10.0.0.1", "port": 8550, "process": "python3"},
            {"proto": "tcp", "host": "127.0.0.1", "port": 8551, "process": "clef"},
            {"proto": "tcp", "host": "10.0.0.1", "port": 22, "process": "sshd"},
            {"proto": "udp", "host": "0.0.0.0", "port": 67, "process": "systemd-network"},
        ],
        "nft": {"ok": True, "text": json.dumps({"nftables": [
            {"chain": {"family": "inet", "table": "filter", "name": "input", "hook": "input",
                       "policy": "drop"}},
        ]})},
        "sysctl": {"ip_forward": "0", "ipv6_forwarding": "0", "core_pattern": "|/bin/false",
                   "suid_dumpable": "0", "ptrace_scope": "2"},
        "swaps": [],
        "core_limits": [],
        "sshd": {"ok": True, "text": "passwordauthentication no\nkbdinteractiveauthentication no\n"
                                      "permitrootlogin no\nauthenticationmethods any\n"},
        "rules_sha256": "ab" * 32,
        "rules_record": "ab" * 32,
        "agent_status": {"status": 0, "json": {"state": "ready", "rules": "enabled"}},
    }


def test_healthy_facts_pass_every_check() -> None:
    results = checks.judge(good_facts(), LAYOUT)
    assert [r.name for r in results if not r.ok] == []
    assert len(results) == len(checks.DEVICE_CHECKS)


def _break(path: str, value: Any) -> dict[str, Any]:
    facts = copy.deepcopy(good_facts())
    node: Any = facts
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if k.isdigit() else node[k]
    last = keys[-1]
    if last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return facts


@pytest.mark.parametrize(
    ("path", "value", "name", "reason"),
    [
        ("permissions.key_files.0.mode", 0o644, "keystore", "0644, not 0600"),
        ("permissions.keystore.owner", "root", "keystore", "owned by root"),
        ("permissions.key_files", [], "keystore", "no key file"),
        ("scan.stray_keystores", ["/home/armory/UTC--x"], "stray-keys", "/home/armory/UTC--x"),
        ("permissions.masterseed.mode", 0o600, "masterseed", "0600, not 0400"),
        ("permissions.vaults.0.files.0.mode", 0o644, "vault", "0644, not 0600"),
        ("permissions.vaults", [], "vault", "no vault"),
        ("scan.secret_files", [["/var/log/x"]], "secrets", "found in /var/log/x"),
        ("scan.journal", {"searched": True, "hits": [2]}, "secrets", "2 time(s) in the journal"),
        ("scan.journal", {"searched": False, "error": "boom", "hits": [0]}, "secrets",
         "could not be searched"),
        ("listeners.1.host", "0.0.0.0", "listeners", "Clef may listen only"),
        ("listeners.0.port", 8549, "listeners", "unexpected listener"),
        ("listeners.2.host", "0.0.0.0", "listeners", "sshd may listen only"),
        ("listeners.3.port", 53, "listeners", "unexpected listener"),
        ("nft", {"ok": True, "text": json.dumps({"nftables": []})}, "firewall", "no nftables chain"),
        ("nft", {"ok": True, "text": json.dumps({"nftables": [{"chain": {"hook": "input", "policy": "accept",
                                                                        "table": "t", "name": "in"}}]})},
         "firewall", "policy accept"),
        ("nft", {"ok": False, "error": "nft not found"}, "firewall", "unreadable"),
        ("sysctl.ip_forward", "1", "forwarding", "ip_forward is 1"),
        ("sysctl.ipv6_forwarding", "1", "forwarding", "forwarding is 1"),
        ("sshd.text", "passwordauthentication yes\nkbdinteractiveauthentication no\npermitrootlogin no\n",
         "sshd", "passwordauthentication is yes"),
        ("sshd.text", "passwordauthentication no\nkbdinteractiveauthentication yes\npermitrootlogin no\n",
         "sshd", "kbdinteractiveauthentication is yes"),
        ("sshd.text", "passwordauthentication no\nkbdinteractiveauthentication no\npermitrootlogin yes\n",
         "sshd", "permitrootlogin is yes"),
        ("swaps", ["/swapfile file 1024 0 -2"], "swap", "/swapfile"),
        ("sysctl.core_pattern", "core", "coredumps", "no Clef/agent process"),
        ("sysctl.ptrace_scope", "0", "ptrace", "is 0"),
        ("sysctl.ptrace_scope", None, "ptrace", "Yama"),
        ("rules_record", "cd" * 32, "rules-attested", "differs from the attested"),
        ("rules_sha256", None, "rules-attested", "missing"),
        ("agent_status", {"status": 0, "json": {"state": "ready", "rules": "disabled: rules not attested"}},
         "rules-enabled", "not attested"),
        ("agent_status", {"status": 1, "json": None}, "rules-enabled", "unavailable"),
    ],
)
def test_each_check_fails_on_its_fault(path: str, value: Any, name: str, reason: str) -> None:
    results = {r.name: r for r in checks.judge(_break(path, value), LAYOUT)}
    assert not results[name].ok
    assert reason in results[name].reason
    assert [n for n, r in results.items() if not r.ok] == [name]


def test_core_limits_decide_when_cores_are_not_discarded() -> None:
    facts = _break("sysctl.core_pattern", "core")
    facts["core_limits"] = [{"pid": 5, "process": "clef", "soft": "0", "hard": "0"}]
    assert {r.name: r for r in checks.judge(facts, LAYOUT)}["coredumps"].ok
    facts["core_limits"].append({"pid": 6, "process": "python3", "soft": "0", "hard": "unlimited"})
    verdict = {r.name: r for r in checks.judge(facts, LAYOUT)}["coredumps"]
    assert not verdict.ok and "pid 6" in verdict.reason


# ---------------------------------------------------------------- link checks against a permissive stub


class _Permissive(http.server.BaseHTTPRequestHandler):
    """An 'agent' that lets everything through and leaks a keystore: every link check must fail."""

    def do_POST(self) -> None:
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if req["method"] == "account_list":
            result: Any = [ADDR.lower()]
        elif req["method"] == "account_signData":
            result = "0x" + "11" * 65
        else:
            result = {"crypto": {"ciphertext": "00"}}
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "result": result}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def permissive_agent() -> Iterator[Link]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Permissive)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Link("127.0.0.1", server.server_address[1], timeout=5.0)
    finally:
        server.shutdown()
        server.server_close()


def test_link_checks_fail_against_a_permissive_agent(permissive_agent: Link) -> None:
    results = {r.name: r for r in checks.link_checks(permissive_agent, [ADDR, "0x" + "22" * 20])}
    assert not results["link-accounts"].ok and "expected" in results["link-accounts"].reason
    assert not results["link-method"].ok
    assert not results["link-host"].ok
    assert not results["link-origin"].ok
    assert not results["link-sign"].ok
    assert not results["link-no-key-material"].ok
    refused = {r.name: r for r in checks.link_checks(permissive_agent, [ADDR], text_signing=False)}
    assert refused["link-accounts"].ok
    assert not refused["link-sign"].ok and "forbids" in refused["link-sign"].reason


def test_link_unreachable_is_one_failed_check() -> None:
    results = checks.link_checks(Link("127.0.0.1", 1, timeout=2.0), [ADDR])
    assert [r.name for r in results] == ["link"] and not results[0].ok


# ---------------------------------------------------------------- output


def test_tables_and_json() -> None:
    steps = [Step("master seed", False, "exists"), Step("rules", False, "kept")]
    assert "nothing changed" in report.steps_table(steps)
    assert "nothing changed" not in report.steps_table([Step("rules", True, "attested")])
    results = [checks.CheckResult("swap", True, "no swap"), checks.CheckResult("ptrace", False, "is 0")]
    table = report.checks_table(results)
    assert "swap    PASS  no swap" in table and "ptrace  FAIL  is 0" in table
    assert table.endswith("1 passed, 1 failed")
    doc = json.loads(report.as_json(steps, results))
    assert doc["changed"] is False and doc["ok"] is False and doc["checks"][1]["name"] == "ptrace"


@pytest.mark.integration
def test_fingerprint_matches_ssh_keygen(tmp_path: Path) -> None:
    key = tmp_path / "k"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    expected = subprocess.run(["ssh-keygen", "-lf", f"{key}.pub"], check=True, capture_output=True,
                              text=True).stdout.split()[1]
    assert ssh.fingerprint(paramiko.PKey.from_path(key)) == expected


# ---------------------------------------------------------------- tasks


def test_tasks_have_help_for_every_flag_and_default_to_the_builds_known_hosts() -> None:
    import inspect

    import tasks
    from clef_armory import config

    for name in ("provision", "unlock", "check", "status"):
        t = getattr(tasks, name)
        params = [p for p in inspect.signature(t.body).parameters if p != "c"]
        assert set(params) <= set(t.help), (name, set(params) - set(t.help))
    settings = config.Settings(board="mk1", output_dir=Path("out"))
    from provision.commands import session_for

    s = session_for(settings, "10.0.0.1")
    assert s.target.known_hosts == Path("out/mk1/known_hosts")
    assert s.target.user == "armory"
    assert s.link is not None and (s.link.host, s.link.port) == ("10.0.0.1", 8550)


@pytest.mark.integration
def test_provision_task_refuses_bad_input_in_one_line(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parent.parent
    pw = _pwfile(tmp_path, "master: master-password-1\n", 0o644)
    proc = subprocess.run(
        [str(repo / ".venv/bin/invoke"), "provision", "--host", "127.0.0.1", "--port", "1",
         "--known-hosts", str(tmp_path / "kh"), "--password-file", str(pw)],
        cwd=repo, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"error: password file {pw} has mode 0644; it must be 0600 "
                                                f"(chmod 600 {pw})"]


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"recipients": [ADDR], "max_gas": 20000}, "max_gas must be an integer from 21000"),
        ({"recipients": [ADDR], "max_fee_per_gas_gwei": "0"}, "above 0"),
        ({"recipients": [ADDR], "limits": [{"window": "1w", "max_eth": "1"}]}, "30s, 15m, 24h or 7d"),
        ({"recipients": [ADDR], "limits": [{"window": "1h"}]}, "needs max_eth or max_tx"),
        ({"recipients": [ADDR], "calls": [{"erc20": {"token": ADDR, "max_amount": "1"}}]}, "decimals"),
        ({"recipients": [ADDR], "calls": [{"contract": ADDR, "functions": ["approve(address,uint256)"]}]},
         "grants an allowance"),
        ({"recipients": [ADDR], "calls": [{"contract": ADDR, "functions": ["swap(bytes)"]}]},
         "cannot be checked strictly"),
        ({"recipients": [ADDR],
          "calls": [{"erc20": {"token": ADDR, "decimals": 6, "approve": [{"spender": ADDR}]}}]},
         "spender and max_amount"),
        ({"recipients": [ADDR], "typed_data": [{"verifying_contract": ADDR, "primary_type": "PermitBatch"}]},
         "give its spender"),
        ({"recipients": [ADDR], "qubes": {"bad name": {}}}, "qube name"),
        ({"recipients": [ADDR], "qubes": {"work": {"origins": []}}}, "unknown key"),
        ({"max_value_eth": "1"}, "allows nothing"),
        ({"recipients": [ADDR], "version": 3}, "version must be 1 or 2"),
    ],
)  # fmt: skip
def test_policy_v2_errors_are_one_line(doc: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        policy.parse(doc)
    assert "\n" not in str(e.value)


def test_v1_file_gets_fee_defaults_and_v2_keys_parse() -> None:
    v1 = policy.parse({"recipients": [ADDR], "max_value_eth": "0.05"})
    assert v1.version == 1 and v1.max_gas == 300_000 and v1.max_fee_per_gas_wei == 200 * 10**9
    assert not v1.allow_create and v1.limits == () and v1.qubes == ()
    v2 = policy.parse({
        "recipients": [ADDR], "max_fee_per_gas_gwei": "1.5", "limits": [{"window": "24h", "max_eth": "0.5"},
                                                                     {"window": "1h", "max_tx": 5}],
        "calls": [{"erc20": {"token": ADDR, "decimals": 6, "transfer_to": [ADDR], "max_amount": "100.5"}}],
        "qubes": {"work": {"max_value_eth": "0.01"}},
    })  # fmt: skip
    assert v2.max_fee_per_gas_wei == 1_500_000_000
    assert v2.limits == (policy.Limit(86400, 5 * 10**17, None), policy.Limit(3600, None, 5))
    assert v2.erc20[0].max_units == 100_500_000
    (name, scope), = v2.qubes
    assert name == "work" and scope.max_value_wei == 10**16 and scope.recipients is None


def test_nothing_on_the_link_can_set_the_device_clock() -> None:
    """The spending windows trust the device's system clock: no time service in the image, none offered
    on the link, and the agent (and Clef under it) may not set it."""
    from image.rootfs import PACKAGES

    time_services = {"systemd-timesyncd", "chrony", "ntp", "ntpsec", "openntpd", "fake-hwclock", "ntpdate"}
    assert not time_services & set(PACKAGES)
    overlay = Path(__file__).resolve().parent.parent / "overlay"
    assert "EmitNTP=no" in (overlay / "etc/systemd/network/10-usb0.network.j2").read_text()
    assert "ProtectClock=yes" in (overlay / "etc/systemd/system/clef-armory-agent.service.j2").read_text()
    text = rules.render(policy.parse({"recipients": [ADDR], "limits": [{"window": "24h", "max_tx": 1}]}))
    assert "new Date().getTime()" in text and "Math.max(0, wall - clock.w)" in text  # never backwards


def test_provision_shows_the_sample_table_before_it_connects(tmp_path: Path) -> None:
    from provision import commands

    pol_file = tmp_path / "policy.yaml"
    pol_file.write_text(json.dumps({"recipients": [ADDR]}))
    said: list[str] = []

    class Unreachable(commands.Session):
        def open(self) -> Any:
            said.append("connect")
            raise ConfigError("no device in this test")

    inputs = commands.ProvisionInputs(policy_file=pol_file, sample_check=lambda p, name: f"table for {name}")
    with pytest.raises(ConfigError, match="no device"):
        commands.provision(Unreachable(target=None), Passwords(None), inputs, said.append)  # type: ignore[arg-type]
    assert said == ["table for policy.yaml", "connect"]
