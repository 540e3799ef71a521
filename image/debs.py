"""Fetch single armhf/all .debs from the Debian mirror with the host's apt, for files we need at
build time but not on the device (Debian's Mk I U-Boot, the qemu board's U-Boot, the kernel's
device tree sources).

apt runs with a private state directory under the cache, so the host's own apt setup is untouched,
and it checks the mirror's signatures with the host's Debian archive keyring as usual.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from clef_armory.errors import BuildError, PrerequisiteError

KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
Log = Callable[[str], None]


def _apt_options(root: Path) -> list[str]:
    return [
        "-o", f"Dir={root}",
        "-o", f"Dir::State::status={root}/status",
        "-o", "Dir::Etc::trusted=/dev/null",
        "-o", f"Dir::Etc::TrustedParts={root}/trusted.gpg.d",
        "-o", "APT::Architecture=armhf",
        "-o", "APT::Architectures=armhf",
        "-o", "Acquire::Languages=none",
        "-o", "Debug::NoLocking=true",
    ]


def _prepare(root: Path, mirror: str, suite: str) -> None:
    for sub in ("etc/apt/preferences.d", "etc/apt/sources.list.d", "trusted.gpg.d",
                "var/lib/apt/lists/partial", "var/cache/apt/archives/partial"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "status").touch()
    (root / "etc/apt/sources.list").write_text(f"deb [signed-by={KEYRING}] {mirror} {suite} main\n")


def fetch(package: str, *, mirror: str, suite: str, cache_dir: Path, log: Log = print) -> tuple[Path, str]:
    """Download `package` (armhf or all) into the cache; returns (path of the .deb, its version)."""
    if not KEYRING.is_file():
        raise PrerequisiteError(f"{KEYRING} is missing; run: sudo apt-get install debian-archive-keyring")
    root = cache_dir / "apt-host" / f"{suite}-armhf"
    debs = cache_dir / "debs" / suite
    debs.mkdir(parents=True, exist_ok=True)
    cached = sorted(debs.glob(f"{package}_*.deb"))
    if cached:
        return cached[-1], cached[-1].name.split("_")[1]
    _prepare(root, mirror, suite)
    options = _apt_options(root)
    log(f"  apt: fetching {package} from {mirror} {suite}")
    update = subprocess.run(["apt-get", *options, "-qq", "update"], capture_output=True, text=True,
                            check=False)
    if update.returncode != 0:
        raise BuildError(f"apt-get update for {suite} failed: {update.stderr.strip().splitlines()[-1:]}")
    download = subprocess.run(["apt-get", *options, "-qq", "download", package], cwd=debs,
                              capture_output=True, text=True, check=False)
    if download.returncode != 0:
        raise BuildError(f"cannot download {package}: {download.stderr.strip().splitlines()[-1:]}")
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        raise BuildError(f"apt downloaded no {package} .deb")
    return found[-1], found[-1].name.split("_")[1]


def extract(deb: Path, members: list[str], dest: Path) -> None:
    """Extract `members` (paths inside the package, wildcards allowed) from `deb` into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    dpkg = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    tar = subprocess.run(["tar", "-x", "-C", str(dest), "--wildcards", *[f"./{m}" for m in members]],
                         stdin=dpkg.stdout, capture_output=True, text=True, check=False)
    dpkg.wait()
    if dpkg.returncode != 0 or tar.returncode != 0:
        raise BuildError(f"cannot extract {', '.join(members)} from {deb.name}: {tar.stderr.strip()}")


def cached_member(package: str, member: str, *, mirror: str, suite: str, cache_dir: Path,
                  log: Log = print) -> tuple[Path, str]:
    """One file out of `package`, extracted once into the cache; returns (its path, package version).

    The file appears under its final name only when completely extracted, so an interrupted run
    leaves nothing in the cache that a later one would take for whole.
    """
    deb, version = fetch(package, mirror=mirror, suite=suite, cache_dir=cache_dir, log=log)
    dest = cache_dir / "deb-files" / suite / f"{package}_{version}"
    target = dest / member
    if target.is_file():
        return target, version
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{package}-", dir=dest.parent))
    try:
        extract(deb, [member], tmp)
        if not (tmp / member).is_file():
            raise BuildError(f"{deb.name} has no file {member}")
        target.parent.mkdir(parents=True, exist_ok=True)
        (tmp / member).replace(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target, version
