"""Fast unit tests of the agent's pure parts: config validation, UI protocol, limits, audit, LEDs."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from armory_agent import config, uiproto
from armory_agent.audit import AuditLog
from armory_agent.errors import ConfigError
from armory_agent.httpproto import HttpError, content_length, parse_head
from armory_agent.leds import Leds
from armory_agent.ratelimit import RateLimiter
from armory_agent.supervisor import clef_argv

REPO = Path(__file__).resolve().parent.parent


def test_defaults_match_the_device_layout() -> None:
    cfg = config.from_mapping({})
    assert cfg.listen.interface == "usb0" and cfg.listen.address == "10.0.0.1"
    assert cfg.listen.port == 8550 and cfg.listen.bind_to_device
    assert cfg.clef.http_port == 8551
    assert cfg.policy.hosts == ("10.0.0.1", "10.0.0.1:8550")
    assert cfg.policy.origins == () and not cfg.policy.cors
    assert "account_new" not in cfg.policy.methods
    assert cfg.policy.max_body == 256 * 1024
    assert cfg.control.socket == Path("/run/clef-armory/control.sock")
    assert cfg.audit.path == Path("/var/lib/clef-armory/agent/audit.jsonl")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"listen": {"address": "0.0.0.0"}}, "listen.address must be one host address"),
        ({"listen": {"address": "usb0"}}, "listen.address must be an IPv4 address"),
        ({"listen": {"port": 70000}}, "listen.port must be a TCP port"),
        ({"listen": {"interface": "a b"}}, "listen.interface is not an interface name"),
        ({"clef": {"http_port": 8550}}, "must not be 8550"),
        ({"clef": {"chain_id": 0}}, "clef.chain_id must be a positive integer"),
        ({"clef": {"chain_id": True}}, "clef.chain_id must be an integer"),
        ({"clef": {"binary": "clef"}}, "clef.binary must be an absolute path"),
        ({"policy": {"max_body": -1}}, "policy.max_body must be positive"),
        ({"policy": {"cors": True}}, "policy.cors needs policy.origins"),
        ({"policy": {"origins": ["*"]}}, "policy.origins entry must be scheme://host"),
        ({"policy": {"methods": "account_list"}}, "policy.methods must be a list"),
        ({"policy": {"rate": "fast"}}, "policy.rate must be float"),
        ({"polcy": {}}, "unknown section [polcy]"),
        ({"policy": {"max_bodyy": 1}}, "unknown key policy.max_bodyy"),
        ({"policy": 3}, "[policy] must be a table"),
    ],
)
def test_bad_config_is_one_clear_line(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        config.from_mapping(data)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_load_toml_json_and_errors(tmp_path: Path) -> None:
    toml = tmp_path / "agent.toml"
    toml.write_text('[clef]\nchain_id = 5\n[listen]\ninterface = "lo"\naddress = "127.0.0.1"\n')
    assert config.load(toml).clef.chain_id == 5
    js = tmp_path / "agent.json"
    js.write_text(json.dumps({"policy": {"max_batch": 3}}))
    assert config.load(js).policy.max_batch == 3
    toml.write_text("[clef\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(toml)
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "missing.toml")


def test_clef_argv_is_private_and_loopback(tmp_path: Path) -> None:
    cfg = config.from_mapping({"clef": {"state_dir": str(tmp_path), "rules": str(tmp_path / "r.js")}})
    argv = clef_argv(cfg)
    assert argv[argv.index("--http.addr") + 1] == "127.0.0.1"
    assert argv[argv.index("--auditlog") + 1] == str(tmp_path / "clef-audit.log")
    assert argv[argv.index("--4bytedb-custom") + 1] == str(tmp_path / "4byte-custom.json")
    assert argv[argv.index("--configdir") + 1] == str(tmp_path / "clef")
    assert "--ipcdisable" in argv and "--stdio-ui" in argv and "--suppress-bootwarn" in argv
    assert "--rules" not in argv  # no rules file yet
    (tmp_path / "r.js").write_text("")
    assert clef_argv(cfg)[-2:] == ["--rules", str(tmp_path / "r.js")]


def test_ui_policy_rejects_undecided_requests() -> None:
    def msg(method: str, params: object) -> uiproto.UiMessage:
        line = json.dumps({"jsonrpc": "2.0", "id": 3, "method": method, "params": [params]})
        parsed = uiproto.parse_line(line.encode())
        assert parsed is not None
        return parsed

    tx = {"from": "0x1", "to": "0x2"}
    assert uiproto.policy_answer(msg("ui_approveTx", {"transaction": tx}), True) == {
        "approved": False,
        "transaction": tx,
    }
    assert uiproto.policy_answer(msg("ui_approveSignData", {}), True) == {"approved": False}
    assert uiproto.policy_answer(msg("ui_approveNewAccount", {}), True) == {"approved": False}
    accounts = [{"address": "0xab", "url": "keystore:///k"}]
    listing = msg("ui_approveListing", {"accounts": accounts})
    assert uiproto.policy_answer(listing, False) == {"accounts": None}
    assert uiproto.policy_answer(listing, True) == {"accounts": accounts}
    assert uiproto.policy_answer(msg("ui_onInputRequired", {}), True) is None
    prompt = msg("ui_onInputRequired", {"title": "Master Password", "isPassword": True})
    assert uiproto.is_master_prompt(prompt)


def test_ui_parse_line_edge_cases() -> None:
    assert uiproto.parse_line(b"\n") is None
    assert uiproto.parse_line(b'{"jsonrpc":"2.0","id":1,"result":null}') is None
    note = uiproto.parse_line(b'{"jsonrpc":"2.0","method":"ui_showInfo","params":[{"text":"hi"}]}')
    assert note is not None and not note.is_call and uiproto.describe_text(note) == "hi"
    with pytest.raises(uiproto.ProtocolError):
        uiproto.parse_line(b"not json")


@pytest.mark.parametrize(
    ("line", "verdict"),
    [
        ("INFO Rule engine configured file=/x/rules.js", "enabled"),
        (
            'WARN Failed to open master, rules disabled err="failed to decrypt"',
            "disabled: master seed not opened",
        ),
        ("WARN Rule hash not attested, disabling", "disabled: rules not attested"),
        ("WARN Could not load rules, disabling", "disabled: rules could not be loaded"),
        ("INFO HTTP endpoint opened", None),
    ],
)
def test_rules_verdict_from_clef_log(line: str, verdict: str | None) -> None:
    assert uiproto.rules_state_from_log(line) == verdict


def test_rate_limiter_refills() -> None:
    limiter = RateLimiter(rate=2.0, burst=3)
    assert [limiter.allow("a", now=0.0) for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("b", now=0.0)  # per peer
    assert limiter.allow("a", now=0.5)  # one token back after 0.5 s at 2/s
    assert not limiter.allow("a", now=0.5)


def test_rate_limiter_memory_is_bounded() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, max_peers=10)
    for i in range(100):
        limiter.allow(f"peer{i}", now=float(i) / 1000)
    assert len(limiter._buckets) <= 10


def test_http_head_parsing() -> None:
    req = parse_head(b"POST / HTTP/1.1\r\nHost: 10.0.0.1:8550\r\nContent-Length: 12\r\nX-A: 1\r\nX-A: 2")
    assert req.headers["x-a"] == "1, 2" and req.keep_alive
    assert content_length(req, 100) == 12
    with pytest.raises(HttpError) as e:
        content_length(req, 10)
    assert e.value.status == 413
    for bad, status in [
        (b"POST / HTTP/1.1\r\nHost: a\r\nHost: b", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\nHost: a", 400),
        (b"POST / HTTP/3\r\nHost: a", 505),
        (b"POST  / HTTP/1.1\r\nHost: a", 400),
        (b"POST / HTTP/1.1", 400),
    ]:
        with pytest.raises(HttpError) as e:
            parse_head(bad)
        assert e.value.status == status, bad
    req = parse_head(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1")
    with pytest.raises(HttpError, match="malformed Content-Length"):
        content_length(req, 10)


def test_audit_log_lines_mode_and_rotation(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, max_bytes=300, keep=2)
    for i in range(20):
        audit.record({"kind": "rpc", "n": i})
    audit.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    rotated = sorted(tmp_path.glob("audit.jsonl.*"))
    assert [p.name for p in rotated] == ["audit.jsonl.1", "audit.jsonl.2"]  # keep=2, older dropped
    lines = [json.loads(x) for p in [*reversed(rotated), path] for x in p.read_text().splitlines()]
    numbers = [x["n"] for x in lines]
    assert numbers == sorted(numbers) and numbers[-1] == 19
    assert all(p.stat().st_size <= 300 for p in [path, *rotated])
    assert all(x["time"].endswith("Z") for x in lines)


def test_leds_mk2_mk1_and_none(tmp_path: Path) -> None:
    for name in ("LED_WHITE", "LED_BLUE"):
        (tmp_path / "mk2" / name).mkdir(parents=True)
        (tmp_path / "mk2" / name / "brightness").write_text("0")
    mk2 = Leds(tmp_path / "mk2")

    def shown() -> tuple[str, str]:
        return (
            (tmp_path / "mk2/LED_WHITE/brightness").read_text(),
            (tmp_path / "mk2/LED_BLUE/brightness").read_text(),
        )

    mk2.set_state("locked")
    assert shown() == ("1", "0")
    mk2.set_state("ready")
    assert shown() == ("0", "1")
    mk2.request_started()
    assert shown() == ("1", "1")
    mk2.request_finished()
    assert shown() == ("0", "1")

    (tmp_path / "mk1" / "LED").mkdir(parents=True)
    for attr in ("brightness", "trigger"):
        (tmp_path / "mk1" / "LED" / attr).write_text("")
    mk1 = Leds(tmp_path / "mk1")
    mk1.set_state("ready")
    mk1.request_started()
    assert (tmp_path / "mk1/LED/trigger").read_text() == "timer"

    none = Leds(tmp_path / "nothing")
    assert not none.present
    none.set_state("ready")
    none.request_started()  # no-op, no error


def test_audit_group_commit_keeps_every_line_in_order(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "a.jsonl", max_bytes=10_000_000, keep=1)
    for i in range(2000):
        audit.record({"n": i})
    audit.close()
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    assert [json.loads(x)["n"] for x in lines] == list(range(2000))


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "armory_agent", *args],
        capture_output=True, text=True, timeout=60, check=False, cwd=REPO,
    )  # fmt: skip


def test_cli_bad_config_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "agent.toml"
    bad.write_text('[listen]\naddress = "0.0.0.0"\n')
    result = _cli("serve", "--config", str(bad))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {bad}: listen.address must be one host address, not 0.0.0.0"
    ]


def test_cli_without_agent_says_so(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.json"
    cfg.write_text(json.dumps({"control": {"socket": str(tmp_path / "nope.sock")}}))
    result = _cli("status", "--config", str(cfg))
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: agent not running (no control socket at {tmp_path}/nope.sock)"


def test_host_allowlist_follows_the_listen_address() -> None:
    cfg = config.from_mapping({"listen": {"address": "10.0.0.1", "port": 9000}})
    assert cfg.policy.hosts == ("10.0.0.1", "10.0.0.1:9000")
    cfg = config.from_mapping({"policy": {"hosts": ["Signer.Local"]}})
    assert cfg.policy.hosts == ("signer.local",)
