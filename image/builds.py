"""Which build a task means when no ``--board`` is given: the one the user built last.

``flash``, ``provision``, ``unlock``, ``check`` and ``status`` read ``build/<board>/`` (the image, its
``known_hosts``). Taking the board only from invoke.yaml (mk2) sent a Mk I user who built ``--board mk1``
to a ``build/mk2/known_hosts`` that does not exist; so, unless ``--board`` says otherwise, the newest
build in the output directory decides, and the task says which one it uses.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from clef_armory.config import BOARDS, Settings


@dataclasses.dataclass(frozen=True)
class Choice:
    """The settings to use (their board decided) and, when the board was inferred, a line saying so."""

    settings: Settings
    note: str | None


def built(output_dir: Path) -> list[tuple[float, str]]:
    """(time built, board) for every board with a finished build (its manifest.json), newest first."""
    found = []
    for board in BOARDS:
        manifest = output_dir.expanduser() / board / "manifest.json"
        try:
            found.append((manifest.stat().st_mtime, board))
        except OSError:
            continue
    return sorted(found, reverse=True)


def choose(settings: Settings, given: str | None) -> Choice:
    """``given`` (a --board flag) wins; else the newest build; else invoke.yaml's board."""
    if given is not None:
        return Choice(settings.replace(board=given), None)
    builds = built(settings.output_dir)
    if not builds:
        return Choice(settings, None)
    when, board = builds[0]
    others = ", ".join(b for _, b in builds[1:])
    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(when))
    note = (f"using the {board} build in {settings.output_dir / board}/ (built {stamp}"
            + (f"; also built: {others}; --board chooses" if others else "") + ")")
    return Choice(settings.replace(board=board), note)
