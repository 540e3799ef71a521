"""A small linter for qrexec policy files (Qubes 4.2 `/etc/qubes/policy.d/*.policy`).

It follows the field rules of qubes-core-qrexec 4.2: a file name of ``[0-9a-z_.-]`` ending in
``.policy`` (dom0 refuses the whole directory otherwise, which breaks every call), lines of
``SERVICE +ARG|* SOURCE TARGET ACTION [key=value ...]``, the tokens each field accepts, and the
parameters each action accepts. It checks what we generate before it reaches dom0; it is not
the policy daemon.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qubes import QubesError

FILE_NAME = re.compile(r"[0-9a-z_.-]+\.policy")
QUBE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,30}")
_SERVICE = re.compile(r"[A-Za-z0-9_.-]+")
_ARGUMENT = re.compile(r"\+[A-Za-z0-9_.+-]*")
_TAG = re.compile(r"@(tag|type):[A-Za-z0-9_.-]+")
_DISPVM = re.compile(r"@dispvm(:(@tag:)?[A-Za-z0-9_.-]+)?")
PARAMS = {
    "allow": ("target", "user", "notify", "autostart"),
    "deny": ("notify",),
    "ask": ("target", "default_target", "user", "notify", "autostart"),
}
RESERVED = ("none", "default", "@default")


@dataclass(frozen=True)
class Rule:
    line: int
    service: str
    argument: str
    source: str
    target: str
    action: str
    params: tuple[tuple[str, str], ...]


def _qube_token(tok: str, *, target: bool) -> bool:
    if tok in ("@anyvm", "@adminvm", "dom0") or _TAG.fullmatch(tok) or _DISPVM.fullmatch(tok):
        return True
    if tok == "@default":
        return target
    return bool(QUBE.fullmatch(tok)) and tok.lower() not in RESERVED


def _target_value(value: str) -> bool:
    return bool(value == "@adminvm" or value == "dom0" or _DISPVM.fullmatch(value)
                or (QUBE.fullmatch(value) and value.lower() not in RESERVED))


def parse(text: str) -> tuple[list[Rule], list[str]]:
    """The rules and the problems found (each problem names its line)."""
    rules: list[Rule] = []
    problems: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"line {number}"
        if line.startswith("!"):
            problems.append(f"{where}: directives ({line.split()[0]}) are not used in this file")
            continue
        tokens = line.split()
        if len(tokens) < 5:
            problems.append(f"{where}: needs SERVICE ARGUMENT SOURCE TARGET ACTION")
            continue
        service, argument, source, target, action, *rest = tokens
        if not (service == "*" or _SERVICE.fullmatch(service)):
            problems.append(f"{where}: bad service name {service!r} (the argument is its own field)")
        if not (argument == "*" or _ARGUMENT.fullmatch(argument)):
            problems.append(f"{where}: argument must be * or +ARG, not {argument!r}")
        if service == "*" and argument != "*":
            problems.append(f"{where}: service * needs argument *")
        if not _qube_token(source, target=False):
            problems.append(f"{where}: bad source {source!r}")
        if not _qube_token(target, target=True):
            problems.append(f"{where}: bad target {target!r}")
        if action not in PARAMS:
            problems.append(f"{where}: action must be allow, deny or ask, not {action!r}")
            continue
        params: dict[str, str] = {}
        for item in rest:
            key, sep, value = item.partition("=")
            if not sep or key not in PARAMS[action]:
                problems.append(f"{where}: {action} does not take {item!r}")
            elif key in params:
                problems.append(f"{where}: {key}= given twice")
            elif key in ("target", "default_target") and not _target_value(value):
                problems.append(f"{where}: bad {key}= value {value!r}")
            elif key in ("notify", "autostart") and value not in ("yes", "no"):
                problems.append(f"{where}: {key}= must be yes or no")
            else:
                params[key] = value
        if action == "allow" and target == "@default" and "target" not in params:
            problems.append(f"{where}: allow with target @default needs target=")
        rules.append(Rule(number, service, argument, source, target, action, tuple(params.items())))
    return rules, problems


def lint(file_name: str, text: str) -> list[str]:
    """Every problem dom0 would have with this file (empty when it is fine)."""
    problems = []
    if not FILE_NAME.fullmatch(file_name):
        problems.append(f"file name {file_name!r}: only [0-9a-z_.-] and the .policy suffix")
    rules, found = parse(text)
    problems += found
    if not rules and not found:
        problems.append("no rules")
    return problems


def check(file_name: str, text: str) -> None:
    problems = lint(file_name, text)
    if problems:
        raise QubesError(f"{file_name}: {problems[0]}" + (f" (and {len(problems) - 1} more)"
                                                             if len(problems) > 1 else ""))
