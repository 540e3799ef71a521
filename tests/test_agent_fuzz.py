"""Fuzz the JSON-RPC front door (hypothesis) against the real agent and Clef.

Properties: the agent never crashes; every answer is well-formed HTTP; no 500 at all, and
every non-empty answer is JSON-RPC (an error body on every non-2xx status).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from armory_agent.httpproto import HttpError, parse_head
from tests.agent_helpers import (
    AgentProcess,
    call,
    get_health,
    make_clef_state,
    running_agent,
    write_agent_config,
)

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

METHODS = [
    "account_list", "account_version", "account_ecRecover", "account_signData",
    "account_signTypedData", "account_signTransaction", "account_new", "rpc_modules", "",
]  # fmt: skip

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
calls = st.fixed_dictionaries(
    {"jsonrpc": st.sampled_from(["2.0", "2.0", "1.0", 2])},
    optional={
        "id": st.none() | st.integers() | st.text(max_size=8) | st.floats(allow_nan=False),
        "method": st.sampled_from(METHODS) | st.text(max_size=30),
        "params": st.lists(json_values, max_size=4) | json_values,
    },
)
bodies = (
    st.binary(max_size=300)
    | calls.map(lambda c: json.dumps(c).encode())
    | st.lists(calls, max_size=6).map(lambda c: json.dumps(c).encode())
    | json_values.map(lambda v: json.dumps(v).encode())
)


@pytest.fixture(scope="module")
def agent(clef_binary: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    root = tmp_path_factory.mktemp("fuzz")
    state = make_clef_state(clef_binary, root / "state")
    config = root / "agent.json"
    write_agent_config(
        config, clef_binary, state.state_dir, policy={"rate": 10000.0, "burst": 10000}
    )
    with running_agent(config) as a:
        assert a.unlock_cli(state.master_password).returncode == 0
        yield a
        assert a.proc is not None and a.proc.poll() is None, "agent died while fuzzing"


def exchange(agent: AgentProcess, data: bytes) -> tuple[int, bytes]:
    with socket.create_connection((agent.address, agent.port), timeout=60) as s:
        s.sendall(data)
        buf = b""
        while chunk := s.recv(65536):
            buf += chunk
    head, sep, body = buf.partition(b"\r\n\r\n")
    assert sep, f"no complete HTTP answer: {buf[:200]!r}"
    status_line = head.split(b"\r\n")[0]
    assert status_line.startswith(b"HTTP/1.1 ")
    return int(status_line.split()[1]), body


def check_answer(status: int, body: bytes) -> None:
    assert status != 500, body
    if status >= 300:
        obj = json.loads(body)
        assert obj["jsonrpc"] == "2.0" and isinstance(obj["error"]["code"], int)
    elif body:
        obj = json.loads(body)
        if isinstance(obj, dict) and "state" in obj:  # GET /health
            assert set(obj) == {"state", "clef", "rules"}
            return
        for reply in obj if isinstance(obj, list) else [obj]:
            assert reply["jsonrpc"] == "2.0" and ("result" in reply or "error" in reply)


@pytest.mark.integration
@FUZZ
@given(body=bodies, content_type=st.sampled_from(["application/json", "application/json-rpc"]))
def test_fuzz_json_rpc_bodies(agent: AgentProcess, body: bytes, content_type: str) -> None:
    head = (
        f"POST / HTTP/1.1\r\nHost: {agent.address}:{agent.port}\r\nConnection: close\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    check_answer(*exchange(agent, head + body))


header_bytes = st.binary(max_size=80).filter(lambda b: b"\r\n\r\n" not in b)


@pytest.mark.integration
@FUZZ
@given(
    request_line=st.sampled_from([b"POST / HTTP/1.1", b"GET /health HTTP/1.1", b"OPTIONS / HTTP/1.1"])
    | header_bytes,
    headers=st.lists(header_bytes, max_size=5),
)
def test_fuzz_http_heads(agent: AgentProcess, request_line: bytes, headers: list[bytes]) -> None:
    data = b"\r\n".join([request_line, f"Host: {agent.address}:{agent.port}".encode(), *headers])
    data += b"\r\nConnection: close\r\n\r\n"
    assume(data.count(b"\r\n\r\n") == 1)  # one request: pipelining is not what this tests
    check_answer(*exchange(agent, data))


@pytest.mark.integration
def test_agent_still_answers_after_fuzzing(agent: AgentProcess) -> None:
    assert get_health(agent.address, agent.port)["state"] == "ready"
    status, body = call(agent.address, agent.port, "account_version", [])
    assert status == 200 and body["result"] == "6.1.0"


@settings(max_examples=500, deadline=None)
@given(head=st.binary(max_size=400))
def test_parse_head_only_raises_http_errors(head: bytes) -> None:
    try:
        req: Any = parse_head(head)
    except HttpError as e:
        assert 400 <= e.status < 600 and e.message
    else:
        assert req.version in ("HTTP/1.0", "HTTP/1.1")
