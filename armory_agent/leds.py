"""Show the agent's state on the board's LEDs (Mk II: LED_WHITE + LED_BLUE, Mk I: LED).

locked: white on, blue off; ready: blue on, white off; request pending: both on.
Mk I's single LED: on when ready, blinking (timer trigger) while a request is pending.
Where no LED exists (tests, QEMU) every call is a no-op.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("armory_agent.leds")


class Leds:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.white = self._find("LED_WHITE")
        self.blue = self._find("LED_BLUE")
        self.single = self._find("LED") if self.white is None and self.blue is None else None
        self.state = "locked"
        self.pending = 0

    def _find(self, name: str) -> Path | None:
        path = self.root / name
        return path if (path / "brightness").exists() else None

    @property
    def present(self) -> bool:
        return any(p is not None for p in (self.white, self.blue, self.single))

    def _write(self, led: Path | None, attr: str, value: str) -> None:
        if led is None:
            return
        try:
            (led / attr).write_text(value)
        except OSError as e:
            log.debug("LED %s/%s: %s", led.name, attr, e)

    def _show(self) -> None:
        ready = self.state == "ready"
        busy = self.pending > 0
        self._write(self.white, "brightness", "1" if (busy or not ready) else "0")
        self._write(self.blue, "brightness", "1" if (ready or busy) else "0")
        if self.single is not None:
            self._write(self.single, "trigger", "timer" if busy else "none")
            self._write(self.single, "brightness", "1" if (ready or busy) else "0")

    def set_state(self, state: str) -> None:
        self.state = state
        self._show()

    def request_started(self) -> None:
        self.pending += 1
        if self.pending == 1:
            self._show()

    def request_finished(self) -> None:
        self.pending = max(0, self.pending - 1)
        if self.pending == 0:
            self._show()
