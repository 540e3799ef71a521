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
