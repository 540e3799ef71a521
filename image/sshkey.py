"""The admin's SSH key for the image: the one given, ~/.ssh/id_ed25519.pub, or a key pair made for it.

A fresh laptop may have no SSH key at all. Rather than stop, the build makes a key pair just for the
device, ``~/.ssh/clef-armory_ed25519``, which provisioning tries by default (after ssh-agent's keys).
That key is as powerful as the Ethereum keys (docs/threat-model.md), so when there is a terminal
ssh-keygen asks for a passphrase on it itself (the passphrase is never on a command line); without a
terminal the key is made without one, and the build says so plainly.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from clef_armory.errors import BuildError, PrerequisiteError
from image import manifest

DEFAULT_PUBLIC_KEY = Path("~/.ssh/id_ed25519.pub")
DEVICE_KEY = Path("~/.ssh/clef-armory_ed25519")

Log = Callable[[str], None]


def device_key() -> Path:
    """The dedicated private key's path (its public key is the same name + .pub)."""
    return DEVICE_KEY.expanduser()


def device_public_key() -> Path:
    return _public(device_key())


def _public(key: Path) -> Path:
    return key.with_name(key.name + ".pub")


def authorized_key(path: Path, *, log: Log = print, interactive: bool | None = None) -> str:
    """The public key line for the image.

    ``path`` is used when it exists or was chosen (``--ssh-key``); only when it is the default
    ``~/.ssh/id_ed25519.pub`` and missing is the dedicated key used, made first if needed.
    """
    given = path.expanduser()
    if given.exists() or given != DEFAULT_PUBLIC_KEY.expanduser():
        return manifest.read_authorized_key(path)
    key = device_key()
    if _public(key).exists():
        log(f"    SSH key: {_public(key)} ({given} does not exist)")
    else:
        make(key, interactive=sys.stdin.isatty() if interactive is None else interactive, log=log)
    return manifest.read_authorized_key(_public(key))


def make(key: Path, *, interactive: bool, log: Log = print) -> None:
    """A new ed25519 key pair at ``key``: passphrase asked on the terminal, else none (said so).

    ssh-keygen writes to temporary names that are renamed only when it succeeded, so an interrupted
    or failed run leaves no half-made key.
    """
    public = _public(key)
    if key.exists():
        raise BuildError(f"{key} exists but {public} does not: run ssh-keygen -y -f {key} > {public}")
    key.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = key.with_name(f".{key.name}.tmp-{os.getpid()}")
    argv = ["ssh-keygen", "-q", "-t", "ed25519", "-C", f"clef-armory@{socket.gethostname()}",
            "-f", str(tmp)]
    if interactive:
        log(f"    making an SSH key for the device at {key}: it can take over the device, "
            "so give it a passphrase")
    else:
        argv[1:1] = ["-N", ""]  # an empty passphrase: nothing secret on the command line
    try:
        # Interactive: ssh-keygen prompts on the terminal itself, twice.
        run = subprocess.run(argv, stdin=None if interactive else subprocess.DEVNULL,
                             stdout=None if interactive else subprocess.PIPE,
                             stderr=None if interactive else subprocess.PIPE, text=True, check=False)
    except FileNotFoundError:
        raise PrerequisiteError("ssh-keygen is not installed: sudo apt-get install openssh-client") from None
    except BaseException:
        _remove(tmp)
        raise
    if run.returncode != 0 or not tmp.is_file() or not _public(tmp).is_file():
        _remove(tmp)
        why = (run.stderr or "").strip().splitlines()[-1:] or [f"exit status {run.returncode}"]
        raise BuildError(f"could not make the SSH key {key}: {why[0]}")
    os.chmod(tmp, 0o600)
    os.replace(tmp, key)  # the private key first: a public key alone would be used next time
    os.replace(_public(tmp), public)
    fp = manifest.fingerprint(public.read_text().strip())
    if not interactive:
        how = f"WITHOUT a passphrase (no terminal to ask on); add one with: ssh-keygen -p -f {key}"
    elif _opens_without_passphrase(key):
        how = f"WITHOUT a passphrase (you left it empty); add one with: ssh-keygen -p -f {key}"
    else:
        how = "protected by your passphrase"
    log(f"    made SSH key {key} ({fp}), {how}")


def _opens_without_passphrase(key: Path) -> bool:
    run = subprocess.run(["ssh-keygen", "-y", "-P", "", "-f", str(key)], capture_output=True,
                         stdin=subprocess.DEVNULL, check=False)
    return run.returncode == 0


def _remove(tmp: Path) -> None:
    for p in (tmp, _public(tmp)):
        p.unlink(missing_ok=True)
