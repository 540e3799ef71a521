"""The local control socket: unlock, lock, status. One JSON line in, one JSON line out.

The socket is mode 0600 in a 0700 directory and the server also checks SO_PEERCRED, so only
root and the agent's own user can use it. The master password travels only over this socket
(never argv, environment or disk).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from armory_agent.errors import ControlError, StartError

log = logging.getLogger("armory_agent.control")

MAX_LINE = 4096
Command = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def peer_uid(writer: asyncio.StreamWriter) -> int | None:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


class ControlServer:
    def __init__(self, path: Path, commands: dict[str, Command]) -> None:
        self.path = path
        self.commands = commands
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            old = os.umask(0o177)
            try:
                self.server = await asyncio.start_unix_server(
                    self._serve, path=str(self.path), limit=MAX_LINE * 2
                )
            finally:
                os.umask(old)
            os.chmod(self.path, 0o600)
        except OSError as e:
            raise StartError(f"cannot create the control socket {self.path}: {e.strerror or e} "
                             "(check [control] socket in the agent config)") from None

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            uid = peer_uid(writer)
            reply = await self._dispatch(reader, allowed=uid in (0, os.getuid()))
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (OSError, ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()

    async def _dispatch(self, reader: asyncio.StreamReader, allowed: bool) -> dict[str, Any]:
        try:
            line = await asyncio.wait_for(reader.readline(), 30)
        except (ValueError, TimeoutError, asyncio.LimitOverrunError):
            return {"ok": False, "error": "malformed control request"}
        if not allowed:  # read first, so the refusal reaches the client instead of a reset
            return {"ok": False, "error": "not allowed"}
        try:
            request = json.loads(line)
        except ValueError:
            return {"ok": False, "error": "malformed control request"}
        if not isinstance(request, dict) or request.get("cmd") not in self.commands:
            return {"ok": False, "error": f"unknown command (known: {', '.join(self.commands)})"}
        try:
            result = await self.commands[request["cmd"]](request)
        except ControlError as e:
            return {"ok": False, "error": str(e)}
        finally:
            request.clear()  # drop the password reference as soon as possible
        return {"ok": True, **result}


def send(path: Path, request: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
    """Client side: one request, one reply; ControlError with one line on any failure."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise ControlError(f"agent not running (no control socket at {path})") from None
        except PermissionError:
            raise ControlError(f"permission denied on {path} (run as root or the agent's user)") from None
        except OSError as e:
            raise ControlError(f"cannot reach the agent at {path}: {e.strerror}") from None
        try:
            sock.sendall(json.dumps(request).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the agent may have refused us and closed already: read why
        data = b""
        while not data.endswith(b"\n"):
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        raise ControlError("the agent did not answer in time") from None
    except OSError as e:
        raise ControlError(f"control socket {path}: {e.strerror or e}") from None
    finally:
        sock.close()
    try:
        reply = json.loads(data)
    except ValueError:
        raise ControlError("the agent sent a malformed reply") from None
    if not isinstance(reply, dict):
        raise ControlError("the agent sent a malformed reply")
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error", "failed")))
    return reply
