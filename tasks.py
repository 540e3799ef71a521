"""clef-armory tasks: a thin CLI over the library (see docs/design.md).

Each task parses its flags, calls one library function and prints a short result.
Errors from the library are one line (``--debug`` shows the traceback).
"""

from __future__ import annotations

from invoke.context import Context
from invoke.tasks import task

from clef_armory.cli import settings_from, user_errors


@task(
    help={
        "fast": "Run only the fast tier (unit + integration, no image builds or QEMU boots).",
        "k": "Only run tests matching this pytest -k expression.",
        "lint": "Run ruff and mypy before the tests (default on).",
    }
)
@user_errors
def test(c: Context, fast: bool = False, k: str = "", lint: bool = True) -> None:
    """Run ruff, mypy and the whole test suite (the CI command)."""
    from clef_armory import testrun

    testrun.run(settings_from(c), fast=fast, select=k, lint=lint)
