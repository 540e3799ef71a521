"""Qubes pieces without Qubes: dom0 policy generation and lint, the rendered qube files, and the
armory qube's qrexec service run as qrexec would, against a recording HTTP server on loopback."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from qubes import QubesError, policy
from qubes.files import QubesConfig, render_all, write_all
from qubes.policylint import lint
from tests import qrexec_standin
from tests.agent_helpers import REPO, free_port
from tests.qubes_helpers import request, split_response

SYSTEM_PYTHON = "/usr/bin/python3"  # the qube side: Debian's python3, standard library only
SERVICE = "armory-qube/usr/local/etc/qubes-rpc/clefarmory.Sign"


def test_policy_lists_qubes_and_denies_the_rest() -> None:
    text = policy.render("armory", ["work", "defi"])
    rules = [line.split() for line in text.splitlines() if line and not line.startswith("#")]
    assert rules == [
        ["clefarmory.Sign", "*", "work", "@default", "allow", "target=armory"],
        ["clefarmory.Sign", "*", "work", "armory", "allow"],
        ["clefarmory.Sign", "*", "defi", "@default", "allow", "target=armory"],
        ["clefarmory.Sign", "*", "defi", "armory", "allow"],
        ["clefarmory.Sign", "*", "@anyvm", "@default", "deny"],
        ["clefarmory.Sign", "*", "@anyvm", "@anyvm", "deny"],
    ]
    asked = policy.render("armory", dapp_tag="dapps", ask=True)
    assert "clefarmory.Sign  *  @tag:dapps  @default  ask default_target=armory" in asked
    assert lint("30-clef-armory.policy", asked) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("arm ory", ["work"]), "not a qube name"),
        (("armory", ["work", "work"]), "listed twice"),
        (("armory", ["armory"]), "cannot also be a dapp qube"),
        (("armory", []), "either --dapp-qubes"),
        (("armory", ["dom0"]), "not a qube name"),
        (("armory", ["1work"]), "not a qube name"),
        (("armory", ["w" * 32]), "not a qube name"),
    ],
)
def test_policy_refuses_bad_names(args: tuple[str, list[str]], message: str) -> None:
    with pytest.raises(QubesError, match=message):
        policy.render(*args)


@pytest.mark.parametrize(
    ("name", "text", "problem"),
    [
        ("30-Clef.policy", "s * a b deny\n", "file name"),
        ("30-clef", "s * a b deny\n", "file name"),
        ("30-x.policy", "s * a @default allow\n", "needs target="),
        ("30-x.policy", "s+arg * a b allow\n", "bad service name"),
        ("30-x.policy", "s arg a b allow\n", "argument must be"),
        ("30-x.policy", "s * @default b allow\n", "bad source"),
        ("30-x.policy", "s * a b permit\n", "action must be"),
        ("30-x.policy", "s * a b deny target=c\n", "does not take"),
        ("30-x.policy", "s * a b allow target=c target=d\n", "given twice"),
        ("30-x.policy", "s * a b ask default_target=@anyvm\n", "bad default_target"),
        ("30-x.policy", "s * a\n", "needs SERVICE"),
        ("30-x.policy", "# only comments\n", "no rules"),
    ],
)
def test_linter_catches(name: str, text: str, problem: str) -> None:
    problems = lint(name, text)
    assert problems and problem in problems[0], problems


def test_standin_policy_evaluation_by_tag_and_order(tmp_path: Path) -> None:
    (tmp_path / "30-clef-armory.policy").write_text(policy.render("armory", dapp_tag="dapps"))
    qubes = {"armory": {}, "work": {"tags": ["dapps"]}, "x": {}}
    world = {"policy_dir": str(tmp_path), "qubes": qubes}
    decide = qrexec_standin.decide
    assert decide(world, "work", "@default", "clefarmory.Sign", "") == "armory"
    assert decide(world, "work", "armory", "clefarmory.Sign", "anything") == "armory"
    assert decide(world, "x", "@default", "clefarmory.Sign", "") is None
    assert decide(world, "work", "@default", "other.Service", "") is None  # no match: deny
    (tmp_path / "10-first.policy").write_text("clefarmory.Sign * work @anyvm deny\n")
    assert decide(world, "work", "armory", "clefarmory.Sign", "") is None  # first match wins
    assert decide(world, "work", "@default", "clefarmory.Sign", "") == "armory"  # @anyvm != @default
    (tmp_path / "10-first.policy").unlink()
    (tmp_path / "20-Bad.policy").write_text("# fine content, bad name\n")
    assert decide(world, "work", "@default", "clefarmory.Sign", "") is None  # breaks every call


def test_rendered_files_are_stdlib_python_and_units(tmp_path: Path) -> None:
    files = render_all(QubesConfig())
    assert set(files) == {
        SERVICE,
        "dapp-qube/usr/local/bin/clef-armory-proxy",
        "dapp-qube/usr/local/lib/systemd/system/clef-armory-proxy.socket",
        "dapp-qube/usr/local/lib/systemd/system/clef-armory-proxy.service",
        "dapp-qube/rw/config/rc.local.d/50-clef-armory.rc",
        "armory-qube/rw/config/rc.local.d/50-clef-armory.rc",
    }
    rule = files["armory-qube/rw/config/rc.local.d/50-clef-armory.rc"]
    assert b'ATTR{address}=="1a:55:89:a2:69:42"' in rule and b"ip addr replace 10.0.0.2/24" in rule
    socket_unit = files["dapp-qube/usr/local/lib/systemd/system/clef-armory-proxy.socket"]
    assert b"ListenStream=127.0.0.1:8550\n" in socket_unit
    written = write_all(QubesConfig(), tmp_path / "out")
    for path in written:
        if path.name in ("clefarmory.Sign", "clef-armory-proxy"):
            assert path.stat().st_mode & 0o111
            # Compiles, and imports only the standard library, under the system python3 -I -S.
            check = "import ast,sys; ast.parse(open(sys.argv[1]).read())"
            subprocess.run([SYSTEM_PYTHON, "-I", "-S", "-c", check, str(path)], check=True)
    assert not [p for p in (tmp_path).iterdir() if p.name.startswith(".qubes-")]


def test_tasks_write_policy_and_files(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=60, check=False)

    out = run("qubes-policy", "--armory-qube", "armory", "--dapp-qubes", "work,defi",
              "--output", str(tmp_path / "dom0"))
    assert out.returncode == 0, out.stderr
    assert lint("30-clef-armory.policy", (tmp_path / "dom0" / "30-clef-armory.policy").read_text()) == []
    bad = run("qubes-policy", "--armory-qube", "armory", "--dapp-qubes", "wo rk",
              "--output", str(tmp_path / "b"))
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1
    assert not (tmp_path / "b").exists()
    out = run("qubes-files", "--output", str(tmp_path / "q"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "q" / SERVICE).is_file()


# --- the qrexec service, run the way qrexec runs it, against a recording server -------------------


class Recorder:
    """A loopback HTTP server that records each raw request and answers with extra headers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.requests: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(next((ln.split(b":")[1] for ln in head.split(b"\r\n")
                                   if ln.lower().startswith(b"content-length")), b"0"))
                while len(body) < length:
                    body += conn.recv(65536)
                self.requests.append(head + b"\r\n\r\n" + body)
                reply = b'{"jsonrpc":"2.0","id":1,"result":"ok"}'
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nServer: armory\r\n"
                             b"Set-Cookie: a=b\r\nContent-Length: %d\r\n\r\n" % len(reply) + reply)


@pytest.fixture(scope="module")
def recorder() -> Iterator[Recorder]:
    r = Recorder()
    yield r
    r.sock.close()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, recorder: Recorder) -> Path:
    cfg = QubesConfig(armory_host="127.0.0.1", armory_port=recorder.port, read_timeout=1.0,
                      armory_timeout=2.0, call_timeout=3.0)
    out = tmp_path_factory.mktemp("qubes-service")
    write_all(cfg, out)
    return out / SERVICE


def run_service(path: Path, stdin: bytes, qube: str | None = "work", argv: tuple[str, ...] = (),
                env_extra: dict[str, str] | None = None) -> tuple[int, bytes, str]:
    env = {"PATH": "/usr/bin:/bin", "QREXEC_SERVICE_FULL_NAME": "clefarmory.Sign+", "QREXEC_AGENT_PID": "1"}
    if qube is not None:
        env["QREXEC_REMOTE_DOMAIN"] = qube
    env.update(env_extra or {})
    proc = subprocess.run([str(path), *argv], input=stdin, env=env, capture_output=True, timeout=20,
                          check=False)
    return proc.returncode, proc.stdout, proc.stderr.decode()


BODY = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "account_list"}).encode()


def test_service_rebuilds_the_request(service: Path, recorder: Recorder) -> None:
    before = len(recorder.requests)
    framed = request("POST", BODY, [
        ("Host", "evil.example"), ("Content-Type", "application/json"), ("Origin", "https://dapp.example"),
        ("User-Agent", "spoof qube=defi"), ("X-Clef-Armory-Qube", "defi"), ("X-Forwarded-For", "1.2.3.4"),
        ("Cookie", "c=d"), ("Content-Length", str(len(BODY))),
    ], target="/?x=1")
    rc, out, _ = run_service(service, framed)
    assert rc == 0
    assert recorder.requests[before:] == [
        b"POST /?x=1 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
        b"Origin: https://dapp.example\r\nX-Clef-Armory-Qube: work\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n" % (recorder.port, len(BODY)) + BODY
    ]
    status, headers, body = split_response(out)
    assert status == 200 and json.loads(body)["result"] == "ok"
    assert set(headers) == {"content-type", "content-length", "connection"}  # Server, Set-Cookie dropped
    assert int(headers["content-length"]) == len(body)


CL = ("Content-Length", str(len(BODY)))
CT = ("Content-Type", "application/json")


@pytest.mark.parametrize(
    ("stdin", "qube", "argv", "status", "message"),
    [
        (request("POST", BODY, [CT, ("Transfer-Encoding", "chunked"), CL]), "work", (), 400,
         "Transfer-Encoding"),
        (request("POST", BODY, [CT, CT, CL]), "work", (), 400, "repeated content-type"),
        (request("POST", BODY, [CT, ("X-A", "1"), (" folded", "2"), CL]), "work", (), 400, "folded"),
        (request("POST", BODY, [CT]), "work", (), 411, "Content-Length required"),
        (request("POST", b"", [CT, ("Content-Length", str(300 * 1024))]), "work", (), 413, "larger than"),
        (request("PUT", BODY, [CT, CL]), "work", (), 405, "only POST"),
        (request("POST", BODY, [CT, ("Content-Length", "+5")]), "work", (), 400, "Content-Length"),
        (request("POST", BODY, [CT, CL]), None, (), 500, "QREXEC_REMOTE_DOMAIN"),
        (request("POST", BODY, [CT, CL]), "bad name!", (), 500, "QREXEC_REMOTE_DOMAIN"),
        (request("POST", BODY, [CT, CL]), "work", ("arg",), 400, "no argument"),
        (b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\n{", "work", (), 400, "closed inside"),
        (b"x" * 20000, "work", (), 431, "too large"),
    ],
)
def test_service_refuses(service: Path, recorder: Recorder, stdin: bytes, qube: str | None,
                         argv: tuple[str, ...], status: int, message: str) -> None:
    before = len(recorder.requests)
    rc, out, err = run_service(service, stdin, qube, argv)
    got, headers, body = split_response(out)
    assert (rc, got) == (0, status), (out, err)
    assert message in json.loads(body)["error"]["message"] and message in err
    assert int(headers["content-length"]) == len(body)
    assert len(recorder.requests) == before  # nothing reached the armory


def test_service_times_out_on_a_silent_caller(service: Path) -> None:
    proc = subprocess.Popen([str(service)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={"QREXEC_REMOTE_DOMAIN": "work", "PATH": "/usr/bin"})
    assert proc.stdin is not None
    proc.stdin.write(b"POST / HTTP/1.1\r\n")
    proc.stdin.flush()  # and never more, never EOF
    assert proc.wait(timeout=10) == 0  # gave up on its own clock, stdin still open
    assert proc.stdout is not None
    out = proc.stdout.read()
    proc.stdin.close()
    assert split_response(out)[0] == 408


def test_service_names_an_unreachable_armory(tmp_path: Path) -> None:
    write_all(QubesConfig(armory_host="127.0.0.1", armory_port=free_port(), read_timeout=1.0), tmp_path)
    _, out, _ = run_service(tmp_path / SERVICE, request("POST", BODY, [CT, CL]))
    status, _, body = split_response(out)
    assert status == 502 and "cannot reach the armory" in json.loads(body)["error"]["message"]
