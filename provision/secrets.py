"""The master and account passwords: asked for locally, held in memory only.

They are typed (twice when something new is created) with getpass, or read once
from a --password-file that must be mode 0600 and owned by us. They leave this
process only on an SSH channel's stdin. Nothing here writes, logs or exports them.

Password file format: ``master: <password>`` and ``account: <password>`` lines
(blank lines and ``#`` comments ignored); only the lines needed are required.
"""

from __future__ import annotations

import dataclasses
import getpass
import os
import stat
from collections.abc import Callable
from pathlib import Path

from clef_armory.errors import ConfigError

MIN_LENGTH = 10  # Clef's own rule: at least 10 printable 7-bit ASCII characters.
_KINDS = ("master", "account")


@dataclasses.dataclass(frozen=True, repr=False)
class Secret:
    """A password that never shows itself in a repr, a log line or a traceback."""

    value: str

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__


def validate(kind: str, value: str) -> Secret:
    """Clef refuses short or non-ASCII passwords; say so before anything happens."""
    if len(value) < MIN_LENGTH:
        raise ConfigError(f"the {kind} password must be at least {MIN_LENGTH} characters")
    if not all(32 <= ord(c) < 127 for c in value):
        raise ConfigError(f"the {kind} password must be printable ASCII (Clef's rule)")
    return Secret(value)


def read_password_file(path: Path) -> dict[str, Secret]:
    """Read the password file once; refuse it unless it is a regular 0600 file we own."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise ConfigError(f"password file {path} does not exist") from None
    except OSError as e:
        raise ConfigError(f"cannot open password file {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"password file {path} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode != 0o600:
            raise ConfigError(f"password file {path} has mode {mode:04o}; it must be 0600 (chmod 600 {path})")
        if st.st_uid != os.geteuid():
            raise ConfigError(f"password file {path} is not owned by you")
        with os.fdopen(fd, "r", encoding="ascii", errors="strict") as f:
            fd = -1
            text = f.read()
    except UnicodeDecodeError:
        raise ConfigError(f"password file {path} is not ASCII text") from None
    finally:
        if fd >= 0:
            os.close(fd)
    found: dict[str, Secret] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        kind, sep, value = line.partition(":")
        kind = kind.strip()
        if not sep or kind not in _KINDS:
            raise ConfigError(f"password file {path} line {number}: expected 'master: ...' or 'account: ...'")
        if kind in found:
            raise ConfigError(f"password file {path} line {number}: {kind} given twice")
        found[kind] = validate(kind, value.strip())
    return found


class Passwords:
    """Hands out passwords on demand: from the file if given, else by asking."""

    def __init__(
        self,
        password_file: Path | None = None,
        ask: Callable[[str], str] = getpass.getpass,
    ) -> None:
        self._from_file = read_password_file(password_file) if password_file else None
        self._file = password_file
        self._ask = ask
        self._cache: dict[str, Secret] = {}
        self._generated: list[Secret] = []

    def get(self, kind: str, *, new: bool) -> Secret:
        """The ``kind`` password; when ``new`` it is typed twice and must match."""
        if kind in self._cache:
            return self._cache[kind]
        if self._from_file is not None:
            if kind not in self._from_file:
                raise ConfigError(f"password file {self._file} has no '{kind}:' line, which this run needs")
            secret = self._from_file[kind]
        else:
            what = "new " if new else ""
            value = self._ask(f"{what}{kind} password: ")
            secret = validate(kind, value)
            if new and self._ask(f"repeat {what}{kind} password: ") != value:
                raise ConfigError(f"the two {kind} passwords differ; nothing was changed")
        self._cache[kind] = secret
        return secret

    def add_generated(self, secret: Secret) -> None:
        """A generated account password (provision.words): searched for like the others."""
        self._generated.append(secret)

    def known(self) -> list[Secret]:
        """Every password handed out or generated so far (for the 'secret appears nowhere' check)."""
        return [*self._cache.values(), *self._generated]
