"""Generated account passwords: 12 words (128 bits) shown once, on the terminal only.

A password nobody chose needs no slow KDF: guessing 128 random bits is out of reach
whatever scrypt costs, so accounts made this way use Clef's ``--lightkdf`` and every
signature decrypts the key in milliseconds instead of seconds and 256 MiB. The words
are written to the controlling terminal (``/dev/tty``), never stdout or a log, so no
pipe or CI log captures them; the user types two of them back before anything is
created. The word list is BIP-39 English (the ``mnemonic`` package); this is a
password, not a wallet recovery phrase.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from typing import Protocol

from mnemonic import Mnemonic

from clef_armory.errors import ConfigError
from provision.secrets import Secret, validate

# --account-password values: generated words (the default) or a password the user chooses.
GENERATED, ASK = "words", "ask"
MODES = (GENERATED, ASK)
WORDS = 12
STRENGTH_BITS = 128
_CLEAR = "\033[H\033[2J\033[3J"  # home, clear screen, clear scrollback


class Terminal(Protocol):
    """Where the words go and where the typed-back words come from."""

    def write(self, text: str) -> None: ...

    def read_line(self, prompt: str) -> str: ...

    def close(self) -> None: ...


class TtyTerminal:
    """The controlling terminal, opened directly: stdout and stderr may be a pipe or a log."""

    def __init__(self, path: str = "/dev/tty") -> None:
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
        except OSError:
            raise ConfigError(
                "no terminal to show the generated account password on; use --account-password ask "
                "with a 0600 --password-file ('account: ...') instead"
            ) from None
        self._buffer = b""

    def write(self, text: str) -> None:
        data = text.encode()
        while data:
            data = data[os.write(self._fd, data):]

    def read_line(self, prompt: str) -> str:
        self.write(prompt)
        while b"\n" not in self._buffer:
            chunk = os.read(self._fd, 1024)
            if not chunk:
                raise ConfigError("the terminal closed before the words were typed back; nothing was created")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode(errors="replace").strip()

    def close(self) -> None:
        os.close(self._fd)


def generate() -> Secret:
    """12 words from the BIP-39 English list, 128 bits from the OS CSPRNG."""
    words = Mnemonic("english").generate(strength=STRENGTH_BITS)
    return validate("account", words)


def new_account_password(term: Terminal, label: str,
                         pick: Callable[[int], int] = secrets.randbelow) -> Secret:
    """Generate a password, show it once, have two of its words typed back.

    A mistyped word raises before anything is created; the next run shows new words
    (these were never used, so nothing needs them).
    """
    secret = generate()
    words = secret.value.split()
    assert len(words) == WORDS
    lines = [
        "",
        f"Account password for {label} ({WORDS} words). Write them down now, on paper.",
        "They are shown only this once and stored nowhere on this computer.",
        "With the keystore file they are your key backup (docs/backup.md).",
        "They are a password for the keystore file, not a wallet recovery phrase.",
        "",
        *(f"  {i:2d}. {w}" for i, w in enumerate(words, 1)),
        "",
    ]
    term.write("\n".join(lines) + "\n")
    term.read_line("Press Enter when they are written down (the screen is then cleared) ")
    term.write(_CLEAR)
    first = pick(WORDS)
    second = (first + 1 + pick(WORDS - 1)) % WORDS
    for index in sorted((first, second)):
        typed = term.read_line(f"Type word {index + 1} of the account password: ")
        if typed.lower() != words[index]:
            term.write(_CLEAR)
            raise ConfigError(
                f"word {index + 1} does not match what was written down; nothing was created. "
                "Run provision again: new words will be shown"
            )
    term.write(_CLEAR + "Words confirmed.\n")
    return secret
