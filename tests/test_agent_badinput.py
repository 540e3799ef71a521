"""Bad input at the front door: every request is refused cleanly, audited once, and the agent
stays up and answers the next good request. Real agent, real Clef, real sockets (loopback)."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent_helpers import (
    AgentProcess,
    ClefState,
    call,
    make_clef_state,
    rpc,
    running_agent,
    wait_audit,
    write_agent_config,
)

pytestmark = pytest.mark.integration

ORIGIN = "http://dapp.test:3000"


@pytest.fixture(scope="module")
def clef_state(clef_binary: Path, tmp_path_factory: pytest.TempPathFactory) -> ClefState:
    return make_clef_state(clef_binary, tmp_path_factory.mktemp("bad") / "state")


@pytest.fixture(scope="module")
def agent(clef_binary: Path, clef_state: ClefState) -> Iterator[AgentProcess]:
    config = clef_state.state_dir.parent / "agent.json"
    policy = {
        "origins": [ORIGIN],
        "cors": True,
        "header_timeout": 1.0,
        "body_timeout": 1.0,
        "max_connections": 32,
        "rate": 10000.0,
        "burst": 10000,
        "max_batch": 4,
    }
    write_agent_config(config, clef_binary, clef_state.state_dir, policy=policy)
    with running_agent(config) as a:
        assert a.unlock_cli(clef_state.master_password).returncode == 0
        yield a


class Audit:
    """Counts audit lines: each test states how many requests it made."""

    def __init__(self, agent: AgentProcess) -> None:
        self.agent = agent
        self.before = len(agent.rpc_lines())

    def new(self, expected: int) -> list[dict[str, object]]:
        lines = wait_audit(self.agent, self.before + expected)[self.before :]
        assert len(lines) == expected, lines
        return lines


def good(agent: AgentProcess, clef_state: ClefState) -> None:
    status, body = call(agent.address, agent.port, "account_list", [])
    assert status == 200 and body["result"] == [clef_state.address.lower()]


def clef_audit(clef_state: ClefState) -> str:
    return (clef_state.state_dir / "clef-audit.log").read_text()


def raw_request(agent: AgentProcess, data: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection((agent.address, agent.port), timeout=timeout) as s:
        s.sendall(data)
        buf = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return buf
            buf += chunk


def test_oversize_body(agent: AgentProcess, clef_state: ClefState) -> None:
    audit = Audit(agent)
    big = b'{"jsonrpc":"2.0","id":1,"method":"account_list","params":["' + b"a" * 300_000 + b'"]}'
    status, body = rpc(agent.address, agent.port, big)
    assert status == 413 and body["error"]["code"] == -32600
    good(agent, clef_state)
    assert [x["status"] for x in audit.new(2)] == [413, 200]


def test_malformed_and_invalid_json(agent: AgentProcess, clef_state: ClefState) -> None:
    audit = Audit(agent)
    before = clef_audit(clef_state)
    status, body = rpc(agent.address, agent.port, b'{"jsonrpc": "2.0", "method": ')
    assert status == 400 and body["error"]["code"] == -32700
    status, body = rpc(agent.address, agent.port, {"jsonrpc": "2.0", "id": 1})
    assert status == 400 and body["error"]["code"] == -32600
    status, body = rpc(agent.address, agent.port, [])
    assert status == 400 and body["error"]["code"] == -32600
    status, body = rpc(agent.address, agent.port, {"jsonrpc": "2.0", "id": 1.5, "method": "x"})
    assert status == 400 and body["error"]["code"] == -32600
    assert clef_audit(clef_state) == before  # none of it reached Clef
    good(agent, clef_state)
    audit.new(5)


def test_batches(agent: AgentProcess, clef_state: ClefState) -> None:
    audit = Audit(agent)
    one = {"jsonrpc": "2.0", "method": "account_version", "params": []}
    status, body = rpc(agent.address, agent.port, [dict(one, id=i) for i in range(5)])
    assert status == 400 and body["error"]["code"] == -32600 and "batch" in body["error"]["message"]
    status, body = rpc(
        agent.address, agent.port, [dict(one, id=1), dict(one, id=2, method="account_new"), 7]
    )
    assert status == 200
    assert body[0] == {"jsonrpc": "2.0", "id": 1, "result": "6.1.0"}
    assert body[1]["error"]["code"] == -32601
    assert body[2]["error"]["code"] == -32600
    good(agent, clef_state)
    audit.new(3)


def test_disallowed_methods_never_reach_clef(agent: AgentProcess, clef_state: ClefState) -> None:
    audit = Audit(agent)
    before = clef_audit(clef_state)
    for method in ("account_new", "rpc_modules", "clef_listAccounts", "eth_getBalance", "x" * 200):
        status, body = call(agent.address, agent.port, method, [])
        assert status == 200 and body["error"]["code"] == -32601, method
    assert clef_audit(clef_state) == before
    assert not list(clef_state.state_dir.joinpath("keystore").glob("*"))[1:]  # still one key
    good(agent, clef_state)
    lines = audit.new(6)
    assert lines[4]["method"] == "x" * 64  # long names are cut in the audit log


def test_foreign_host_and_origin(agent: AgentProcess, clef_state: ClefState) -> None:
    audit = Audit(agent)
    for host in ("evil.example", "localhost", f"evil.example:{agent.port}", "10.0.0.1:8550"):
        status, body = call(agent.address, agent.port, "account_list", [], host_header=host)
        assert status == 403 and "Host" in body["error"]["message"], host
    status, body = call(
        agent.address, agent.port, "account_list", [], headers={"Origin": "http://evil.example"}
    )
    assert status == 403 and "Origin" in body["error"]["message"]
    status, body = call(agent.address, agent.port, "account_list", [], headers={"Origin": "null"})
    assert status == 403
    good(agent, clef_state)
    audit.new(7)


def test_allowed_origin_gets_cors(agent: AgentProcess, clef_state: ClefState) -> None:
    audit = Audit(agent)
    conn = http.client.HTTPConnection(agent.address, agent.port, timeout=10)
    host = f"{agent.address}:{agent.port}"
    conn.request("OPTIONS", "/", headers={"Host": host, "Origin": ORIGIN})
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 204
    assert resp.getheader("Access-Control-Allow-Origin") == ORIGIN
    assert "POST" in (resp.getheader("Access-Control-Allow-Methods") or "")
    conn.close()
    status, _ = call(
        agent.address, agent.port, "account_list", [],
        headers={"Origin": ORIGIN, "User-Agent": "dapp-test/2"},
    )  # fmt: skip
    assert status == 200
    assert '\\"Origin\\":\\"http://dapp.test:3000\\"' in clef_audit(clef_state)
    # The client's User-Agent never reaches Clef: the agent sets its own (no qube header here).
    assert "dapp-test/2" not in clef_audit(clef_state)
    assert '\\"User-Agent\\":\\"clef-armory-agent\\"' in clef_audit(clef_state)
    lines = audit.new(2)
    assert lines[1]["origin"] == ORIGIN


def test_spoofed_forwarding_headers_are_ignored(agent: AgentProcess, clef_state: ClefState) -> None:
    audit = Audit(agent)
    headers = {"X-Forwarded-For": "10.9.9.9", "X-Real-IP": "10.8.8.8", "Forwarded": "for=10.7.7.7"}
    status, _ = call(agent.address, agent.port, "account_list", [], headers=headers)
    assert status == 200
    (line,) = audit.new(1)
    assert line["peer"] == "127.0.0.1"
    log = clef_audit(clef_state)
    assert "10.9.9.9" not in log and "10.8.8.8" not in log and "10.7.7.7" not in log


def test_http_level_refusals(agent: AgentProcess, clef_state: ClefState) -> None:
    audit = Audit(agent)
    host = f"Host: {agent.address}:{agent.port}\r\n".encode()
    body = b'{"jsonrpc":"2.0","id":1,"method":"account_list"}'
    cases = {
        b"POST / HTTP/1.1\r\n" + host + b"Content-Type: text/plain\r\nContent-Length: %d\r\n\r\n"
        % len(body) + body: 415,
        b"GET / HTTP/1.1\r\n" + host + b"\r\n": 405,
        b"POST / HTTP/1.1\r\n" + host + b"Content-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n": 411,
        b"POST /x HTTP/1.1\r\n" + host + b"Content-Length: 0\r\n\r\n": 404,
        b"POST / HTTP/2.0\r\n" + host + b"\r\n": 505,
        b"BAD REQUEST LINE HERE\r\n\r\n": 400,
        b"POST / HTTP/1.1\r\n" + host + b" folded\r\n\r\n": 400,
        b"POST / HTTP/1.1\r\n\r\n": 400,
    }
    for data, want in cases.items():
        reply = raw_request(agent, data)
        status = int(reply.split(b" ", 2)[1])
        assert status == want, (data, reply)
        assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"]["code"] < 0
    good(agent, clef_state)
    audit.new(len(cases) + 1)


def test_slow_headers_are_cut_off(agent: AgentProcess, clef_state: ClefState) -> None:
    audit = Audit(agent)
    with socket.create_connection((agent.address, agent.port), timeout=10) as slow:
        slow.sendall(b"POST / HTTP/1.1\r\nHost: x\r\n")
        good(agent, clef_state)  # the agent serves others meanwhile
        start = time.monotonic()
        reply = slow.recv(65536)
        assert reply.startswith(b"HTTP/1.1 408 ")
        assert slow.recv(65536) == b""  # and closes
        assert time.monotonic() - start < 9  # cut off by the 1 s header timeout, not ours
    with socket.create_connection((agent.address, agent.port), timeout=10) as slow_body:
        slow_body.sendall(
            f"POST / HTTP/1.1\r\nHost: {agent.address}:{agent.port}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{".encode()
        )
        assert slow_body.recv(65536).startswith(b"HTTP/1.1 408 ")
    good(agent, clef_state)
    assert [x["status"] for x in audit.new(4)] == [200, 408, 408, 200]


def test_idle_connection_is_closed_without_a_request(agent: AgentProcess) -> None:
    audit = Audit(agent)
    with socket.create_connection((agent.address, agent.port), timeout=10) as idle:
        assert idle.recv(65536) == b""
    audit.new(0)


def test_200_concurrent_connections(agent: AgentProcess, clef_state: ClefState) -> None:
    audit = Audit(agent)
    statuses: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(200, timeout=30)

    def client(i: int) -> None:
        try:
            sock = socket.create_connection((agent.address, agent.port), timeout=30)
            barrier.wait()
            payload = json.dumps({"jsonrpc": "2.0", "id": i, "method": "account_version"}).encode()
            sock.sendall(
                f"POST / HTTP/1.1\r\nHost: {agent.address}:{agent.port}\r\nConnection: close\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
                + payload
            )
            buf = b""
            while chunk := sock.recv(65536):
                buf += chunk
            sock.close()
            head, _, body = buf.partition(b"\r\n\r\n")
            json.loads(body)
            with lock:
                statuses.append(int(head.split()[1]))
        except Exception as e:
            with lock:
                errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:5]
    assert len(statuses) == 200
    assert set(statuses) <= {200, 503}
    assert statuses.count(200) >= 32  # at least the allowed connections got through
    good(agent, clef_state)
    assert len(audit.new(201)) == 201
    assert agent.proc is not None and agent.proc.poll() is None


def test_rate_limit_per_peer(clef_binary: Path, tmp_path: Path) -> None:
    state = make_clef_state(clef_binary, tmp_path / "state", rules_text=None)
    config = tmp_path / "agent.json"
    write_agent_config(config, clef_binary, state.state_dir, policy={"rate": 0.2, "burst": 3})
    with running_agent(config) as agent:
        statuses = []
        for _ in range(6):
            status, body = call(agent.address, agent.port, "account_version", [])
            statuses.append(status)
            if status == 429:
                assert body["error"]["message"] == "rate limit exceeded"
        assert statuses[:3] == [503, 503, 503]  # locked, but within the burst
        assert statuses[3:] == [429, 429, 429]
        assert [x["status"] for x in wait_audit(agent, 6)] == statuses


def test_qube_header_is_checked_audited_and_becomes_clefs_user_agent(
    agent: AgentProcess, clef_state: ClefState
) -> None:
    """X-Clef-Armory-Qube (set by the armory qube's qrexec service, docs/qubes.md): a valid name
    is audited and reaches Clef's rules only as the agent's own User-Agent; anything else is refused."""
    audit = Audit(agent)
    before = clef_audit(clef_state)
    for bad in ("", "a b", "x" * 32, "work, other", "wörk", "../etc"):
        status, body = call(agent.address, agent.port, "account_list", [],
                            headers={"X-Clef-Armory-Qube": bad})
        assert status == 400 and "X-Clef-Armory-Qube" in body["error"]["message"], bad
    assert clef_audit(clef_state) == before  # none of it reached Clef
    status, _ = call(agent.address, agent.port, "account_list", [],
                     headers={"X-Clef-Armory-Qube": "work-1.x_y", "User-Agent": "client qube=other"})
    assert status == 200
    assert '\\"User-Agent\\":\\"clef-armory-agent qube=work-1.x_y\\"' in clef_audit(clef_state)
    assert "client qube=other" not in clef_audit(clef_state)
    lines = audit.new(7)
    assert [x["qube"] for x in lines] == [None] * 6 + ["work-1.x_y"]
    assert [x["status"] for x in lines] == [400] * 6 + [200]
