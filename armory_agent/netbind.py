"""The agent's listening socket: one address on one interface, enforced by the kernel.

SO_BINDTODEVICE makes the kernel drop connections to our address that arrive on any other
interface (Linux otherwise accepts packets for a local address on every interface). The
socket is bound to the single configured address, never 0.0.0.0. The agent waits for the
interface and address to appear, and rebinds if the interface is re-created (new ifindex);
a plain link down/up or address delete/re-add keeps the same socket working.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Awaitable, Callable

from armory_agent.errors import StartError

log = logging.getLogger("armory_agent.net")

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

_WAITING = {errno.EADDRNOTAVAIL, errno.ENODEV, errno.ENXIO}


def bind_socket(interface: str, address: str, port: int, bind_to_device: bool) -> socket.socket:
    """A listening TCP socket on address:port, bound to `interface` when bind_to_device."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if bind_to_device:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        sock.bind((address, port))
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def ifindex(interface: str) -> int | None:
    try:
        return socket.if_nametoindex(interface)
    except OSError:
        return None


class InterfaceListener:
    """Keeps an asyncio server listening on interface/address:port as the link comes and goes."""

    def __init__(
        self, interface: str, address: str, port: int, bind_to_device: bool, handler: Handler
    ) -> None:
        self.interface = interface
        self.address = address
        self.port = port
        self.bind_to_device = bind_to_device
        self.handler = handler
        self.server: asyncio.Server | None = None
        self.bound = asyncio.Event()
        self._ifindex: int | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self, poll: float = 0.5) -> None:
        self._task = asyncio.create_task(self._watch(poll), name="listener")

    def task(self) -> asyncio.Task[None]:
        """The watching task (after start()): it ends only when the listener gives up."""
        assert self._task is not None, "start() first"
        return self._task

    def failure(self) -> BaseException | None:
        """Why the listener gave up (a port in use, a bad address), or None while it runs."""
        if self._task is None or not self._task.done() or self._task.cancelled():
            return None
        return self._task.exception()

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, StartError):
                await self._task
        await self._close()

    async def _close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 1)
            self.server = None
            self.bound.clear()

    async def _try_bind(self) -> bool:
        index = ifindex(self.interface) if self.bind_to_device else 0
        if index is None:
            return False
        try:
            sock = bind_socket(self.interface, self.address, self.port, self.bind_to_device)
        except OSError as e:
            if e.errno in _WAITING:
                return False
            raise StartError(f"cannot listen on {self.address}:{self.port}: {e.strerror or e} "
                             "(is another agent running? see [listen] in the agent config)") from None
        self.server = await asyncio.start_server(self.handler, sock=sock, limit=64 * 1024)
        self._ifindex = index
        self.bound.set()
        where = f" on {self.interface}" if self.bind_to_device else ""
        log.info("listening on %s:%d%s", self.address, self.port, where)
        return True

    async def _watch(self, poll: float) -> None:
        waiting_said = False
        while True:
            if self.server is None:
                if await self._try_bind():
                    waiting_said = False
                elif not waiting_said:
                    log.info("waiting for %s with address %s", self.interface, self.address)
                    waiting_said = True
            elif self.bind_to_device and ifindex(self.interface) != self._ifindex:
                log.warning("%s went away or was re-created; rebinding", self.interface)
                await self._close()
                continue
            await asyncio.sleep(poll)
