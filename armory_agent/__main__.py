"""CLI: `python3 -m armory_agent serve|unlock|lock|status [--config PATH]`."""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import sys
from pathlib import Path

from armory_agent import config, control
from armory_agent.errors import AgentError


def _read_password() -> str:
    """One line from stdin when it is not a TTY (provisioning pipes it), else a hidden prompt."""
    if sys.stdin.isatty():
        return getpass.getpass("Master password: ")
    line = sys.stdin.readline()
    return line[:-1] if line.endswith("\n") else line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m armory_agent", description=__doc__)
    parser.add_argument("command", choices=["serve", "unlock", "lock", "status"])
    parser.add_argument(
        "--config", type=Path, default=config.DEFAULT_PATH, help="agent config file (TOML or JSON)"
    )
    parser.add_argument("--verbose", action="store_true", help="log Clef's output too (serve)")
    args = parser.parse_args(argv)
    try:
        cfg = config.load(args.config)
        if args.command == "serve":
            logging.basicConfig(
                level=logging.INFO,
                format="%(levelname)s %(name)s: %(message)s",
                stream=sys.stderr,
            )
            if not args.verbose:
                logging.getLogger("armory_agent.clef").setLevel(logging.WARNING)
            from armory_agent.service import serve

            serve(cfg)
            return 0
        if args.command == "unlock":
            password = _read_password()
            if not password:
                raise AgentError("no password given")
            reply = control.send(cfg.control.socket, {"cmd": "unlock", "password": password})
            del password
        else:
            reply = control.send(cfg.control.socket, {"cmd": args.command})
        reply.pop("ok", None)
        print(json.dumps(reply))
        return 0
    except AgentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # anything not caught where it happened: still one line, never a traceback
        print(f"error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
