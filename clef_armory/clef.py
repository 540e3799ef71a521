"""Getting a Clef binary we can trust, for the laptop (tests) or the device (ARMv7).

Three sources, one function (`acquire`):

- ``source``: ``go install github.com/ethereum/go-ethereum/cmd/clef@vX.Y.Z`` with reproducible flags; Go
  verifies every module against go.sum and the checksum database. Cached by version, GOARCH, GOARM and Go
  version.
- ``release``: the official ``geth-alltools`` tarball and its detached OpenPGP signature, verified against the
  pinned Linux Builder key shipped in ``clef_armory/keys``. Any mismatch is fatal and nothing is cached.
- ``path:FILE``: a binary the user already has, checked to be an ELF for the wanted architecture and to run.

Clef left go-ethereum after v1.17.3, so the version is a setting (``clef_version`` in invoke.yaml) and
``RELEASE_COMMITS`` records the commit prefix the release file names carry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from clef_armory import openpgp
from clef_armory.errors import ClefError, PrerequisiteError, VerificationError

MODULE = "github.com/ethereum/go-ethereum/cmd/clef"
RELEASE_BASE_URL = "https://gethstore.blob.core.windows.net/builds/"
KEYS_DIR = Path(__file__).resolve().parent / "keys"
LINUX_BUILDER_KEY = KEYS_DIR / "geth-linux-builder.asc"
LINUX_BUILDER_FINGERPRINT = "FDE5A1A044FA13D2F7ADA019A61A13569BA28146"
# First 8 hex digits of the tagged commit, as used in the release file names.
RELEASE_COMMITS = {"1.17.3": "117e067f"}
MIN_GO = (1, 21)  # first Go that can fetch the newer toolchain go-ethereum's go.mod asks for

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Arch:
    """A target architecture: how Go names it, how releases name it, how ELF headers name it."""

    name: str
    goarch: str
    goarm: str | None
    release: str
    elf_class: int  # 1 = 32-bit, 2 = 64-bit
    elf_machine: int


ARCHS = {
    "amd64": Arch("amd64", "amd64", None, "amd64", 2, 62),
    "arm64": Arch("arm64", "arm64", None, "arm64", 2, 183),
    "armv7": Arch("armv7", "arm", "7", "arm7", 1, 40),
}


@dataclasses.dataclass(frozen=True)
class ClefBinary:
    """A checked Clef binary and what the build manifest records about it."""

    path: Path
    version: str
    source: str
    sha256: str
    arch: str

    def manifest(self) -> dict[str, str]:
        return {"version": self.version, "source": self.source, "sha256": self.sha256, "arch": self.arch}


def host_arch() -> str:
    """The laptop's architecture in our naming (tests run Clef natively)."""
    machine = os.uname().machine
    mapping = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "armv7"}
    if machine not in mapping:
        raise ClefError(f"unsupported host architecture {machine}")
    return mapping[machine]


def acquire(
    spec: str,
    *,
    version: str,
    arch: str,
    cache_dir: Path,
    release_base_url: str = RELEASE_BASE_URL,
    keyring: Path = LINUX_BUILDER_KEY,
    fingerprint: str = LINUX_BUILDER_FINGERPRINT,
    log: Log = print,
) -> ClefBinary:
    """Return a verified Clef for `arch` from `spec` ('source', 'release' or 'path:FILE')."""
    if arch not in ARCHS:
        raise ClefError(f"unknown architecture {arch!r}: choose one of {', '.join(ARCHS)}")
    target = ARCHS[arch]
    if spec == "source":
        return _from_source(version, target, cache_dir, log)
    if spec == "release":
        return _from_release(version, target, cache_dir, release_base_url, keyring, fingerprint, log)
    if spec.startswith("path:"):
        return _from_path(Path(spec[5:]).expanduser(), version, target)
    raise ClefError(f"unknown Clef source {spec!r}: use source, release or path:FILE")


# --- checks shared by every source -------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_elf(path: Path, target: Arch) -> None:
    """Refuse anything that is not an ELF executable for `target`."""
    try:
        with path.open("rb") as f:
            head = f.read(20)
    except OSError as e:
        raise ClefError(f"cannot read {path}: {e.strerror}") from None
    if len(head) < 20 or head[:4] != b"\x7fELF":
        raise VerificationError(f"{path} is not an ELF executable")
    elf_class, data = head[4], head[5]
    endian = "<" if data == 1 else ">"
    (machine,) = struct.unpack(endian + "H", head[18:20])
    if elf_class != target.elf_class or machine != target.elf_machine:
        bits = {1: "32", 2: "64"}.get(elf_class, "?")
        raise VerificationError(
            f"{path} is a {bits}-bit ELF for machine {machine}, not for {target.name}"
        )


def run_version(path: Path, target: Arch) -> str:
    """Run `clef --version` (through qemu-user for ARM via binfmt) and return the version string."""
    argv = [str(path), "--version"]
    if target.name != host_arch() and target.goarch == "arm" and shutil.which("qemu-arm-static"):
        argv = ["qemu-arm-static", *argv]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except OSError as e:
        raise ClefError(f"cannot run {path}: {e.strerror}") from None
    except subprocess.TimeoutExpired:
        raise ClefError(f"{path} --version did not finish within 60 s") from None
    m = re.search(r"Clef version (\S+)", out.stdout + out.stderr)
    if out.returncode != 0 or not m:
        raise ClefError(f"{path} --version failed: {(out.stderr or out.stdout).strip()[:200]}")
    return m.group(1)


def _checked(path: Path, version: str, target: Arch, source: str) -> ClefBinary:
    check_elf(path, target)
    reported = run_version(path, target)
    if reported.split("-")[0] != version:
        raise VerificationError(f"{path} reports Clef {reported}, expected {version}")
    return ClefBinary(path, reported, source, sha256_file(path), target.name)


def install_atomically(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.copyfile(src, tmp)
    tmp.chmod(0o755)
    os.replace(tmp, dest)


# --- source --------------------------------------------------------------------------------------


GO_CANDIDATES = ("/usr/local/go/bin/go", "/usr/lib/go/bin/go")
INSTALL_GO = (
    "run ./do (it installs Go), or sudo apt-get install golang-go (Debian 12: "
    "-t bookworm-backports), or pass --clef release"
)


def _parse_go_version(text: str) -> tuple[int, int] | None:
    m = re.match(r"go(\d+)\.(\d+)", text.strip())
    return (int(m.group(1)), int(m.group(2))) if m else None


def _go_version_of(go: str) -> str | None:
    try:
        out = subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "GOTOOLCHAIN": "local"}, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 and _parse_go_version(out.stdout) else None


def go_binary() -> Path:
    """The first Go >= MIN_GO: on PATH, else where Go's tarball or Debian put it.

    Go >= 1.21 fetches the newer toolchain go-ethereum's go.mod asks for by itself (GOTOOLCHAIN=auto,
    checked against the checksum database), so Debian 12's backports Go 1.23 is enough.
    """
    seen: list[str] = []
    for candidate in (shutil.which("go"), *GO_CANDIDATES):
        if candidate is None or candidate in seen or not Path(candidate).is_file():
            continue
        seen.append(candidate)
        version = _go_version_of(candidate)
        parsed = _parse_go_version(version or "")
        if parsed is not None and parsed >= MIN_GO:
            return Path(candidate)
        if version:
            seen[-1] = f"{candidate} ({version})"
    if seen:
        raise PrerequisiteError(
            f"Go >= 1.21 is needed to build Clef; found only {', '.join(seen)}: {INSTALL_GO}"
        )
    raise PrerequisiteError(f"Go is not installed (Clef is built from source with Go >= 1.21): {INSTALL_GO}")


def go_version(go: Path) -> str:
    version = _go_version_of(str(go))
    parsed = _parse_go_version(version or "")
    if version is None or parsed is None:
        raise PrerequisiteError(f"cannot tell the version of {go}")
    if parsed < MIN_GO:
        raise PrerequisiteError(f"{version} is too old to build Clef (need Go >= 1.21): {INSTALL_GO}")
    return version


def go_env(cache_dir: Path, gopath: Path) -> dict[str, str]:
    """The environment for `go install` of pinned modules: caches under cache_dir, and toolchain
    switching on even where GOTOOLCHAIN=local is set (Debian's go.env sets it): an older Go then
    fetches the toolchain the module's go.mod asks for into the module cache, verified by checksum."""
    env = {
        **os.environ,
        "GOPATH": str(gopath),
        "GOMODCACHE": str(cache_dir / "go" / "mod"),
        "GOCACHE": str(cache_dir / "go" / "build"),
        "GOFLAGS": "-modcacherw",
    }
    if not env.get("GOTOOLCHAIN", "").startswith("go"):  # keep a toolchain the user named
        env["GOTOOLCHAIN"] = "auto"
    env.pop("GOBIN", None)
    return env


def _source_key(version: str, target: Arch) -> str:
    return f"{version}-{target.goarch}{'v' + target.goarm if target.goarm else ''}"


def cached_source_build(version: str, target: Arch, cache_dir: Path) -> Path | None:
    """A Clef built from source earlier (by any Go), for when no Go is available now."""
    found = sorted((cache_dir / "clef").glob(f"{_source_key(version, target)}-go*/clef"),
                   key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def preflight(spec: str, *, version: str, arch: str, cache_dir: Path) -> str:
    """Cheap check that `acquire` can work, before any slow build step; says what it will use."""
    if arch not in ARCHS:
        raise ClefError(f"unknown architecture {arch!r}: choose one of {', '.join(ARCHS)}")
    target = ARCHS[arch]
    if spec == "source":
        try:
            go = go_binary()
        except PrerequisiteError:
            if cached_source_build(version, target, cache_dir) is not None:
                return "cached source build (no Go needed)"
            raise
        return f"built from source with {go} ({go_version(go)})"
    if spec == "release":
        if not shutil.which("gpg"):
            raise PrerequisiteError("gpg is not installed (it checks the Clef release): "
                                    "sudo apt-get install gnupg")
        return "signed release"
    if spec.startswith("path:"):
        path = Path(spec[5:]).expanduser()
        if not path.is_file():
            raise ClefError(f"Clef binary {path} does not exist")
        check_elf(path, target)
        return f"given binary {path}"
    raise ClefError(f"unknown Clef source {spec!r}: use source, release or path:FILE")


def _from_source(version: str, target: Arch, cache_dir: Path, log: Log) -> ClefBinary:
    try:
        go = go_binary()
    except PrerequisiteError:
        earlier = cached_source_build(version, target, cache_dir)
        if earlier is None:
            raise
        log(f"no Go here; using Clef built earlier ({earlier.parent.name})")
        return _checked(earlier, version, target, "source")
    gover = go_version(go)
    key = f"{_source_key(version, target)}-{gover}"
    cached = cache_dir / "clef" / key / "clef"
    if cached.exists():
        return _checked(cached, version, target, "source")
    log(f"building Clef {version} for {target.name} with {gover} (a few minutes the first time)")
    with tempfile.TemporaryDirectory(prefix="clef-build-") as tmp:
        env = {
            **go_env(cache_dir, Path(tmp)),
            "CGO_ENABLED": "0",
            "GOOS": "linux",
            "GOARCH": target.goarch,
        }
        if target.goarm:
            env["GOARM"] = target.goarm
        argv = [
            str(go), "install", "-trimpath", "-buildvcs=false", "-ldflags=-buildid=",
            f"{MODULE}@v{version}",
        ]  # fmt: skip
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            last = proc.stderr.strip().splitlines()[-1:] or ["no output"]
            raise ClefError(f"building Clef {version} for {target.name} failed: {last[0]}")
        built = next(iter(sorted(Path(tmp, "bin").rglob("clef"))), None)
        if built is None:
            raise ClefError("go install finished but produced no clef binary")
        _checked(built, version, target, "source")
        install_atomically(built, cached)
    return _checked(cached, version, target, "source")


# --- release -------------------------------------------------------------------------------------


def release_name(version: str, target: Arch) -> str:
    commit = RELEASE_COMMITS.get(version)
    if commit is None:
        raise ClefError(f"no known release commit for Clef {version}; add it to RELEASE_COMMITS")
    return f"geth-alltools-linux-{target.release}-{version}-{commit}"


def _download(url: str, dest: Path, what: str) -> None:
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, dest.open("wb") as out:  # noqa: S310
            shutil.copyfileobj(resp, out)
    except urllib.error.HTTPError as e:
        raise ClefError(f"cannot download the {what} {url}: HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
        raise ClefError(f"cannot download the {what} {url}: {reason}") from None


def verify_signature(archive: Path, signature: Path, keyring: Path, fingerprint: str) -> None:
    """Check a detached signature with gpg in a throw-away home holding only the pinned key."""
    if not shutil.which("gpg"):
        raise PrerequisiteError("gpg is not installed: apt-get install gnupg")
    want = openpgp.normalize(fingerprint)
    verdict = openpgp.verify_detached(archive, signature, keyring)
    if not verdict.imported:
        raise VerificationError(f"cannot import the pinned signing key {keyring}")
    if verdict.returncode != 0 or verdict.primary_key is None:
        if "NO_PUBKEY" in verdict.keywords:
            raise VerificationError(
                f"{archive.name} is not signed by the pinned key {want} (signed by an unknown key)"
            )
        if "BADSIG" in verdict.keywords:
            raise VerificationError(f"bad signature on {archive.name}: the archive was altered")
        raise VerificationError(f"cannot verify the signature of {archive.name}")
    if not verdict.signed_by(want):
        raise VerificationError(
            f"{archive.name} is signed by {verdict.primary_key}, not by the pinned {want}"
        )


def _extract_clef(archive: Path, name: str, dest: Path) -> None:
    try:
        with tarfile.open(archive, "r:gz") as tar:
            member = next(
                (m for m in tar.getmembers() if m.name in (f"{name}/clef", f"./{name}/clef")), None
            )
            if member is None or not member.isfile():
                raise ClefError(f"{archive.name} has no {name}/clef")
            src = tar.extractfile(member)
            assert src is not None
            with dest.open("wb") as out:
                shutil.copyfileobj(src, out)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise VerificationError(f"{archive.name} is not a readable tar.gz: {e}") from None
    dest.chmod(0o755)


def _from_release(
    version: str,
    target: Arch,
    cache_dir: Path,
    base_url: str,
    keyring: Path,
    fingerprint: str,
    log: Log,
) -> ClefBinary:
    name = release_name(version, target)
    want = fingerprint.replace(" ", "").upper()
    cached = cache_dir / "clef" / f"release-{version}-{target.release}-{want[-16:]}" / "clef"
    if cached.exists():
        return _checked(cached, version, target, "release")
    base = base_url if base_url.endswith("/") else base_url + "/"
    log(f"downloading {name}.tar.gz and its signature")
    with tempfile.TemporaryDirectory(prefix="clef-release-") as tmp:
        archive, signature = Path(tmp, f"{name}.tar.gz"), Path(tmp, f"{name}.tar.gz.asc")
        _download(base + archive.name, archive, "archive")
        _download(base + signature.name, signature, "signature")
        verify_signature(archive, signature, keyring, fingerprint)
        extracted = Path(tmp, "clef")
        _extract_clef(archive, name, extracted)
        binary = _checked(extracted, version, target, "release")
        install_atomically(extracted, cached)
        record = {**binary.manifest(), "archive": archive.name, "archive_sha256": sha256_file(archive)}
        (cached.parent / "release.json").write_text(json.dumps(record, indent=2) + "\n")
    return _checked(cached, version, target, "release")


# --- path ----------------------------------------------------------------------------------------


def _from_path(path: Path, version: str, target: Arch) -> ClefBinary:
    if not path.is_file():
        raise ClefError(f"Clef binary {path} does not exist")
    return _checked(path.resolve(), version, target, "path")
