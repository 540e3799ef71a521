"""The laptop's handle on the device-side helper (armory_agent.device_admin).

Each call runs the helper once over SSH with one JSON request on the channel's
stdin (layout, parameters, secrets) and reads one JSON answer from stdout.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from clef_armory.errors import ProvisionError
from provision.layout import DeviceLayout
from provision.secrets import Secret
from provision.ssh import Connection


class Device:
    """Runs device_admin subcommands; ``before_call(device, command)`` is a test hook (drop the link)."""

    def __init__(
        self,
        conn: Connection,
        layout: DeviceLayout,
        before_call: Callable[[Device, str], None] | None = None,
    ) -> None:
        self.conn = conn
        self.layout = layout
        self.before_call = before_call

    def call(
        self,
        command: str,
        secrets: Mapping[str, Secret | list[Secret]] | None = None,
        timeout: float = 900.0,
        **params: Any,
    ) -> dict[str, Any]:
        if self.before_call is not None:
            self.before_call(self, command)
        request: dict[str, Any] = {"layout": self.layout.as_json(), **params}
        if secrets:
            request["secrets"] = {
                k: [s.value for s in v] if isinstance(v, list) else v.value for k, v in secrets.items()
            }
        result = self.conn.run([*self.layout.admin_command, command], json.dumps(request).encode(), timeout)
        del request
        try:
            answer = json.loads(result.stdout.decode() or "null")
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            tail = result.stderr.decode(errors="replace").strip().splitlines()
            why = tail[-1] if tail else f"exit status {result.status}"
            raise ProvisionError(f"device helper {command} failed: {why}")
        if "error" in answer:
            raise ProvisionError(f"on the device, {command}: {answer['error']}")
        return answer
