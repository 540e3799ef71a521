"""Who may call the wallet: the agent's rules (armory_agent/policy.py), applied on the laptop.

Any web page can POST to a loopback port (a text/plain POST needs no CORS preflight) and DNS
rebinding lets it read the answer. So: a Host allowlist, JSON content types only, and no Origin
unless it is allowed. The caller's Origin travels on to the armory, whose rules see it too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

JSON_TYPES = frozenset({"application/json", "application/json-rpc", "application/jsonrequest"})


class GuardError(Exception):
    """A request refused before any JSON-RPC is read; `status` is the HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Guard:
    hosts: frozenset[str]
    origins: frozenset[str]

    def check(self, method: str, headers: Mapping[str, str]) -> None:
        """Raise GuardError for a request a browser page (or a rebinding host name) could have made."""
        host = headers.get("Host", "").strip().lower()
        if host not in self.hosts:
            raise GuardError(403, "Host not allowed")
        origin = headers.get("Origin")
        if origin is not None and origin not in self.origins:
            raise GuardError(403, "Origin not allowed")
        if method == "POST":
            media = headers.get("Content-Type", "").split(";")[0].strip().lower()
            if media not in JSON_TYPES:
                raise GuardError(415, "Content-Type must be application/json")

    def cors_headers(self, headers: Mapping[str, str], preflight: bool) -> dict[str, str]:
        """CORS answers for an allowed Origin only; nothing for others (the browser then refuses)."""
        origin = headers.get("Origin")
        if origin is None or origin not in self.origins:
            return {}
        out = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        if preflight:
            out.update({"Access-Control-Allow-Methods": "POST, OPTIONS",
                        "Access-Control-Allow-Headers": "Content-Type", "Access-Control-Max-Age": "600"})
        return out
