"""A laptop-side network namespace for tests that put the emulated device on a real link (10.0.0.0/24).

10.0.0.x never appears in the default namespace: each test makes its own namespace, runs the real command
lines inside it (``ip netns exec``), and dials the guest from sockets made inside it (``connect_in``).
"""

from __future__ import annotations

import ctypes
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, TypeVar

REPO = Path(__file__).resolve().parent.parent
_CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["ip", *(["netns", "exec", ns, "ip"] if ns else []), *args]
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=30)


def links(ns: str) -> list[str]:
    """The interface names in ``ns``."""
    out = ip("-o", "link", "show", ns=ns).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]


@contextmanager
def namespace(prefix: str = "ca") -> Iterator[str]:
    """A fresh namespace with lo up; deleted afterwards (its interfaces, the tap included, go with it)."""
    ns = f"{prefix}-{secrets.token_hex(3)}"
    ip("netns", "add", ns)
    try:
        ip("link", "set", "lo", "up", ns=ns)
        yield ns
    finally:
        for pid in ip("netns", "pids", ns, check=False).stdout.split():
            os.kill(int(pid), signal.SIGKILL)  # only our own children run there
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True, check=False, timeout=30)


def do(ns: str, *args: str) -> list[str]:
    """argv for ``./do ARGS`` run inside ``ns``."""
    return ["ip", "netns", "exec", ns, str(REPO / "do"), *args]


def run_do(ns: str, *args: str, stdin: str | None = None, timeout: float = 900.0,
           pass_fds: Sequence[int] = ()) -> subprocess.CompletedProcess[str]:
    # A new session: no task can reach a developer's terminal (getpass would ask there).
    return subprocess.run(do(ns, *args), cwd=REPO, input=stdin, capture_output=True, text=True,
                          timeout=timeout, check=False, pass_fds=pass_fds, start_new_session=True)


def call_in(ns: str, fn: Callable[[], T], timeout: float = 3600.0) -> T:
    """``fn()`` on a helper thread that has entered ``ns``: every socket it makes (paramiko's, the agent
    link's) lives there and keeps its namespace afterwards. Its exception is raised here."""
    result: list[Any] = []

    def inside() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            with open(f"/run/netns/{ns}") as f:
                if libc.setns(f.fileno(), _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns failed")
            result.append((True, fn()))
        except BaseException as e:  # handed to the caller
            result.append((False, e))

    t = threading.Thread(target=inside, daemon=True)
    t.start()
    t.join(timeout)
    if not result:
        raise OSError(f"{fn!r} in {ns} did not finish within {timeout:.0f} s")
    ok, value = result[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


def connect_in(ns: str, address: tuple[str, int], timeout: float) -> socket.socket:
    """A TCP socket made inside ``ns`` and connected there. Raises OSError like socket.create_connection."""
    return call_in(ns, lambda: socket.create_connection(address, timeout=timeout), timeout + 10)


class Background:
    """A long-running command (``./do run-qemu``) whose stdout lines are collected as they come."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.lines: list[str] = []
        self.errors: list[str] = []
        self._threads = [threading.Thread(target=self._read, args=(s, out), daemon=True)
                         for s, out in ((self.proc.stdout, self.lines), (self.proc.stderr, self.errors))]
        for t in self._threads:
            t.start()

    @staticmethod
    def _read(stream: IO[str] | None, into: list[str]) -> None:
        assert stream is not None
        for line in stream:
            into.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float) -> str:
        """The first stdout line containing ``text`` (bounded; fails if the command ends first)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hit = next((line for line in self.lines if text in line), None)
            if hit is not None:
                return hit
            if self.proc.poll() is not None:
                time.sleep(0.2)  # let the readers drain
                hit = next((line for line in self.lines if text in line), None)
                if hit is not None:
                    return hit
                raise AssertionError(f"exited {self.proc.returncode} before {text!r}: {self.output()}")
            time.sleep(0.5)
        raise AssertionError(f"no {text!r} within {timeout:.0f} s: {self.output()}")

    def finish(self, timeout: float) -> int:
        """Wait for the exit; on timeout, kill it (and fail)."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
            raise AssertionError(f"did not end within {timeout:.0f} s: {self.output()}") from None
        for t in self._threads:
            t.join(10)
        return code

    def interrupt(self) -> None:
        """What Ctrl-C in the terminal does: SIGINT to the foreground process group."""
        os.killpg(self.proc.pid, signal.SIGINT)

    def output(self) -> str:
        return "\n".join(self.lines[-15:] + self.errors[-10:])
