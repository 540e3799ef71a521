"""Play the user in front of the terminal where provisioning shows generated account passwords.

`ScriptedTerminal` is an in-memory provision.words.Terminal (for the system test, which has no
terminal); `PtyUser` sits on the master side of a real pseudo-terminal while the real
`TtyTerminal` uses its slave side. Both read the words off the screen, as a person would, and
type back what they are asked for (or a wrong word, to test the refusal).
"""

from __future__ import annotations

import os
import pty
import re
import threading
from collections.abc import Callable

_WORD_LINE = re.compile(r"^\s*(\d{1,2})\. ([a-z]+)\s*$", re.MULTILINE)
_ASKED = re.compile(r"Type word (\d+) of")


def words_on_screen(screen: str) -> list[str]:
    """The numbered words of the last word set shown."""
    found = _WORD_LINE.findall(screen)
    words: list[str] = []
    for number, word in found:
        if int(number) == 1:
            words = []
        words.append(word)
    return words


class ScriptedTerminal:
    """A user who writes the words down correctly (or, with ``mistype``, gets one wrong)."""

    def __init__(self, mistype: bool = False) -> None:
        self.screen = ""
        self.written: list[list[str]] = []  # every word set, as written down on "paper"
        self.mistype = mistype
        self.closed = False

    def write(self, text: str) -> None:
        self.screen += text

    def read_line(self, prompt: str) -> str:
        self.screen += prompt
        if prompt.startswith("Press Enter"):
            self.written.append(words_on_screen(self.screen))
            return ""
        asked = _ASKED.search(prompt)
        assert asked, prompt
        word = self.written[-1][int(asked.group(1)) - 1]
        return "wrong" if self.mistype else word

    def close(self) -> None:
        self.closed = True


class PtyUser:
    """A pseudo-terminal and a thread that answers on its master side; ``path`` is the slave's name."""

    def __init__(self, mistype: bool = False, on_words: Callable[[list[str]], None] | None = None) -> None:
        self.master, self._slave = pty.openpty()
        self.on_words = on_words
        self.path = os.ttyname(self._slave)
        self.mistype = mistype
        self.screen = ""
        self.written: list[list[str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PtyUser:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        os.close(self._slave)
        self._thread.join(5)
        os.close(self.master)

    def _run(self) -> None:
        import select

        handled = 0  # prompts already answered (by position in the screen text)
        while not self._stop.is_set():
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if not ready:
                continue
            try:
                chunk = os.read(self.master, 4096)
            except OSError:
                return
            self.screen += chunk.decode(errors="replace")
            while True:
                enter = self.screen.find("Press Enter", handled)
                asked = _ASKED.search(self.screen, handled)
                starts = [p for p in (enter, asked.start() if asked else -1) if p >= 0]
                if not starts:
                    break
                at = min(starts)
                if at == enter:
                    self.written.append(words_on_screen(self.screen[:enter]))
                    if self.on_words is not None:  # e.g. add them to a running secret scan at once
                        self.on_words(self.written[-1])
                    answer = ""
                    handled = enter + len("Press Enter")
                else:
                    assert asked is not None
                    word = self.written[-1][int(asked.group(1)) - 1]
                    answer = "wrong" if self.mistype else word
                    handled = asked.end()
                os.write(self.master, (answer + "\n").encode())
