"""Which Debian archives the root filesystem is built from, and the state they are in.

An image is only worth updating to if it carries the fixes, so the rootfs comes from the suite
plus ``<suite>-updates`` and ``<suite>-security``. Before anything slow:

- each archive's ``InRelease`` is fetched (a few tens of KiB) and checked with ``gpgv`` against the
  Debian archive keyring; the digests of its armhf and all ``Packages`` indices it lists become part
  of the rootfs cache key, so new fixes mean a new rootfs, while a merely re-signed ``InRelease``
  (same packages) keeps the cached one;
- the extra archives' indices are fetched once with the host's apt (private state, like
  ``image/debs.py``): a mirror in the middle of a sync serves indices that do not match their
  ``InRelease`` ("File has unexpected size ... Mirror sync in progress?"), and mmdebstrap would fail
  on them. Such an archive is left out and the reason recorded (``security_updates:
  "unavailable: ..."``), unless the settings require it.
"""

from __future__ import annotations

import dataclasses
import email.utils
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clef_armory.errors import BuildError, PrerequisiteError

KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
ARCH = "armhf"
COMPONENT = "main"
# The indices whose digests key the rootfs: what apt installs from (armhf and Architecture: all).
INDICES = (f"{COMPONENT}/binary-{ARCH}/Packages", f"{COMPONENT}/binary-all/Packages")
# Settings.security_updates: include when the mirror serves them whole (default), insist, or not at all.
MODES = ("include", "require", "off")
INCLUDED = "included"
Log = Callable[[str], None]
_MAX_INRELEASE = 4 << 20


@dataclasses.dataclass(frozen=True)
class Archive:
    """One suite of one repository, as a sources.list line names it."""

    uri: str
    suite: str

    def line(self) -> str:
        return f"deb {self.uri} {self.suite} {COMPONENT}"

    def inrelease_url(self) -> str:
        return f"{self.uri.rstrip('/')}/dists/{self.suite}/InRelease"


@dataclasses.dataclass(frozen=True)
class Release:
    """What an archive's signed ``InRelease`` says about its current state."""

    archive: Archive
    date: int  # the Date: field, seconds since the epoch
    version: str  # "13.8" for the suite, "13" or "13-updates" for the others
    inrelease_sha256: str
    indices: tuple[tuple[str, str], ...]  # (index name, sha256) for INDICES the archive lists

    def record(self) -> dict[str, Any]:
        return {"source": self.archive.line(), "date": email.utils.formatdate(self.date, usegmt=True),
                "version": self.version, "inrelease_sha256": self.inrelease_sha256}


@dataclasses.dataclass(frozen=True)
class ArchiveState:
    """The archives a rootfs is built from; ``security_updates`` is "included", "off" or
    "unavailable: <reason>"."""

    base: Release
    extras: tuple[Release, ...]
    security_updates: str

    @property
    def releases(self) -> tuple[Release, ...]:
        return (self.base, *self.extras)

    def sources(self) -> list[str]:
        return [r.archive.line() for r in self.releases]

    def key_data(self) -> dict[str, Any]:
        """What the rootfs cache key sees: the sources and their index digests (not the dates)."""
        return {"sources": self.sources(), "indices": [list(r.indices) for r in self.releases],
                "security_updates": self.security_updates == INCLUDED}

    def source_date_epoch(self) -> int:
        """The newest Date of the archives used: one mirror state gives one epoch."""
        return max(r.date for r in self.releases)

    def record(self) -> list[dict[str, Any]]:
        return [r.record() for r in self.releases]


def extra_archives(suite: str, mirror: str, security_mirror: str) -> tuple[Archive, Archive]:
    """``<suite>-security`` (its own repository) and ``<suite>-updates`` (the main mirror)."""
    return Archive(security_mirror, f"{suite}-security"), Archive(mirror, f"{suite}-updates")


def parse_inrelease(text: str, archive: Archive) -> Release:
    """The fields we use from a (signature-checked) InRelease file."""
    date: int | None = None
    version = ""
    indices: dict[str, str] = {}
    in_sha256 = False
    for line in text.splitlines():
        if line.startswith("-----BEGIN PGP SIGNATURE"):
            break
        if line.startswith(" ") and in_sha256:
            parts = line.split()
            if len(parts) == 3 and parts[2] in INDICES:
                indices[parts[2]] = parts[0]
            continue
        in_sha256 = line.startswith("SHA256:")
        if line.startswith("Date:"):
            date = int(email.utils.parsedate_to_datetime(line.split(":", 1)[1].strip()).timestamp())
        elif line.startswith("Version:"):
            version = line.split(":", 1)[1].strip()
    if date is None:
        raise BuildError(f"{archive.inrelease_url()} has no Date: field")
    if f"{COMPONENT}/binary-{ARCH}/Packages" not in indices:
        raise BuildError(f"{archive.inrelease_url()} lists no {COMPONENT}/binary-{ARCH}/Packages index")
    return Release(archive, date, version, hashlib.sha256(text.encode()).hexdigest(),
                   tuple(sorted(indices.items())))


def fetch_release(archive: Archive, keyring: Path = KEYRING) -> Release:
    """Download ``InRelease``, check its signature with gpgv, parse it."""
    url = archive.inrelease_url()
    try:
        with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 - the mirror URL is a setting
            data = response.read(_MAX_INRELEASE + 1)
    except (urllib.error.URLError, OSError) as e:
        raise BuildError(f"cannot read {url}: {getattr(e, 'reason', e)}") from None
    if len(data) > _MAX_INRELEASE:
        raise BuildError(f"{url} is larger than {_MAX_INRELEASE >> 20} MiB: not an InRelease file")
    check_keyring(keyring)
    with tempfile.NamedTemporaryFile(prefix="InRelease-") as f:
        f.write(data)
        f.flush()
        result = subprocess.run(["gpgv", "--keyring", str(keyring), f.name], capture_output=True, text=True,
                                check=False)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise BuildError(f"{url}: bad signature ({last}); check the mirror setting")
    return parse_inrelease(data.decode("utf-8", "replace"), archive)


def check_keyring(keyring: Path = KEYRING) -> None:
    if not keyring.is_file():
        raise PrerequisiteError(f"{keyring} is missing; run: sudo apt-get install debian-archive-keyring")
    if shutil.which("gpgv") is None:
        raise PrerequisiteError("gpgv is not installed; run: sudo apt-get install gpgv")


_FAILED_RE = re.compile(r"^E: Failed to fetch \S+\s+(.*)$")


def index_problem(archive: Archive, work: Path, keyring: Path = KEYRING) -> str | None:
    """Fetch the archive's indices with apt (private state in `work`); None if they are whole, else
    why not in one line (e.g. "File has unexpected size (720 != 1108). Mirror sync in progress?")."""
    for sub in ("etc/apt/preferences.d", "etc/apt/sources.list.d", "trusted.gpg.d",
                "var/lib/apt/lists/partial", "var/cache/apt/archives/partial"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    (work / "status").touch()
    (work / "etc/apt/sources.list").write_text(
        f"deb [signed-by={keyring}] {archive.uri} {archive.suite} {COMPONENT}\n")
    options = ["-o", f"Dir={work}", "-o", f"Dir::State::status={work}/status",
               "-o", "Dir::Etc::trusted=/dev/null", "-o", f"Dir::Etc::TrustedParts={work}/trusted.gpg.d",
               "-o", f"APT::Architecture={ARCH}", "-o", f"APT::Architectures={ARCH}",
               "-o", "Acquire::Languages=none", "-o", "Debug::NoLocking=true"]
    try:
        # The caller's environment (proxies, as mmdebstrap will see them), English messages to parse.
        result = subprocess.run(["apt-get", *options, "-q", "update"], capture_output=True, text=True,
                                check=False, env={**os.environ, "LC_ALL": "C"})
    except FileNotFoundError:
        raise PrerequisiteError("apt-get is not installed: build on Debian or Ubuntu") from None
    if result.returncode == 0:
        return None
    for line in result.stderr.splitlines():
        m = _FAILED_RE.match(line.strip())
        if m:
            return m.group(1).split(" [IP:")[0].strip()
    lines = [line.removeprefix("E: ").strip() for line in result.stderr.splitlines() if line.startswith("E:")]
    return lines[0] if lines else f"apt-get update failed (exit {result.returncode})"


def resolve(suite: str, mirror: str, security_mirror: str, mode: str, cache_dir: Path,
            log: Log = print, keyring: Path = KEYRING) -> ArchiveState:
    """The archives to build from. ``mode`` "require" turns a missing extra archive into a BuildError;
    "include" leaves it out, loudly."""
    if mode not in MODES:
        raise BuildError(f"security_updates {mode!r} is not one of {', '.join(MODES)}")
    base = fetch_release(Archive(mirror, suite), keyring)
    if mode == "off":
        return ArchiveState(base, (), "off")
    extras: list[Release] = []
    problems: list[str] = []
    cache_dir.mkdir(parents=True, exist_ok=True)
    for archive in extra_archives(suite, mirror, security_mirror):
        try:
            release = fetch_release(archive, keyring)
        except BuildError as e:
            problems.append(f"{archive.suite}: {e}")
            continue
        with tempfile.TemporaryDirectory(prefix=".apt-probe-", dir=cache_dir) as work:
            problem = index_problem(archive, Path(work), keyring)
        if problem:
            problems.append(f"{archive.suite}: {problem}")
        else:
            extras.append(release)
    if not problems:
        return ArchiveState(base, tuple(extras), INCLUDED)
    reason = "; ".join(problems)
    if mode == "require":
        raise BuildError(f"security updates required but unavailable: {reason} "
                         "(retry later, or drop --require-security-updates)")
    state = ArchiveState(base, tuple(extras), f"unavailable: {reason}")
    for line in warning(state):
        log(line)
    return state


def warning(state: ArchiveState) -> list[str]:
    """The loud lines a build prints (at the start and again at the end) when fixes are missing."""
    if state.security_updates in (INCLUDED, "off"):
        return []
    return [
        "!" * 78,
        f"!! WARNING: this image is built WITHOUT Debian's security updates ({state.base.archive.suite} "
        f"{state.base.version} only)",
        f"!! {state.security_updates}",
        "!! Rebuild later to get them (the cached rootfs follows the archives' state);",
        "!! --require-security-updates makes this an error.",
        "!" * 78,
    ]
