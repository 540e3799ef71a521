"""Runs Clef as a child with the stdio UI, answers its questions, restarts it when it dies.

Clef is started at once and waits at its master-password prompt: that is "locked". `unlock`
answers the prompt; Clef then opens its loopback HTTP and announces itself: "ready". `lock`
and any crash kill Clef and start it again, so it is back at the prompt. The master password
lives only in the unlock call's frame: it is written to Clef's stdin and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from armory_agent import CLEF_GOMEMLIMIT, uiproto
from armory_agent.config import AgentConfig
from armory_agent.errors import ControlError

log = logging.getLogger("armory_agent.clef")

STARTING, LOCKED, UNLOCKING, READY, ERROR = "starting", "locked", "unlocking", "ready", "error"


def clef_version(binary: str) -> str:
    """Clef's version string ("1.17.3-stable"), or "unknown" if the binary cannot say."""
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    parts = out.split()
    return parts[-1] if parts and out.startswith("Clef version") else "unknown"


def clef_argv(cfg: AgentConfig) -> list[str]:
    """Clef's command line: stdio UI, loopback HTTP, no IPC, every file in the private state dir."""
    c = cfg.clef
    argv = [
        str(c.binary),
        "--stdio-ui",
        "--suppress-bootwarn",
        "--configdir", str(c.configdir),
        "--keystore", str(c.keystore),
        "--chainid", str(c.chain_id),
        "--http",
        "--http.addr", "127.0.0.1",
        "--http.port", str(c.http_port),
        "--ipcdisable",
        "--nousb",
        "--pcscdpath", "",
        "--auditlog", str(c.auditlog),
        "--4bytedb-custom", str(c.fourbyte_custom),
    ]  # fmt: skip
    if c.lightkdf:
        argv.append("--lightkdf")
    if c.rules.is_file():
        argv += ["--rules", str(c.rules)]
    return argv


def clef_env() -> dict[str, str]:
    """Clef's environment: ours plus a Go soft memory limit that fits a 512 MiB board."""
    return {**os.environ, "GOMEMLIMIT": CLEF_GOMEMLIMIT}


_PR_SET_PDEATHSIG = 1


def die_with_agent_hook() -> Callable[[], None]:
    """The preexec_fn that makes the kernel kill Clef if the agent is killed outright, so no unlocked
    Clef outlives the agent that enforces the policy in front of it.

    Python's subprocess has no parent-death signal option, so this stays a preexec_fn, but every
    ctypes lookup (dlopen, dlsym: they take the loader's lock, which another thread, e.g. the audit
    writer, may hold at fork time) happens here, in the parent, once. The child only makes the one
    prepared foreign call. prctl() directly rather than `setpriv --pdeathsig`: the unit's seccomp
    filter (~@privileged) denies the capset() setpriv makes, and setpriv then exits 127."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
    prctl.restype = ctypes.c_int
    get_errno = ctypes.get_errno
    args = (_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)

    def die_with_agent() -> None:  # runs in the child between fork and exec
        if prctl(*args) != 0:
            raise OSError(get_errno(), "prctl(PR_SET_PDEATHSIG) failed")

    return die_with_agent


def _private_file(path: Path) -> None:
    """Create (or tighten) a file as 0600 before Clef opens it: Clef would create it 0644."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.fchmod(fd, 0o600)
        os.close(fd)


class ClefSupervisor:
    """Owns the Clef child process and the agent's lock state."""

    def __init__(
        self,
        cfg: AgentConfig,
        version: str,
        on_state: Callable[[str], None] | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.version = version
        self.state = STARTING
        self.rules = "unknown"
        self.detail = ""
        self.restarts = 0
        self.pid: int | None = None
        self._on_state = on_state or (lambda s: None)
        self._on_event = on_event or (lambda e: None)
        self._proc: asyncio.subprocess.Process | None = None
        self._write_lock = asyncio.Lock()
        self._unlock_lock = asyncio.Lock()
        self._prompt_id: Any = None
        self._changed = asyncio.Condition()
        self._http_opened = False
        self._started_notice = False
        self._master_failed = False
        self._stopping = False
        self._restart_now = asyncio.Event()
        self._start_error = ""
        self._task: asyncio.Task[None] | None = None
        self._preexec = die_with_agent_hook()  # resolved now, never in a forked child

    # --- state ---

    async def _set(self, state: str, detail: str = "") -> None:
        if state != self.state or detail != self.detail:
            log.info("state %s%s", state, f" ({detail})" if detail else "")
        self.state, self.detail = state, detail
        self._on_state(state)
        async with self._changed:
            self._changed.notify_all()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(predicate), timeout)
            except TimeoutError:
                return False
        return True

    @property
    def public_state(self) -> str:
        """The state /health shows: unlocking counts as starting."""
        return STARTING if self.state == UNLOCKING else self.state

    def status(self) -> dict[str, Any]:
        return {
            "state": self.public_state,
            "clef": self.version,
            "rules": self.rules,
            "detail": self.detail,
            "restarts": self.restarts,
        }

    # --- lifecycle ---

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="clef-supervisor")

    async def stop(self) -> None:
        self._stopping = True
        await self._kill()
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        failures = 0
        while not self._stopping:
            started = time.monotonic()
            try:
                code = await self._run_once()
            except Exception:  # a bug here must not leave the agent without a supervisor
                log.exception("supervising Clef failed")
                await self._kill()
                self._start_error, code = "supervisor error", None
            if self._stopping:
                return
            if self._restart_now.is_set():
                self._restart_now.clear()
                failures = 0
                continue
            self.restarts += 1
            if time.monotonic() - started > 60:
                failures = 0
            delay = min(self.cfg.clef.restart_backoff_max, 2.0**failures)
            failures += 1
            why = self._start_error if code is None else f"Clef exited with code {code}"
            reason = f"{why}; restarting in {delay:.0f}s"
            log.warning("%s", reason)
            self._on_event({"event": "clef_exit", "code": code, "restart_in": delay})
            await self._set(ERROR, reason)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._restart_now.wait(), delay)
            self._restart_now.clear()

    async def _run_once(self) -> int | None:
        self._prompt_id = None
        self._start_error = ""
        self._http_opened = self._started_notice = self._master_failed = False
        self.rules = "disabled: no rules file" if not self.cfg.clef.rules.is_file() else "unknown"
        await self._set(STARTING)
        argv = clef_argv(self.cfg)
        _private_file(self.cfg.clef.auditlog)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                limit=16 * 1024 * 1024,
                cwd=str(self.cfg.clef.state_dir),
                env=clef_env(),
                preexec_fn=self._preexec,
                start_new_session=True,
            )
        except OSError as e:
            self._start_error = f"cannot start Clef: {e.strerror or e}"
            log.error("%s", self._start_error)
            return None
        self._proc, self.pid = proc, proc.pid
        assert proc.stdout is not None and proc.stderr is not None
        err_task = asyncio.create_task(self._read_stderr(proc.stderr))
        watchdog = asyncio.create_task(self._startup_watchdog(proc))
        try:
            while True:
                try:
                    line = await proc.stdout.readline()
                except ValueError:  # a line over the limit: dropped by the reader, skip it
                    log.warning("oversized line on Clef's UI channel dropped")
                    continue
                if not line:
                    break
                await self._handle_line(line)
        except BaseException:
            await self._kill()  # never leave a Clef nobody listens to
            raise
        finally:
            watchdog.cancel()
            code = await proc.wait()
            await asyncio.gather(err_task, return_exceptions=True)
            self._proc, self.pid = None, None
        return code

    async def _startup_watchdog(self, proc: asyncio.subprocess.Process) -> None:
        """Clef that neither prompts nor starts in time is hung: kill it (the loop restarts it)."""
        ok = await self._wait_for(
            lambda: self.state in (LOCKED, READY, ERROR), self.cfg.clef.startup_timeout
        )
        if not ok and proc.returncode is None:
            log.error("Clef did not come up within %.0fs; killing it", self.cfg.clef.startup_timeout)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

    async def _kill(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()

    async def _write(self, data: bytes) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None:
            return
        async with self._write_lock:
            try:
                proc.stdin.write(data)
                await proc.stdin.drain()
            except (BrokenPipeError, ConnectionResetError):
                log.warning("Clef's stdin closed")

    # --- Clef's stdout (UI channel) and stderr (log) ---

    async def _handle_line(self, line: bytes) -> None:
        try:
            msg = uiproto.parse_line(line)
        except uiproto.ProtocolError as e:
            log.warning("unexpected line from Clef's UI channel: %s", e)
            return
        if msg is None:
            return
        if uiproto.is_master_prompt(msg) and msg.is_call:
            self._prompt_id = msg.id
            await self._set(LOCKED)
            return
        if msg.method == "ui_onSignerStartup":
            self._started_notice = True
            await self._notify()
            if self.state != UNLOCKING:
                # Clef started without asking for the master password: there is no master seed.
                await self._set(ERROR, "Clef has no master seed (run clef init)")
                self.rules = "disabled: no master seed"
            return
        if msg.method == "ui_showInfo":
            log.info("clef: %s", uiproto.describe_text(msg))
            return
        if msg.method == "ui_showError":
            log.warning("clef error: %s", uiproto.describe_text(msg))
            self._on_event({"event": "clef_error", "text": uiproto.describe_text(msg)})
            return
        if msg.method == "ui_onApprovedTx":
            tx = msg.params.get("tx") if isinstance(msg.params, dict) else None
            self._on_event({"event": "clef_approved_tx", "tx": tx})
            return
        if not msg.is_call:
            return
        answer = uiproto.policy_answer(msg, self.cfg.policy.approve_listing)
        if answer is not None:
            self._on_event({"event": "clef_undecided", "method": msg.method, "answer": answer})
            await self._write(uiproto.result_line(msg.id, answer))
        elif msg.method == "ui_onInputRequired":
            # An account password Clef has no stored credential for: the agent never has one.
            await self._write(uiproto.error_line(msg.id, -32000, "no password available"))
        else:
            await self._write(uiproto.error_line(msg.id, -32601, "method not supported by agent"))

    async def _read_stderr(self, stream: asyncio.StreamReader) -> None:
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # over the limit: skip it, but keep draining or Clef blocks
                continue
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip()
            log.info("clef: %s", line)
            verdict = uiproto.rules_state_from_log(line)
            if verdict is not None:
                self.rules = verdict
                if verdict != "enabled":
                    self._on_event({"event": "rules_disabled", "reason": verdict})
                    log.warning("Clef rules %s", verdict)
            if uiproto.MASTER_DECRYPT_FAILED in line:
                self._master_failed = True
            if uiproto.HTTP_OPENED in line:
                self._http_opened = True
            await self._notify()

    # --- control operations ---

    async def unlock(self, password: str) -> dict[str, Any]:
        """Answer Clef's master-password prompt; raise ControlError if Clef did not accept it."""
        async with self._unlock_lock:
            if self.state == READY:
                return self.status()
            ok = await self._wait_for(
                lambda: self.state in (LOCKED, ERROR), self.cfg.clef.startup_timeout
            )
            if not ok or self.state != LOCKED or self._prompt_id is None:
                why = self.detail or self.state
                raise ControlError(f"Clef is not waiting for the master password ({why})")
            await self._set(UNLOCKING)
            prompt_id, self._prompt_id = self._prompt_id, None
            await self._write(uiproto.result_line(prompt_id, {"text": password}))
            del password
            ok = await self._wait_for(
                lambda: self._master_failed
                or (self._started_notice and self._http_opened)
                or self.state in (ERROR, STARTING),
                self.cfg.clef.startup_timeout,
            )
            if self._master_failed:
                await self.restart()
                raise ControlError("wrong master password")
            if not ok or self.state != UNLOCKING:
                await self.restart()
                raise ControlError("Clef did not start after unlock; see the agent log")
            await self._set(READY)
            if self.rules == "unknown":
                self.rules = "disabled: rules not loaded"
            self._on_event({"event": "unlocked", "rules": self.rules})
            return self.status()

    async def restart(self) -> None:
        """Kill Clef and start it again at once (back to locked), without backoff."""
        self._restart_now.set()
        await self._set(STARTING)
        await self._kill()

    async def lock(self) -> dict[str, Any]:
        if self.state in (READY, UNLOCKING, ERROR):
            await self.restart()
            self._on_event({"event": "locked"})
        await self._wait_for(lambda: self.state in (LOCKED, ERROR), self.cfg.clef.startup_timeout)
        return self.status()
