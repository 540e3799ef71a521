"""A stand-in for `qrexec-client-vm` plus dom0's policy evaluation (Qubes 4.2), for tests only.

Qubes cannot run in CI. This models what the clef-armory code depends on, from the documented
behaviour of qubes-core-qrexec 4.2 (docs/qubes.md lists what only a real Qubes machine confirms):

- `qrexec-client-vm [--no-filter-escape-chars-stdout] TARGET SERVICE[+ARG]`; `@default` lets
  the policy pick the target.
- dom0 policy: every `*.policy` file of the policy directory in name order, first matching line
  wins, no match = deny. A `.policy` file whose name has characters outside `[0-9a-z_.-]`, or any
  line that does not parse, breaks every call (they are all refused). `allow` to `@default`
  needs `target=`; `ask` is answered by the world file.
- Refused: `Request refused` on stderr, exit 126. No such target qube: refused too. A target
  the world marks `"unreachable"`: exit 125 (qrexec's code for other failures).
- Service lookup in the target qube's root: `NAME+ARG`, then `NAME`, each first in
  `/usr/local/etc/qubes-rpc/`, then `/etc/qubes-rpc/`; none: exit 127.
- The service's environment is exactly: QREXEC_REMOTE_DOMAIN, QREXEC_SERVICE_FULL_NAME
  (`NAME+ARG`, trailing `+` without argument), QREXEC_SERVICE_ARGUMENT and `$1` (only with an
  argument; characters outside `[A-Za-z0-9_.+-]` become `_`), QREXEC_AGENT_PID, and PATH.
- Stdio is raw bytes (escape filtering only when stdout is a terminal); the service's stderr
  reaches the caller's stderr; its exit code becomes ours. Each call is its own process, so
  calls run in parallel.
- The service runs in the target qube's network namespace (`ip netns exec`), so it sees that
  qube's network, not the caller's.

World file (JSON): {"policy_dir": DIR, "ask": "allow"|"deny", "ask_target": QUBE,
"qubes": {NAME: {"root": DIR, "netns": NS, "tags": [T, ...]}}}. The caller's name comes from
`--source NAME`, given by the per-qube wrapper script, never by the calling program.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

REFUSED = 126
FAILED = 125
NO_SERVICE = 127
_FILE = re.compile(r"[0-9a-z_.-]+")
_ARG_BAD = re.compile(r"[^A-Za-z0-9_.+-]")
RPC_DIRS = ("usr/local/etc/qubes-rpc", "etc/qubes-rpc")


def refuse(why: str) -> int:
    if os.environ.get("STANDIN_DEBUG"):
        print(f"qrexec-standin: {why}", file=sys.stderr)
    print("Request refused", file=sys.stderr)
    return REFUSED


def load_rules(policy_dir: Path) -> list[list[str]] | None:
    """All rules in order, or None when the policy is broken (every call then refused)."""
    rules: list[list[str]] = []
    for path in sorted(policy_dir.iterdir()):
        if not path.name.endswith(".policy"):
            continue
        if not _FILE.fullmatch(path.name):
            return None
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            tokens = line.split()
            if len(tokens) < 5 or tokens[4] not in ("allow", "deny", "ask"):
                return None
            if tokens[1] != "*" and not tokens[1].startswith("+"):
                return None
            rules.append(tokens)
    return rules


def matches_qube(token: str, name: str, world: dict[str, Any]) -> bool:
    if token == name:
        return True
    if name.startswith("@"):
        return False  # @default is matched only by @default
    if token == "@anyvm":
        return name != "dom0"
    if token.startswith("@tag:"):
        return token[5:] in world["qubes"].get(name, {}).get("tags", [])
    return False


def decide(world: dict[str, Any], source: str, target: str, service: str, arg: str) -> str | None:
    """The qube to run the service in, or None when refused."""
    rules = load_rules(Path(world["policy_dir"]))
    if rules is None:
        return None
    for svc, argument, src, tgt, action, *params in rules:
        if svc not in ("*", service) or argument not in ("*", "+" + arg):
            continue
        if not matches_qube(src, source, world) or not matches_qube(tgt, target, world):
            continue
        opts = dict(p.split("=", 1) for p in params if "=" in p)
        if action == "deny":
            return None
        if action == "ask":
            if world.get("ask") != "allow":
                return None
            chosen = world.get("ask_target") or opts.get("default_target")
            return chosen if isinstance(chosen, str) else None
        if target == "@default":
            return opts.get("target")
        return opts.get("target", target)
    return None


def main(argv: list[str]) -> int:
    args = list(argv)
    world = json.loads(Path(args.pop(args.index("--world") + 1)).read_text())
    args.remove("--world")
    source = args.pop(args.index("--source") + 1)
    args.remove("--source")
    filter_stdout = True
    while args and args[0].startswith("--"):
        opt = args.pop(0)
        if opt == "--no-filter-escape-chars-stdout":
            filter_stdout = False
        elif opt not in ("--filter-escape-chars-stderr", "--no-filter-escape-chars-stderr"):
            print(f"qrexec-client-vm: unknown option {opt}", file=sys.stderr)
            return 2
    if len(args) < 2:
        print("usage: qrexec-client-vm [options] TARGET SERVICE[+ARG] [LOCAL_PROGRAM]", file=sys.stderr)
        return 2
    target, full = args[0], args[1]
    service, _, arg = full.partition("+")
    arg = _ARG_BAD.sub("_", arg)
    chosen = decide(world, source, target, service, arg)
    if chosen is None:
        return refuse("denied by policy")
    qube = world["qubes"].get(chosen)
    if qube is None or "root" not in qube:
        return refuse(f"no such target qube {chosen!r}")
    if qube.get("unreachable"):  # the world's way to break the vchan connection
        print(f"qrexec: cannot connect to {chosen}", file=sys.stderr)
        return FAILED
    root = Path(qube["root"])
    candidates = [f"{service}+{arg}", service] if arg else [f"{service}+", service]
    path = next((root / d / n for n in candidates for d in RPC_DIRS if (root / d / n).is_file()), None)
    if path is None or not os.access(path, os.X_OK):
        print(f"qrexec: service {service} not found in {chosen}", file=sys.stderr)
        return NO_SERVICE
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "QREXEC_REMOTE_DOMAIN": source,
        "QREXEC_SERVICE_FULL_NAME": f"{service}+{arg}",
        "QREXEC_AGENT_PID": str(os.getpid()),
    }
    if arg:
        env["QREXEC_SERVICE_ARGUMENT"] = arg
    cmd = [str(path), *([arg] if arg else [])]
    if qube.get("netns"):
        ip = shutil.which("ip")
        if ip is None:
            return FAILED
        cmd = [ip, "netns", "exec", qube["netns"], *cmd]
    sys.stdout.flush()
    if filter_stdout and os.isatty(1):
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, check=False)
        safe = bytes(b if b in (9, 10) or 32 <= b < 127 else 95 for b in proc.stdout)
        os.write(1, safe)
        return proc.returncode
    os.execve(cmd[0], cmd, env)  # noqa: S606 - raw stdio, stderr and exit code are the service's own
    return FAILED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
