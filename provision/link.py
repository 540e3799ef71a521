"""HTTP to the agent over the USB link (10.0.0.1:8550 from the laptop).

``connect`` lets tests supply sockets made inside a network namespace; by
default we dial the address directly.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

from armory_agent import usblink
from clef_armory.errors import ProvisionError


@dataclasses.dataclass(frozen=True)
class Link:
    host: str = usblink.DEVICE_ADDRESS
    port: int = usblink.AGENT_PORT
    connect: Callable[[str, int, float], socket.socket] | None = None
    timeout: float = 40.0

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: Mapping[str, str] | None = None
    ) -> tuple[int, bytes]:
        conn = _Conn(self, self.host, self.port, timeout=self.timeout)
        try:
            conn.request(method, path, body=body, headers=dict(headers or {}))
            resp = conn.getresponse()
            return resp.status, resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise ProvisionError(f"agent at {self.host}:{self.port} unreachable: {e}") from None
        finally:
            conn.close()

    def health(self) -> dict[str, Any]:
        status, body = self.request("GET", "/health")
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if status != 200 or not isinstance(data, dict):
            raise ProvisionError(f"agent /health answered HTTP {status}")
        return data

    def rpc(
        self, method: str, params: list[Any], headers: Mapping[str, str] | None = None
    ) -> tuple[int, Any]:
        """One JSON-RPC call; returns (HTTP status, decoded body or None)."""
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()
        hdrs = {"Content-Type": "application/json", "Host": f"{self.host}:{self.port}", **(headers or {})}
        status, raw = self.request("POST", "/", body, hdrs)
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, None

    def wait_ready(self, timeout: float = 120.0) -> dict[str, Any]:
        """Poll /health until the agent says ready (bounded)."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] | str = "no answer"
        while time.monotonic() < deadline:
            try:
                last = self.health()
                if last.get("state") == "ready":
                    return last
                if last.get("state") == "error":
                    break
            except ProvisionError as e:
                last = str(e)
            time.sleep(0.5)
        raise ProvisionError(f"agent did not become ready within {timeout:.0f} s (last: {last})")


class _Conn(http.client.HTTPConnection):
    def __init__(self, link: Link, host: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._link = link

    def connect(self) -> None:
        if self._link.connect is None:
            super().connect()
        else:
            self.sock = self._link.connect(self.host, self.port, self.timeout or 40.0)
