"""Clef's stdio UI protocol (newline-delimited JSON-RPC 2.0, Clef is the client): pure logic only.

Clef asks (calls with an id) and tells (notifications). This module classifies what Clef sent,
decides the agent's answer to approval requests that the rules left undecided, and reads Clef's
stderr for the facts Clef does not report on the UI channel (rules on or off, HTTP listener up).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MASTER_PASSWORD_TITLE = "Master Password"  # noqa: S105 (a prompt title, not a password)

# Clef log lines (stderr) and what they mean for the rules.
RULES_ENABLED = "Rule engine configured"
RULES_MASTER_FAILED = "Failed to open master, rules disabled"
RULES_NOT_ATTESTED = "Rule hash not attested, disabling"
RULES_LOAD_FAILED = "Could not load rules, disabling"
HTTP_OPENED = "HTTP endpoint opened"
MASTER_DECRYPT_FAILED = "failed to decrypt the master seed"


@dataclass(frozen=True)
class UiMessage:
    """One line from Clef's stdout."""

    method: str
    params: Any
    id: Any  # None for notifications
    is_call: bool


class ProtocolError(ValueError):
    """Clef sent something that is not a UI JSON-RPC message."""


def parse_line(line: bytes) -> UiMessage | None:
    """Parse one stdout line; None for a response to us (we send no calls) or a blank line."""
    text = line.strip()
    if not text:
        return None
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise ProtocolError(f"not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("not a JSON object")
    method = obj.get("method")
    if method is None:
        return None
    if not isinstance(method, str):
        raise ProtocolError("method is not a string")
    params = obj.get("params", [])
    first = params[0] if isinstance(params, list) and params else {}
    is_call = "id" in obj and obj["id"] is not None
    return UiMessage(method=method, params=first, id=obj.get("id"), is_call=is_call)


def result_line(msg_id: Any, result: Any) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": msg_id, "result": result}).encode() + b"\n"


def error_line(msg_id: Any, code: int, message: str) -> bytes:
    body = {"jsonrpc": "2.0", "id": msg_id, "error": {"code": code, "message": message}}
    return json.dumps(body).encode() + b"\n"


def is_master_prompt(msg: UiMessage) -> bool:
    return (
        msg.method == "ui_onInputRequired"
        and isinstance(msg.params, dict)
        and msg.params.get("title") == MASTER_PASSWORD_TITLE
    )


def policy_answer(msg: UiMessage, approve_listing: bool) -> dict[str, Any] | None:
    """The agent's answer to an approval the rules left undecided: reject, except listing by config.

    None means the method is not an approval request.
    """
    params = msg.params if isinstance(msg.params, dict) else {}
    if msg.method == "ui_approveTx":
        return {"approved": False, "transaction": params.get("transaction")}
    if msg.method == "ui_approveSignData":
        return {"approved": False}
    if msg.method == "ui_approveNewAccount":
        return {"approved": False}
    if msg.method == "ui_approveListing":
        return {"accounts": params.get("accounts") if approve_listing else None}
    return None


def rules_state_from_log(line: str) -> str | None:
    """The rules verdict a Clef stderr line carries, or None."""
    if RULES_ENABLED in line:
        return "enabled"
    if RULES_MASTER_FAILED in line:
        return "disabled: master seed not opened"
    if RULES_NOT_ATTESTED in line:
        return "disabled: rules not attested"
    if RULES_LOAD_FAILED in line:
        return "disabled: rules could not be loaded"
    return None


def describe_text(msg: UiMessage) -> str:
    """The text of ui_showInfo/ui_showError (a Message object), kept to one line."""
    text = msg.params.get("text", "") if isinstance(msg.params, dict) else str(msg.params)
    return " ".join(str(text).split())[:500]
