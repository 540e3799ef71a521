"""The test command: lint, type-check, then every pytest tier; any failure is a non-zero exit."""

from __future__ import annotations

import subprocess
import sys

from clef_armory.config import REPO_ROOT, Settings
from clef_armory.errors import ArmoryError


class TestsFailed(ArmoryError):
    """A lint, type or test step failed."""


def _step(name: str, argv: list[str]) -> None:
    print(f"==> {name}", flush=True)
    rc = subprocess.call(argv, cwd=REPO_ROOT)
    if rc == 5 and argv[2:3] == ["pytest"]:
        raise TestsFailed(f"{name}: no tests were collected")
    if rc != 0:
        raise TestsFailed(f"{name} failed (exit {rc})")


def run(settings: Settings, fast: bool = False, select: str = "", lint: bool = True) -> None:
    """Run the suite; `fast` skips the `slow` tier (image builds, QEMU)."""
    py = sys.executable
    if lint:
        _step("ruff", [py, "-m", "ruff", "check", "."])
        _step("mypy", [py, "-m", "mypy"])
    argv = [py, "-m", "pytest", "--durations=15"]  # the slowest steps, for the budget (README)
    if fast:
        argv += ["-m", "not slow"]
    if select:
        argv += ["-k", select]
    _step("pytest", argv)
