"""The laptop's handle on the device-side helper (armory_agent.device_admin).

Each call runs the helper once over SSH with one JSON request on the channel's
stdin (layout, parameters, secrets) and reads one JSON answer from stdout.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from armory_agent import contract
from clef_armory.errors import ContractError, ProvisionError
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
        self._hello: contract.Hello | None = None

    def hello(self) -> contract.Hello:
        """Who the device is (a frozen call: it works on every contract >= 2); a device from before
        contracts (1) has no hello and answers with its usage line."""
        if self._hello is None:
            result = self.conn.run([*self.layout.admin_command, "hello"], self._request({}), 60.0)
            answer = _answer(result.stdout)
            if answer is None or "usage:" in str(answer.get("error", "")):
                self._hello = contract.Hello(contract=int((answer or {}).get("contract", contract.NO_HELLO)),
                                             agent_version="unknown")
            elif "error" in answer:
                raise ProvisionError(f"on the device, hello: {answer['error']}")
            else:
                self._hello = contract.Hello.from_json(answer)
        return self._hello

    def require_contract(self) -> None:
        """Stop, before asking for anything, when the device speaks another contract than this laptop."""
        device = self.hello().contract
        if device != contract.VERSION:
            raise ContractError(contract.mismatch(device, contract.VERSION))

    def frozen(self, command: str, params: contract.Message | None = None, *, timeout: float = 300.0,
               stream: Iterable[bytes] | None = None) -> dict[str, Any]:
        """A call from contract.FROZEN: the same on every device of contract >= 2."""
        if command not in contract.FROZEN:
            raise ValueError(f"{command} is not a frozen call")
        if self.hello().contract < 2:
            raise ContractError(f"the device runs contract {self.hello().contract}, from before A/B updates: "
                                "re-flash it (docs/updating.md)")
        body = self._request({"params": params.to_json()} if params else {})
        if stream is None:
            result = self.conn.run([*self.layout.admin_command, command], body, timeout)
        else:
            result = self.conn.run_stream([*self.layout.admin_command, command], body, stream, timeout)
        return self._checked(command, result.stdout, result.stderr, result.status)

    def _request(self, request: dict[str, Any]) -> bytes:
        return json.dumps({"contract": contract.VERSION, **request}).encode() + b"\n"

    def _checked(self, command: str, stdout: bytes, stderr: bytes, status: int) -> dict[str, Any]:
        answer = _answer(stdout)
        if answer is None:
            tail = stderr.decode(errors="replace").strip().splitlines()
            why = tail[-1] if tail else f"exit status {status}"
            raise ProvisionError(f"device helper {command} failed: {why}")
        if "error" in answer:
            raise ProvisionError(f"on the device, {command}: {answer['error']}")
        return answer

    def call(
        self,
        command: str,
        secrets: Mapping[str, Secret | list[Secret]] | None = None,
        timeout: float = 900.0,
        **params: Any,
    ) -> dict[str, Any]:
        if self.before_call is not None:
            self.before_call(self, command)
        self.require_contract()
        request: dict[str, Any] = {"layout": self.layout.as_json(), **params}
        if secrets:
            request["secrets"] = {
                k: [s.value for s in v] if isinstance(v, list) else v.value for k, v in secrets.items()
            }
        result = self.conn.run([*self.layout.admin_command, command], self._request(request), timeout)
        del request
        return self._checked(command, result.stdout, result.stderr, result.status)


def _answer(stdout: bytes) -> dict[str, Any] | None:
    try:
        answer = json.loads(stdout.decode() or "null")
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None
