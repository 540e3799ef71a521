"""Qubes end to end with the qrexec stand-in: dapp qubes -> proxy -> qrexec -> armory qube -> agent.

Namespaces the test creates stand for the qubes: `device` is the USB armory (the real agent and
the real Clef on usb0 = 10.0.0.1), `armory` is the armory qube (the other end of the USB link,
10.0.0.2; the qrexec service runs there), and `work`, `other`, `stranger` are dapp qubes with
only loopback, each running the rendered proxy on 127.0.0.1:8550 with a `qrexec-client-vm` on
its PATH that is the stand-in (tests/qrexec_standin.py) told which qube it is. dom0's policy is
the file `qubes-policy` generates: work and other are allowed, stranger is not. Clef's rules
(rendered from a signing policy with a `qubes:` section) let qube work sign and refuse qube other.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import encode_defunct
from web3 import HTTPProvider, Web3
from web3.exceptions import Web3RPCError

from provision import policy as signing_policy
from provision import rules
from qubes import policy
from qubes.files import QubesConfig, write_all
from tests.agent_helpers import (
    REPO,
    AgentProcess,
    ClefState,
    make_clef_state,
    require_tool,
    write_agent_config,
)
from tests.qubes_helpers import exchange, in_netns, request, split_response

pytestmark = pytest.mark.integration

ORIGIN = "https://dapp.example"
SYSTEM_PYTHON = "/usr/bin/python3"
STANDIN = REPO / "tests" / "qrexec_standin.py"
SERVICE_PATH = "usr/local/etc/qubes-rpc/clefarmory.Sign"
DAPP_QUBES = ("work", "other", "stranger")
PROXY_TIMEOUT = 5.0

# The signing policy, rendered into rules.js as provisioning does: both dapp qubes are named (both
# may list accounts), work may sign text, other's section narrows that away. Clef's rules see the qube
# only in req.meta["User-Agent"], which the agent sets to "clef-armory-agent qube=NAME".
SIGNING_POLICY = {
    "version": 2,
    "chain_ids": [1],
    "origins": [ORIGIN],
    "allow_no_origin": True,
    "allow_text_signing": True,
    "qubes": {"work": {}, "other": {"allow_text_signing": False}},
}
RULES = rules.render(signing_policy.parse(SIGNING_POLICY), "qubes-test-policy.yaml")

# Stand-in test services in the armory qube (looked up like qrexec does).
ENV_SERVICE = """#!/usr/bin/python3
import json, sys
env = dict(x.split("=", 1) for x in open("/proc/self/environ").read().split("\\0") if x)
print(json.dumps({"env": env, "argv": sys.argv[1:]}))
print("to-stderr", file=sys.stderr)
sys.exit(3)
"""
TEST_POLICY = """\
test.Env     *  work  armory    allow
test.Env     *  work  @default  allow target=armory
test.Echo    *  work  armory    allow
test.Lookup  *  work  armory    allow
test.Missing *  work  armory    allow
"""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@dataclass
class World:
    root: Path
    ns: dict[str, str]
    agent: AgentProcess
    state: ClefState
    proxies: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    undelivered: Counter[str] = field(default_factory=Counter)  # calls qrexec let fail on purpose

    def calls(self, qube: str, service: str = "clefarmory.Sign") -> int:
        log = self.root / f"calls-{qube}.log"
        if not log.exists():
            return 0
        return sum(1 for line in log.read_text().splitlines() if service in line.split())

    def qrexec(
        self, qube: str, *args: str, stdin: bytes = b"", timeout: float = 60
    ) -> subprocess.CompletedProcess[bytes]:
        """`qrexec-client-vm ARGS` run inside dapp qube `qube`."""
        client = str(self.root / f"bin-{qube}" / "qrexec-client-vm")
        return subprocess.run(["ip", "netns", "exec", self.ns[qube], client, *args], input=stdin,
                              capture_output=True, timeout=timeout, check=False)

    def clef_audit(self) -> str:
        return (self.state.state_dir / "clef-audit.log").read_text()

    def rpc_lines(self, count: int) -> list[dict[str, Any]]:
        """The agent's rpc audit lines once there are `count` (written by a background thread)."""
        deadline = time.monotonic() + 10
        while len(lines := self.agent.rpc_lines()) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return lines


def wait_listening(ns: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, "proxy exited"
        try:
            in_netns(ns, lambda: socket.create_connection(("127.0.0.1", 8550), timeout=1).close())
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError("proxy not listening")


SOCKET_ACTIVATION = """
import os, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 8550)); s.listen(64)
os.dup2(s.fileno(), 3); os.set_inheritable(3, True)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
os.execv(sys.executable, [sys.executable, sys.argv[1]])
"""


@pytest.fixture(scope="module")
def world(clef_binary: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    require_tool("ip")
    require_tool("curl")
    root = tmp_path_factory.mktemp("qubes-world")
    tag = uuid.uuid4().hex[:6]
    ns = {q: f"q{q[:3]}-{tag}" for q in ("device", "armory", *DAPP_QUBES)}
    created: list[str] = []
    procs: list[subprocess.Popen[bytes]] = []
    agent: AgentProcess | None = None
    try:
        for name in ns.values():
            ip("netns", "add", name)
            created.append(name)
            ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
        # The USB link between the armory and the qube it is attached to.
        ip("link", "add", f"u0-{tag}", "netns", ns["device"], "type", "veth",
           "peer", "name", "host0", "netns", ns["armory"])  # fmt: skip
        ip("-n", ns["device"], "link", "set", f"u0-{tag}", "name", "usb0")
        ip("-n", ns["device"], "addr", "add", "10.0.0.1/24", "dev", "usb0")
        ip("-n", ns["device"], "link", "set", "usb0", "up")
        ip("-n", ns["armory"], "addr", "add", "10.0.0.2/24", "dev", "host0")
        ip("-n", ns["armory"], "link", "set", "host0", "up")

        # The armory qube gets the default files; the dapp qubes' proxy runs on a short clock.
        write_all(QubesConfig(), root / "armory-files")
        dapp_cfg = QubesConfig(call_timeout=PROXY_TIMEOUT, armory_timeout=PROXY_TIMEOUT - 1)
        write_all(dapp_cfg, root / "dapp-files")
        armory_root = root / "armory-files" / "armory-qube"
        rpc_local, rpc_etc = armory_root / "usr/local/etc/qubes-rpc", armory_root / "etc/qubes-rpc"
        rpc_etc.mkdir(parents=True)
        for path, text in {
            rpc_local / "test.Env": ENV_SERVICE,
            rpc_local / "test.Echo": "#!/bin/sh\nexec cat\n",
            rpc_local / "test.Lookup": "#!/bin/sh\necho local-generic\n",
            rpc_etc / "test.Lookup": "#!/bin/sh\necho etc-generic\n",
            rpc_etc / "test.Lookup+special": "#!/bin/sh\necho etc-special\n",
        }.items():
            path.write_text(text)
            path.chmod(0o755)
        policy_dir = root / "policy.d"
        policy.write(policy_dir, policy.render("armory", ["work", "other"]))
        (policy_dir / "20-tests.policy").write_text(TEST_POLICY)
        world_file = root / "world.json"
        world_file.write_text(json.dumps({
            "policy_dir": str(policy_dir),
            "qubes": {"armory": {"root": str(armory_root), "netns": ns["armory"]},
                      **{q: {"tags": []} for q in DAPP_QUBES}},
        }))  # fmt: skip
        for q in DAPP_QUBES:
            bindir = root / f"bin-{q}"
            bindir.mkdir()
            wrapper = bindir / "qrexec-client-vm"
            wrapper.write_text(f'#!/bin/sh\necho "$$ $*" >> {root}/calls-{q}.log\n'
                               f'exec {sys.executable} {STANDIN} --world {world_file} --source {q} "$@"\n')
            wrapper.chmod(0o755)

        state = make_clef_state(clef_binary, root / "state", rules_text=RULES)
        config = root / "agent.json"
        write_agent_config(config, clef_binary, state.state_dir, interface="usb0", address="10.0.0.1",
                           port=8550, policy={"origins": [ORIGIN]})
        agent = AgentProcess(config, prefix=["ip", "netns", "exec", ns["device"]]).start()
        assert agent.unlock_cli(state.master_password).returncode == 0, agent.log_text()[-2000:]
        w = World(root, ns, agent, state)

        proxy = root / "dapp-files" / "dapp-qube" / "usr/local/bin/clef-armory-proxy"
        for q in DAPP_QUBES:
            env = {"PATH": f"{root}/bin-{q}:/usr/bin:/bin"}
            # work gets its socket the way systemd passes it (LISTEN_FDS); the others bind it.
            argv = ([SYSTEM_PYTHON, "-c", SOCKET_ACTIVATION, str(proxy)] if q == "work"
                    else [SYSTEM_PYTHON, str(proxy)])
            log = (root / f"proxy-{q}.log").open("ab")
            p = subprocess.Popen(["ip", "netns", "exec", ns[q], *argv], env=env, stdout=log, stderr=log)
            log.close()
            procs.append(p)
            w.proxies[q] = p
            wait_listening(ns[q], p)
        yield w
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        if agent is not None:
            agent.stop()
        for name in created:
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=30, check=False)


def rpc_bytes(method: str, params: list[Any], rpc_id: int = 1) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": rpc_id, "method": method, "params": params}).encode()


def post(world: World, qube: str, body: bytes, headers: list[tuple[str, str]] | None = None,
         timeout: float = 30) -> tuple[int, dict[str, str], Any]:
    hdrs = headers if headers is not None else [
        ("Host", "127.0.0.1:8550"), ("Content-Type", "application/json"), ("Content-Length", str(len(body)))
    ]
    raw = in_netns(world.ns[qube], exchange, request("POST", body, hdrs), 8550, timeout)
    status, h, data = split_response(raw)
    return status, h, json.loads(data) if data else None


# --- the stand-in itself -----------------------------------------------------------------------


def test_standin_environment_stdio_and_exit_codes(world: World) -> None:
    out = world.qrexec("work", "armory", "test.Env")
    assert out.returncode == 3 and out.stderr == b"to-stderr\n"
    seen = json.loads(out.stdout)
    assert seen["argv"] == []
    env = seen["env"]
    assert env.pop("QREXEC_AGENT_PID").isdigit()
    assert env == {"PATH": env["PATH"], "QREXEC_REMOTE_DOMAIN": "work",
                   "QREXEC_SERVICE_FULL_NAME": "test.Env+"}  # trailing + without an argument
    out = world.qrexec("work", "@default", "test.Env+a b/c")
    seen = json.loads(out.stdout)
    assert seen["argv"] == ["a_b_c"]
    assert seen["env"]["QREXEC_SERVICE_ARGUMENT"] == "a_b_c"
    assert seen["env"]["QREXEC_SERVICE_FULL_NAME"] == "test.Env+a_b_c"

    data = bytes(range(256)) * 512  # raw binary both ways
    out = world.qrexec("work", "armory", "test.Echo", stdin=data)
    assert (out.returncode, out.stdout) == (0, data)

    assert world.qrexec("work", "armory", "test.Lookup").stdout == b"local-generic\n"
    assert world.qrexec("work", "armory", "test.Lookup+special").stdout == b"etc-special\n"
    assert world.qrexec("work", "armory", "test.Lookup+x").stdout == b"local-generic\n"
    assert world.qrexec("work", "armory", "test.Missing").returncode == 127
    denied = world.qrexec("stranger", "armory", "test.Env")
    assert (denied.returncode, denied.stdout, denied.stderr) == (126, b"", b"Request refused\n")
    assert world.qrexec("work", "other", "test.Env").returncode == 126

    bad = world.root / "policy.d" / "40-Bad.policy"
    bad.write_text("# a name dom0 cannot load breaks every call\n")
    try:
        assert world.qrexec("work", "armory", "test.Echo", stdin=b"x").returncode == 126
    finally:
        bad.unlink()


def test_parallel_calls_through_the_standin(world: World) -> None:
    results: list[subprocess.CompletedProcess[bytes]] = []
    payloads = [os.urandom(200_000) for _ in range(4)]
    def one(data: bytes) -> None:
        results.append(world.qrexec("work", "armory", "test.Echo", stdin=data))

    threads = [threading.Thread(target=one, args=(d,)) for d in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.stdout for r in results) == sorted(payloads)


# --- clients in the dapp qubes -------------------------------------------------------------------


def test_curl_in_work(world: World) -> None:
    before = len(world.rpc_lines(0))
    out = subprocess.run(
        ["ip", "netns", "exec", world.ns["work"], "curl", "-sS", "-i", "--max-time", "30",
         "-H", "Content-Type: application/json", "-H", f"Origin: {ORIGIN}", "-A", "evil/1 qube=other",
         "-H", "X-Forwarded-For: 6.6.6.6", "--data", rpc_bytes("account_list", []).decode(),
         "http://127.0.0.1:8550/"],
        capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    status, headers, body = split_response(out.stdout)
    assert status == 200, out.stdout
    assert json.loads(body)["result"] == [world.state.address.lower()]
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    line = world.rpc_lines(before + 1)[-1]
    # Host arrived fixed (the agent only allows 10.0.0.1:8550), Origin intact, the qube from qrexec.
    assert (line["qube"], line["origin"], line["peer"], line["status"]) == ("work", ORIGIN, "10.0.0.2", 200)
    clef = world.clef_audit()
    assert '\\"User-Agent\\":\\"clef-armory-agent qube=work\\"' in clef
    health = subprocess.run(["ip", "netns", "exec", world.ns["work"], "curl", "-sS", "--max-time", "30",
                             "http://localhost:8550/health"], capture_output=True, timeout=60, check=True)
    assert json.loads(health.stdout)["state"] == "ready"  # GET travels too
    assert world.rpc_lines(before + 2)[-1]["method"] == "GET /health"
    assert "evil/1" not in clef and "6.6.6.6" not in clef and "qube=other" not in clef


def web3_session(address: str, message: str) -> dict[str, Any]:
    w3 = Web3(HTTPProvider("http://127.0.0.1:8550", request_kwargs={"timeout": 30}))
    report: dict[str, Any] = {"accounts": w3.eth.accounts}
    try:
        signature: Any = w3.eth.sign(address, text=message)  # HexBytes, typed as HexStr
        report["signature"] = Web3.to_hex(signature)
    except Web3RPCError as e:
        report["error"] = str(e)
    return report


def test_web3_work_signs_and_other_is_refused_by_the_rules(world: World) -> None:
    address = world.state.address
    work = in_netns(world.ns["work"], web3_session, address, "signed in qube work")
    assert work["accounts"] == [address]
    recovered = Account.recover_message(encode_defunct(text="signed in qube work"),
                                        signature=bytes.fromhex(work["signature"].removeprefix("0x")))
    assert recovered == address
    other = in_netns(world.ns["other"], web3_session, address, "signed in qube other")
    assert other["accounts"] == [address]  # listing is allowed for both
    assert "signature" not in other and "rules rejected" in other["error"]
    lines = world.agent.rpc_lines()
    signs = [x for x in lines if x["method"] == "eth_sign"]
    assert [(x["qube"], x["error"]) for x in signs[-2:]] == [("work", None), ("other", 4001)]


def test_ethers_in_work(world: World) -> None:
    js = REPO / "tests" / "js"
    if not (js / "node_modules" / "ethers").is_dir():
        subprocess.run([require_tool("npm"), "ci", "--no-audit", "--no-fund"], cwd=js, check=True,
                       timeout=600, capture_output=True)
    out = subprocess.run(["ip", "netns", "exec", world.ns["work"], require_tool("node"),
                          str(js / "qubes_client.mjs"), "hello from ethers in work"],
                         capture_output=True, text=True, timeout=120, check=True)
    report = json.loads(out.stdout)
    assert "error" not in report, report
    assert report["accounts"] == [world.state.address]
    assert report["recovered"] == world.state.address


# --- refusals ------------------------------------------------------------------------------------


def test_a_qube_dom0_does_not_allow_gets_the_policy_error(world: World) -> None:
    before, calls = len(world.rpc_lines(0)), world.calls("stranger")
    status, _, body = post(world, "stranger", rpc_bytes("account_list", []))
    assert status == 403
    assert body["error"]["code"] == -32003
    assert "dom0 policy refused clefarmory.Sign" in body["error"]["message"]
    assert "30-clef-armory.policy" in body["error"]["message"]
    assert world.calls("stranger") == calls + 1
    time.sleep(0.3)
    assert len(world.agent.rpc_lines()) == before


def test_qrexec_failures_become_json_rpc_errors(world: World) -> None:
    service = world.root / "armory-files" / "armory-qube" / SERVICE_PATH
    service.chmod(0o644)  # not an executable service: qrexec exits 127
    try:
        status, _, body = post(world, "work", rpc_bytes("account_list", []))
    finally:
        service.chmod(0o755)
    assert status == 502 and "not installed in the armory qube" in body["error"]["message"]
    world_file = world.root / "world.json"
    saved = world_file.read_text()
    broken = json.loads(saved)
    broken["qubes"]["armory"]["unreachable"] = True
    world_file.write_text(json.dumps(broken))
    try:
        status, _, body = post(world, "work", rpc_bytes("account_list", []))
    finally:
        world_file.write_text(saved)
    assert status == 502 and "exit 125" in body["error"]["message"]
    world.undelivered["work"] += 2
    assert post(world, "work", rpc_bytes("account_list", []))[0] == 200


BODY = rpc_bytes("account_list", [])
CT = ("Content-Type", "application/json")
CL = ("Content-Length", str(len(BODY)))
HOST = ("Host", "127.0.0.1:8550")


@pytest.mark.parametrize(
    ("headers", "status", "message"),
    [
        ([("Host", "evil.example:8550"), CT, CL], 403, "Host not allowed"),
        ([("Host", "127.0.0.1"), CT, CL], 403, "Host not allowed"),
        ([HOST, HOST, CT, CL], 400, "repeated host"),
        ([HOST, CT, CT, CL], 400, "repeated content-type"),
        ([HOST, CT, ("Transfer-Encoding", "chunked"), CL], 400, "Transfer-Encoding"),
        ([HOST, CT, ("X-Note", "a"), (" b", "c"), CL], 400, "folded"),
        ([HOST, CT, ("X-Clef-Armory-Qube", "other"), CL], 400, "set by the armory qube"),
        ([HOST, CT, ("Content-Length", "5242880")], 413, "larger than"),
    ],
)
def test_proxy_refuses_before_qrexec(world: World, headers: list[tuple[str, str]], status: int,
                                     message: str) -> None:
    calls = world.calls("work")
    big = any(v == "5242880" for _, v in headers)
    raw = in_netns(world.ns["work"], exchange, request("POST", b"" if big else BODY, headers), 8550, 30,
                   b"\0" * 5242880 if big else b"")
    got, _, body = split_response(raw)
    assert got == status and message in json.loads(body)["error"]["message"]
    assert world.calls("work") == calls  # qrexec was never started


def test_caller_user_agent_is_neutralised_and_localhost_allowed(world: World) -> None:
    before = len(world.rpc_lines(0))
    status, _, body = post(world, "work", BODY, [("Host", "localhost:8550"), CT, CL,
                                                 ("User-Agent", "x qube=other")])
    assert status == 200 and body["result"] == [world.state.address.lower()]
    assert world.rpc_lines(before + 1)[-1]["qube"] == "work"
    assert "x qube=other" not in world.clef_audit()


def test_direct_qrexec_caller_cannot_claim_a_qube(world: World) -> None:
    """A program in qube work that speaks to qrexec itself, skipping the proxy."""
    before = len(world.rpc_lines(0))
    framed = request("POST", BODY, [("Host", "10.0.0.1:8550"), CT, CL, ("X-Clef-Armory-Qube", "other"),
                                    ("User-Agent", "clef-armory-agent qube=other")])
    out = world.qrexec("work", "@default", "clefarmory.Sign", stdin=framed)
    status, _, _ = split_response(out.stdout)
    assert (out.returncode, status) == (0, 200), out
    assert world.rpc_lines(before + 1)[-1]["qube"] == "work"


def test_seed_account_new_through_qrexec(world: World) -> None:
    """docs/qubes.md: the seed's own test, adapted: a valid framed account_new call reaches the
    agent and gets its method-not-served error (not a framing error)."""
    body = rpc_bytes("account_new", [], 67)
    framed = request("POST", body, [("Host", "armory"), CT, ("Content-Length", str(len(body)))])
    out = world.qrexec("work", "armory", "clefarmory.Sign", stdin=framed)
    status, _, data = split_response(out.stdout)
    assert (out.returncode, status) == (0, 200)
    assert json.loads(data) == {"jsonrpc": "2.0", "id": 67,
                                "error": {"code": -32601, "message": "method not allowed"}}


def test_parallel_requests_through_the_proxy(world: World) -> None:
    before = len(world.rpc_lines(0))
    results: list[int] = []

    def one() -> None:
        results.append(post(world, "work", BODY)[0])

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 6
    assert [x["qube"] for x in world.rpc_lines(before + 6)[before:]] == ["work"] * 6


def read_cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


def test_hung_armory_times_out_on_the_proxy_clock(world: World) -> None:
    assert world.agent.proc is not None
    pid = world.agent.proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        status, _, body = post(world, "work", BODY, timeout=30)
        elapsed = time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGCONT)
    assert status == 504 and f"did not answer within {PROXY_TIMEOUT}" in body["error"]["message"]
    assert PROXY_TIMEOUT - 0.5 < elapsed < PROXY_TIMEOUT + 3
    service = str(world.root / "armory-files" / "armory-qube" / SERVICE_PATH)
    leftover = [p for p in Path("/proc").iterdir()
                if p.name.isdigit() and service.encode() in read_cmdline(p)]
    assert leftover == []  # the qrexec call was ended with it
    assert post(world, "work", BODY)[0] == 200


def test_every_request_appears_once_with_its_qube(world: World) -> None:
    """Every clefarmory.Sign call that qrexec let through is exactly one audit line of its qube."""
    time.sleep(0.5)
    lines = world.agent.rpc_lines()
    seen = Counter(x["qube"] for x in lines)
    expected = Counter({q: world.calls(q) - world.undelivered[q] for q in ("work", "other")})
    assert seen == expected, (seen, expected)
    assert world.calls("stranger") >= 1 and "stranger" not in seen
