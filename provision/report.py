"""Output: a short table for people, JSON for scripts."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from provision.checks import CheckResult
from provision.setup import Step


def steps_table(steps: Sequence[Step]) -> str:
    width = max((len(s.name) for s in steps), default=4)
    lines = [f"{s.name:<{width}}  {'changed' if s.changed else 'ok':<7}  {s.detail}" for s in steps]
    if not any(s.changed for s in steps):
        lines.append("nothing changed: the device was already provisioned like this")
    return "\n".join(lines)


def checks_table(results: Sequence[CheckResult]) -> str:
    width = max((len(r.name) for r in results), default=5)
    lines = [f"{r.name:<{width}}  {'PASS' if r.ok else 'FAIL'}  {r.reason}" for r in results]
    failed = sum(not r.ok for r in results)
    lines.append(f"{len(results) - failed} passed, {failed} failed")
    return "\n".join(lines)


def as_json(steps: Sequence[Step] = (), results: Sequence[CheckResult] = (), **extra: Any) -> str:
    doc: dict[str, Any] = dict(extra)
    if steps:
        doc["steps"] = [dataclasses.asdict(s) for s in steps]
        doc["changed"] = any(s.changed for s in steps)
    if results:
        doc["checks"] = [dataclasses.asdict(r) for r in results]
        doc["ok"] = all(r.ok for r in results)
    return json.dumps(doc, indent=2)


def agent_line(device: dict[str, Any], agent: dict[str, Any] | None) -> str:
    """The agent's state in words: "not provisioned" rather than Clef's error about a missing seed, and
    the reason whenever the agent reports one."""
    if agent is None:
        return "not answering (is clef-armory-agent.service running? see docs/troubleshooting.md)"
    state = str(agent.get("state", "?"))
    if not device.get("masterseed"):
        return "not provisioned (no master seed yet): run ./do provision"
    line = f"{state}, rules {agent.get('rules', '?')}"
    detail = agent.get("detail")
    if state == "error" and detail:
        line += f": {detail}"
    elif state == "locked":
        line += " (run ./do unlock)"
    return line


def system_line(system: dict[str, Any] | None) -> str:
    """Debian point release and whether the image had the security suite, in one line."""
    if not system:
        return "unknown"
    image = system.get("image") or {}
    debian = system.get("debian_version") or image.get("debian_version") or "?"
    parts = [f"Debian {debian}" + (f" ({image['suite']})" if image.get("suite") else "")]
    if image.get("kernel_version"):
        parts.append(f"kernel {image['kernel_version']}")
    if image.get("agent_version"):
        parts.append(f"agent {image['agent_version']}")
    security = image.get("security_updates")
    if security == "included":
        parts.append("built with security updates")
    elif security:
        parts.append(f"built WITHOUT security updates ({security}): rebuild and update")
    else:
        parts.append(f"security updates unknown ({system.get('problem') or 'not recorded'})")
    return ", ".join(parts)


def status_text(status: dict[str, Any]) -> str:
    """What ``invoke status`` prints for a person (``--json`` prints ``status`` itself)."""
    dev = status["device"]
    installed, attested = (dev["rules_sha256"] or "none")[:16], (dev["rules_record"] or "none")[:16]
    return "\n".join([
        f"master seed  {'present' if dev['masterseed'] else 'absent'}",
        f"accounts     {', '.join(a['address'] for a in dev['accounts']) or 'none'}",
        f"rules        {installed} (attested {attested})",
        f"agent        {agent_line(dev, status['agent'])}",
        f"system       {system_line(status.get('system'))}",
        f"link health  {status['health']}",
    ])
