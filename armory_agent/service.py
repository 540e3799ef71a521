"""`serve`: wires the Clef supervisor, control socket, HTTP front door, audit log and LEDs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from typing import Any

from armory_agent import ethapi
from armory_agent import policy as access
from armory_agent.audit import AuditLog
from armory_agent.clefclient import ClefClient
from armory_agent.config import AgentConfig
from armory_agent.control import ControlServer
from armory_agent.errors import ControlError, StartError
from armory_agent.httpproto import (
    ClientGone,
    Connection,
    HttpError,
    Request,
    content_length,
    error_body,
    response,
)
from armory_agent.leds import Leds
from armory_agent.netbind import InterfaceListener
from armory_agent.ratelimit import RateLimiter
from armory_agent.rpc import CallContext, Front
from armory_agent.supervisor import READY, ClefSupervisor, clef_version

log = logging.getLogger("armory_agent")


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.audit = AuditLog(cfg.audit.path, cfg.audit.max_bytes, cfg.audit.keep)
        self.leds = Leds(cfg.leds.path)
        self.clef_client = ClefClient("127.0.0.1", cfg.clef.http_port)
        self.supervisor = ClefSupervisor(
            cfg,
            clef_version(str(cfg.clef.binary)),
            on_state=self._state_changed,
            on_event=self._event,
        )
        self.front = Front(
            cfg.policy,
            self.clef_client,
            is_ready=lambda: self.supervisor.state == READY,
            state=lambda: self.supervisor.public_state,
            methods=ethapi.method_table(cfg),  # account_* plus, with [eth] enabled, eth_*
        )
        self.limiter = RateLimiter(cfg.policy.rate, cfg.policy.burst)
        self.connections = 0
        self.control = ControlServer(
            cfg.control.socket,
            {"unlock": self._unlock, "lock": self._lock, "status": self._status},
        )
        self.listener = InterfaceListener(
            cfg.listen.interface,
            cfg.listen.address,
            cfg.listen.port,
            cfg.listen.bind_to_device,
            self._serve_connection,
        )

    # --- supervisor callbacks ---

    def _state_changed(self, state: str) -> None:
        self.clef_client.reset()
        self.leds.set_state(state)

    def _event(self, event: dict[str, Any]) -> None:
        self.audit.record({"kind": "event", **event})

    # --- control commands ---

    async def _unlock(self, request: dict[str, Any]) -> dict[str, Any]:
        password = request.pop("password", None)
        if not isinstance(password, str) or not password:
            raise ControlError("unlock needs a password")
        try:
            return await self.supervisor.unlock(password)
        except ControlError as e:
            self._event({"event": "unlock_failed", "reason": str(e)})
            raise
        finally:
            del password

    async def _lock(self, request: dict[str, Any]) -> dict[str, Any]:
        return await self.supervisor.lock()

    async def _status(self, request: dict[str, Any]) -> dict[str, Any]:
        return self.supervisor.status()

    # --- HTTP front door ---

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        conn = Connection(reader, writer)
        peername = writer.get_extra_info("peername")
        peer = str(peername[0]) if peername else "?"
        p = self.cfg.policy
        if self.connections >= p.max_connections:
            self.audit.record(
                {"kind": "rpc", "peer": peer, "qube": None, "origin": None, "method": None,
                 "decision": "denied", "status": 503, "error": "too many connections"}
            )  # fmt: skip
            with contextlib.suppress(OSError, ConnectionError):
                body = error_body(-32011, "too many connections")
                await conn.send(response(503, body, keep_alive=False))
            await conn.close(drain_bytes=p.max_body, drain_timeout=1.0)
            return
        self.connections += 1
        try:
            while True:
                keep = await self._serve_request(conn, peer)
                if not keep:
                    break
        except (OSError, ConnectionError):
            pass
        finally:
            self.connections -= 1
            await conn.close()

    async def _serve_request(self, conn: Connection, peer: str) -> bool:
        """Serve one request; False when the connection should close."""
        p = self.cfg.policy
        entry: dict[str, Any] = {
            "kind": "rpc", "peer": peer, "qube": None, "origin": None, "method": None
        }  # fmt: skip
        req: Request | None = None
        extra: dict[str, str] = {}
        try:
            try:
                req = await conn.read_head(p.header_timeout)
            except ClientGone:
                return False
            entry["origin"] = req.headers.get("origin")
            qube = access.qube_of(req)
            entry["qube"] = qube
            if not self.limiter.allow(peer):
                raise HttpError(429, "rate limit exceeded", code=-32011)
            access.check_host(req, p)
            access.check_origin(req, p)
            extra = access.cors_headers(req, p, preflight=req.method == "OPTIONS")
            path = req.target.split("?", 1)[0]
            if req.method == "GET" and path == "/health":
                status, body = 200, json.dumps(self._health()).encode()
                entry.update(method="GET /health", decision="allowed", status=200, error=None)
            elif req.method == "OPTIONS":
                if not extra:
                    raise HttpError(403, "CORS is not enabled for this origin", code=-32003)
                status, body = 204, b""
                entry.update(method="OPTIONS", decision="allowed", status=204, error=None)
            elif req.method != "POST":
                raise HttpError(405, "only POST (JSON-RPC) and GET /health are served")
            elif path != "/":
                raise HttpError(404, "JSON-RPC is served at /")
            else:
                length = content_length(req, p.max_body)
                if not access.is_json_content_type(req):
                    raise HttpError(415, "Content-Type must be application/json")
                body_in = await conn.read_body(length, p.body_timeout)
                ctx = CallContext(peer, req.headers.get("origin"), access.clef_user_agent(qube))
                self.leds.request_started()
                try:
                    status, body, methods, codes = await self.front.handle(body_in, ctx)
                finally:
                    self.leds.request_finished()
                entry.update(
                    method=methods,
                    decision="allowed" if status == 200 else "denied",
                    status=status,
                    error=codes,
                )
        except HttpError as e:
            entry.update(decision="denied", status=e.status, error=e.message)
            self.audit.record(entry)
            body = error_body(e.code, e.message)
            # Read (and drop) a body we refused to read, so the client's OS does not answer our
            # close with a reset that eats the error response.
            drain = p.max_body if req is not None and req.method not in ("GET", "OPTIONS") else 0
            with contextlib.suppress(OSError, ConnectionError):
                await conn.send(response(e.status, body, keep_alive=False, extra=extra))
            await conn.close(drain_bytes=drain)
            return False
        except Exception:  # a bug must cost one request, never the agent
            log.exception("internal error serving a request")
            entry.update(decision="error", status=500, error="internal error")
            self.audit.record(entry)
            with contextlib.suppress(OSError, ConnectionError):
                await conn.send(response(500, error_body(-32603, "internal error"), False))
            return False
        self.audit.record(entry)
        keep = req.keep_alive
        await conn.send(response(status, body, keep_alive=keep, extra=extra))
        return keep

    def _health(self) -> dict[str, Any]:
        s = self.supervisor
        return {"state": s.public_state, "clef": s.version, "rules": s.rules}

    # --- lifecycle ---

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        self.leds.set_state("locked")
        try:
            await self.control.start()
        except StartError:
            self.audit.close()
            raise
        self.supervisor.start()
        self.listener.start()
        log.info("agent started (Clef %s)", self.supervisor.version)
        stopping = asyncio.create_task(stop.wait())
        try:
            # Until SIGTERM/SIGINT, or until the listener gives up (e.g. the port is taken).
            await asyncio.wait({stopping, self.listener.task()}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            log.info("agent stopping")
            failure = self.listener.failure()
            await self.listener.stop()
            await self.control.stop()
            await self.supervisor.stop()
            self.leds.set_state("locked")
            self.audit.close()
        if failure is not None:
            raise failure


def serve(cfg: AgentConfig) -> None:
    """Run until SIGTERM/SIGINT. StartError (one line) when the audit log, control socket or port
    cannot be used; the CLI prints it and exits non-zero."""
    asyncio.run(Agent(cfg).run())
