"""Who may talk to the signer: Host allowlist (DNS rebinding), Origin allowlist, CORS headers.

Clef behind the agent sees only 127.0.0.1, so these checks happen here, on the real TCP peer
and the client's own headers. X-Forwarded-For / X-Real-IP are never trusted or passed on.
"""

from __future__ import annotations

import re

from armory_agent.config import PolicyConfig
from armory_agent.httpproto import HttpError, Request

QUBE_HEADER = "x-clef-armory-qube"
_QUBE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,31}")
AGENT_USER_AGENT = "clef-armory-agent"


def check_host(req: Request, policy: PolicyConfig) -> None:
    host = req.headers.get("host", "").strip().lower()
    if host not in policy.hosts:
        raise HttpError(403, "Host not allowed", code=-32003)


def check_origin(req: Request, policy: PolicyConfig) -> None:
    """No Origin (curl, scripts, web3.py) is fine; a browser's Origin must be allowlisted."""
    origin = req.headers.get("origin")
    if origin is not None and origin not in policy.origins:
        raise HttpError(403, "Origin not allowed", code=-32003)


def cors_headers(req: Request, policy: PolicyConfig, preflight: bool = False) -> dict[str, str]:
    origin = req.headers.get("origin")
    if not policy.cors or origin is None or origin not in policy.origins:
        return {}
    headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
    if preflight:
        headers.update(
            {
                "Access-Control-Allow-Methods": "POST, GET, OPTIONS",
                "Access-Control-Allow-Headers": "Content-Type",
                "Access-Control-Max-Age": "600",
            }
        )
    return headers


def is_json_content_type(req: Request) -> bool:
    """The media types Clef accepts (anything else Clef answers 415)."""
    value = req.headers.get("content-type", "").split(";")[0].strip().lower()
    return value in ("application/json", "application/json-rpc", "application/jsonrequest")


def qube_of(req: Request) -> str | None:
    """The calling Qubes qube named by the armory qube's qrexec service, or None.

    Trusted because on a Qubes setup only the armory qube reaches the USB link, and its service
    takes the name from qrexec (QREXEC_REMOTE_DOMAIN), never from the caller (docs/qubes.md).
    A malformed or repeated header (joined with ", ") is refused, never guessed at.
    """
    raw = req.headers.get(QUBE_HEADER)
    if raw is None:
        return None
    if not _QUBE_NAME.fullmatch(raw):
        raise HttpError(400, "bad X-Clef-Armory-Qube header: one qube name, [A-Za-z0-9_.-]{1,31}")
    return raw


def clef_user_agent(qube: str | None) -> str:
    """The User-Agent Clef's rules see (req.meta.UserAgent): set by the agent, never the client's."""
    return AGENT_USER_AGENT if qube is None else f"{AGENT_USER_AGENT} qube={qube}"
