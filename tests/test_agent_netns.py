"""Interface binding in network namespaces the test creates: usb0 only, kernel-enforced.

Namespaces: A runs the agent (usb0 = 10.0.0.1/24, eth1 = 192.168.77.1/24); B is the laptop on
usb0 (10.0.0.2); C sits on eth1 and routes 10.0.0.1 through it, which Linux would accept for a
plain bound socket: only SO_BINDTODEVICE refuses it. 10.0.0.x never exists outside these.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.agent_helpers import (
    AgentProcess,
    make_clef_state,
    require_tool,
    write_agent_config,
)

pytestmark = pytest.mark.integration

PROBE = r"""
import json, socket, sys
addr, port, body = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(); s.settimeout(2.0)
try:
    s.connect((addr, port))
    if body:
        data = body.encode()
        head = ("POST / HTTP/1.1\r\nHost: 10.0.0.1:8550\r\nContent-Type: application/json\r\n"
                "Connection: close\r\nContent-Length: %d\r\n\r\n" % len(data)).encode()
        s.sendall(head + data)
    else:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 10.0.0.1:8550\r\nConnection: close\r\n\r\n")
    buf = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    head, _, payload = buf.partition(b"\r\n\r\n")
    print(json.dumps({"result": "ok", "status": int(head.split()[1]), "body": json.loads(payload)}))
except ConnectionRefusedError:
    print(json.dumps({"result": "refused"}))
except (TimeoutError, socket.timeout):
    print(json.dumps({"result": "timeout"}))
except OSError as e:
    print(json.dumps({"result": "error", "errno": e.errno}))
"""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def in_ns(ns: str, *args: str) -> None:
    ip("netns", "exec", ns, *args)


@dataclass(frozen=True)
class Net:
    agent: str
    laptop: str
    other: str


@pytest.fixture
def namespaces() -> Iterator[Net]:
    require_tool("ip")
    tag = uuid.uuid4().hex[:6]
    net = Net(f"armory-a-{tag}", f"armory-b-{tag}", f"armory-c-{tag}")
    created: list[str] = []
    try:
        for ns in (net.agent, net.laptop, net.other):
            ip("netns", "add", ns)
            created.append(ns)
            in_ns(ns, "ip", "link", "set", "lo", "up")
        # A <-> C: the "other" interface, eth1, with another address.
        ip("link", "add", f"e1-{tag}", "netns", net.agent, "type", "veth",
           "peer", "name", "ceth", "netns", net.other)  # fmt: skip
        in_ns(net.agent, "ip", "link", "set", f"e1-{tag}", "name", "eth1")
        in_ns(net.agent, "ip", "addr", "add", "192.168.77.1/24", "dev", "eth1")
        in_ns(net.agent, "ip", "link", "set", "eth1", "up")
        in_ns(net.other, "ip", "addr", "add", "192.168.77.2/24", "dev", "ceth")
        in_ns(net.other, "ip", "link", "set", "ceth", "up")
        in_ns(net.other, "ip", "route", "add", "10.0.0.1/32", "via", "192.168.77.1")
        yield net
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=30, check=False)


def add_usb0(net: Net) -> None:
    """The USB link: usb0 in A, 'host0' in B (the laptop)."""
    ip("link", "add", f"u0-{net.agent[-6:]}", "netns", net.agent, "type", "veth",
       "peer", "name", "host0", "netns", net.laptop)  # fmt: skip
    in_ns(net.agent, "ip", "link", "set", f"u0-{net.agent[-6:]}", "name", "usb0")
    in_ns(net.agent, "ip", "addr", "add", "10.0.0.1/24", "dev", "usb0")
    in_ns(net.agent, "ip", "link", "set", "usb0", "up")
    in_ns(net.laptop, "ip", "addr", "add", "10.0.0.2/24", "dev", "host0")
    in_ns(net.laptop, "ip", "link", "set", "host0", "up")
    in_ns(net.laptop, "ip", "route", "add", "192.168.77.0/24", "via", "10.0.0.1")


def probe(ns: str, addr: str, port: int = 8550, body: str = "") -> dict[str, object]:
    out = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", PROBE, addr, str(port), body],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return dict(json.loads(out.stdout))


def wait_probe(ns: str, addr: str, want: str, timeout: float = 20.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        result = probe(ns, addr)
        if result["result"] == want or time.monotonic() > deadline:
            return result
        time.sleep(0.3)


def test_agent_answers_only_on_usb0(
    namespaces: Net, clef_binary: Path, tmp_path: Path
) -> None:
    net = namespaces
    state = make_clef_state(clef_binary, tmp_path / "state")
    config = tmp_path / "agent.json"
    write_agent_config(
        config, clef_binary, state.state_dir, interface="usb0", address="10.0.0.1", port=8550
    )
    agent = AgentProcess(config, prefix=["ip", "netns", "exec", net.agent])
    try:
        # The agent starts before usb0 exists and waits for it.
        agent.start()
        add_usb0(net)
        assert wait_probe(net.laptop, "10.0.0.1", "ok")["status"] == 200

        # Every other address and path is refused.
        assert probe(net.laptop, "192.168.77.1")["result"] == "refused"
        assert probe(net.other, "192.168.77.1")["result"] == "refused"
        assert probe(net.other, "10.0.0.1")["result"] == "refused"  # right address, wrong interface
        assert probe(net.agent, "127.0.0.1")["result"] == "refused"
        # The device's own processes still reach it: Linux matches local traffic to 10.0.0.1
        # against the device that owns the address (documented in docs/agent.md).
        assert probe(net.agent, "10.0.0.1")["result"] == "ok"

        assert agent.unlock_cli(state.master_password).returncode == 0
        account_list = json.dumps({"jsonrpc": "2.0", "id": 7, "method": "account_list"})
        reply = probe(net.laptop, "10.0.0.1", body=account_list)
        assert reply["status"] == 200
        assert reply["body"] == {"jsonrpc": "2.0", "id": 7, "result": [state.address.lower()]}

        # Unplug / replug: link down and up.
        in_ns(net.agent, "ip", "link", "set", "usb0", "down")
        assert probe(net.laptop, "10.0.0.1")["result"] != "ok"
        in_ns(net.agent, "ip", "link", "set", "usb0", "up")
        assert wait_probe(net.laptop, "10.0.0.1", "ok")["status"] == 200

        # Address removed and re-added.
        in_ns(net.agent, "ip", "addr", "del", "10.0.0.1/24", "dev", "usb0")
        assert probe(net.laptop, "10.0.0.1")["result"] != "ok"
        in_ns(net.agent, "ip", "addr", "add", "10.0.0.1/24", "dev", "usb0")
        assert wait_probe(net.laptop, "10.0.0.1", "ok")["status"] == 200

        # The gadget interface re-created (new ifindex): the agent rebinds.
        in_ns(net.agent, "ip", "link", "delete", "usb0")
        add_usb0(net)
        assert wait_probe(net.laptop, "10.0.0.1", "ok")["status"] == 200
        assert probe(net.other, "10.0.0.1")["result"] == "refused"
        reply = probe(net.laptop, "10.0.0.1", body=account_list)
        assert reply["body"]["result"] == [state.address.lower()]  # type: ignore[index]
        assert agent.proc is not None and agent.proc.poll() is None
    finally:
        agent.stop()
