"""build-image needs root (mmdebstrap --mode=root, chroot, useradd and chown inside the image): a
normal user's `./do build-image` runs the build under sudo, for that user.

- ``ensure_root`` re-runs the same invoke command line with sudo when we are not root, keeping the
  caller's PATH (their Go), invoke/Go settings and working directory (relative paths stay right).
- ``for_caller``, in the root process started by sudo (``SUDO_UID``), makes ``~`` mean the caller's
  home (their SSH key, their cache) and afterwards hands everything the build made under the output
  directory, the cache and ~/.ssh back to the caller, whether the build succeeded or not. Without
  sudo (root itself, CI) it changes nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from clef_armory.config import Settings
from clef_armory.errors import PrerequisiteError
from image import sshkey

# Environment kept across sudo (which resets it): where Go and Python are, settings given as variables.
KEEP_PREFIXES = ("INVOKE_", "CLEF_ARMORY_", "GO")
KEEP_NAMES = ("PATH", "PYTHONPATH", "VIRTUAL_ENV", "TERM", "LANG", "LC_ALL")


@dataclasses.dataclass(frozen=True)
class Caller:
    """The person the build is for, when root runs it on their behalf through sudo."""

    uid: int
    gid: int
    home: Path


def sudo_command(argv: list[str], environ: dict[str, str], sudo: str = "sudo") -> list[str]:
    """The command line that runs ``python -m invoke ARGS`` as root with the caller's settings."""
    keep = [f"{k}={v}" for k, v in sorted(environ.items())
            if k in KEEP_NAMES or k.startswith(KEEP_PREFIXES)]
    return [sudo, "--", "env", *keep, sys.executable, "-m", "invoke", *argv[1:]]


def ensure_root(argv: list[str] | None = None) -> None:
    """Return when root; otherwise run this command again under sudo and exit with its status."""
    if os.geteuid() == 0:
        return
    sudo = shutil.which("sudo")
    if sudo is None:
        raise PrerequisiteError(
            "build-image needs root (mmdebstrap, chroot): run it as root, or install sudo "
            "(apt-get install sudo) and give your user sudo rights"
        )
    command = sudo_command(list(sys.argv if argv is None else argv), dict(os.environ), sudo)
    print("build-image needs root (mmdebstrap, chroot): running it with sudo", file=sys.stderr,
          flush=True)
    os.execv(sudo, command)  # noqa: S606 - sudo itself, with the same arguments


def caller(environ: dict[str, str] | None = None) -> Caller | None:
    """Who started us through sudo, or None (not root, or root without sudo)."""
    env = os.environ if environ is None else environ
    if os.geteuid() != 0 or not env.get("SUDO_UID", "").isdigit() or env["SUDO_UID"] == "0":
        return None
    uid = int(env["SUDO_UID"])
    gid = int(env["SUDO_GID"]) if env.get("SUDO_GID", "").isdigit() else uid
    try:
        home = Path(pwd.getpwuid(uid).pw_dir)
    except KeyError:
        return None
    return Caller(uid, gid, home)


def hand_back(path: Path, who: Caller) -> None:
    """Give root-owned entries under ``path`` (and ``path`` itself) to the caller."""
    if not path.exists():
        return
    entries = [str(path)]
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            entries.extend(os.path.join(root, n) for n in [*dirs, *files])
    for entry in entries:
        with contextlib.suppress(FileNotFoundError):
            if os.lstat(entry).st_uid == 0:
                os.lchown(entry, who.uid, who.gid)


@contextlib.contextmanager
def for_caller(settings: Settings) -> Iterator[Caller | None]:
    """Under sudo: ~ is the caller's home, and what the build made is theirs afterwards."""
    who = caller()
    if who is None:
        yield None
        return
    saved = os.environ.get("HOME")
    os.environ["HOME"] = str(who.home)
    out_root = settings.output_dir.expanduser().absolute()
    made_out_root = not out_root.exists()
    cache = settings.cache_path.absolute()
    ssh_dir = sshkey.device_key().parent
    try:
        yield who
    finally:
        if made_out_root:
            hand_back(out_root, who)
        else:
            hand_back(out_root / settings.board, who)
        # Only what lives in the caller's home: a shared cache elsewhere stays as it is.
        if cache.is_relative_to(who.home):
            hand_back(cache, who)
            parent = cache.parent
            while parent != who.home and parent.is_relative_to(who.home):
                with contextlib.suppress(FileNotFoundError):
                    if parent.lstat().st_uid == 0:
                        os.lchown(parent, who.uid, who.gid)
                parent = parent.parent
        if ssh_dir.is_relative_to(who.home):
            with contextlib.suppress(FileNotFoundError):
                if ssh_dir.lstat().st_uid == 0:
                    os.lchown(ssh_dir, who.uid, who.gid)
            for key in (sshkey.device_key(), sshkey.device_public_key()):
                hand_back(key, who)
        if saved is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = saved
