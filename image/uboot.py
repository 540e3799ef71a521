"""U-Boot for the USB armory Mk II, built here from pinned sources.

Neither Debian nor mainline U-Boot has a Mk II target: the vendor's build applies one board patch to an
upstream release. We do the same, with every input pinned:

- U-Boot 2025.01 from the Debian mirror's pool (Debian ships upstream's tarball byte for byte as
  ``u-boot_2025.01.orig.tar.bz2``): its sha256 is always checked, and upstream's OpenPGP signature is
  checked against the release key in ``clef_armory/keys`` when gpg is installed;
- the board patch from usbarmory/usbarmory at a pinned commit, sha256 always checked; downloaded at
  build time, or given as ``--uboot-patch FILE`` on machines that cannot reach GitHub;
- Debian's ``arm-linux-gnueabihf`` cross compiler.

The vendor's three build switches (boot medium, memory, SoC) are a ``Variant``. The result,
``u-boot-dtb.imx``, is cached under ``<cache>/u-boot/<key>/``, the key hashing both source digests,
the switches, the compiler and our recipe; a build that fails for any reason caches nothing.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clef_armory import config, openpgp
from clef_armory.clef import sha256_file
from clef_armory.errors import BuildError, PrerequisiteError

KEYS_DIR = Path(__file__).resolve().parent.parent / "clef_armory" / "keys"
RECIPE = 1  # bump when the build steps below change what they produce
JOBS = 2
CROSS_COMPILE = "arm-linux-gnueabihf-"
CROSS_PACKAGE = "gcc-arm-linux-gnueabihf"
# Per socket operation. Where GitHub is unreachable the name lookup fails at once; this bounds a hang.
DOWNLOAD_TIMEOUT = 20.0
IVT_TAG = 0xD1  # first byte of an i.MX image: the Image Vector Table header the boot ROM looks for
# Host programs and headers U-Boot's build needs besides the cross compiler (-> Debian package).
HOST_TOOLS = (("make", "make"), ("bison", "bison"), ("flex", "flex"), ("bc", "bc"),
              ("patch", "patch"), ("bzip2", "bzip2"), ("pkg-config", "pkg-config"))
HOST_HEADERS = (("openssl/evp.h", "libssl-dev"), ("gnutls/gnutls.h", "libgnutls28-dev"),
                ("uuid/uuid.h", "uuid-dev"))
# make's short tags -> the phase a person sees (one line each, the first time it appears).
PHASES = {"HOSTCC": "host tools", "HOSTLD": "host tools", "YACC": "host tools", "LEX": "host tools",
          "CC": "compiling", "AS": "compiling", "AR": "compiling", "LD": "linking",
          "OBJCOPY": "linking", "DTC": "device trees", "MKIMAGE": "i.MX image (mkimage)"}
BOOT_MEDIUM_SYMBOLS = {"uSD": "SYS_BOOT_DEV_MICROSD", "eMMC": "SYS_BOOT_DEV_EMMC"}
MEMORY_SYMBOLS = {"512M": "SYS_DDR_512MB", "1G": "SYS_DDR_1GB"}
_FDTFILE = re.compile(r'"fdtfile=[^"\\]+\\0"')

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Sources:
    """The pinned inputs: where each comes from and the digest it must have."""

    version: str
    pool_dir: str  # directory of the tarball under a Debian mirror
    tarball: str
    tarball_sha256: str
    signature_sha256: str  # of the detached ``<tarball>.asc`` beside it
    signing_key: str  # file name in clef_armory/keys
    signing_fingerprint: str  # primary key
    source_dir: str  # top directory inside the tarball
    release_epoch: int  # SOURCE_DATE_EPOCH of the build (the release signature's date)
    patch_url: str
    patch_sha256: str
    defconfig: str
    env_header: str  # the board header that defines the default environment (fdtfile)
    output: str

    @property
    def patch_name(self) -> str:
        return self.patch_url.rsplit("/", 1)[-1]

    def tarball_url(self, mirror: str) -> str:
        return f"{mirror.rstrip('/')}/{self.pool_dir}/{self.tarball}"


MK2 = Sources(
    version="2025.01",
    pool_dir="pool/main/u/u-boot",
    tarball="u-boot_2025.01.orig.tar.bz2",
    tarball_sha256="cdef7d507c93f1bbd9f015ea9bc21fa074268481405501945abc6f854d5b686f",
    signature_sha256="8a25ad74cd740a6e89a212bd8d7412d2e65882fecf8bc56ed806da999bb26c4a",
    signing_key="u-boot-trini.asc",
    signing_fingerprint="1A3C7F70E08FAB1707809BBF147C39FF9634B72C",
    source_dir="u-boot-2025.01",
    release_epoch=1736211329,  # 2025-01-07 00:55:29 UTC
    patch_url="https://raw.githubusercontent.com/usbarmory/usbarmory/"
              "e15bacbc42f86b1f3c01d63fdaddf56b05fd6a67/software/u-boot/"
              "0001-ARM-mx6-add-support-for-USB-armory-Mk-II-board.patch",
    patch_sha256="e9839f60f59a73bce9ca638b02fa7351b71f263e7f2cb37af1eb8933fb3eacfa",
    defconfig="usbarmory-mark-two_defconfig",
    env_header="include/configs/usbarmory-mark-two.h",
    output="u-boot-dtb.imx",
)


@dataclasses.dataclass(frozen=True)
class Variant:
    """The vendor build's three switches: where U-Boot boots from, how much DDR, which SoC."""

    boot_medium: str = "uSD"
    memory: str = "512M"
    soc: str = "imx6ulz"

    def __post_init__(self) -> None:
        config.check_choice("boot_medium", self.boot_medium, config.BOOT_MEDIA)
        config.check_choice("memory", self.memory, config.MEMORY_SIZES)
        config.check_choice("soc", self.soc, config.SOCS)

    @classmethod
    def from_settings(cls, settings: config.Settings) -> Variant:
        return cls(settings.boot_medium, settings.memory, settings.soc)

    def kconfig(self) -> dict[str, bool]:
        """Kconfig choice symbols -> enabled, for both choices the switches select in."""
        medium = {sym: name == self.boot_medium for name, sym in BOOT_MEDIUM_SYMBOLS.items()}
        return {**medium, **{sym: name == self.memory for name, sym in MEMORY_SYMBOLS.items()}}

    @property
    def fdtfile(self) -> str:
        """The dtb U-Boot's own fallback boot loads (ours names its fdt in extlinux.conf)."""
        return f"{self.soc}-usbarmory.dtb"

    def as_dict(self) -> dict[str, str]:
        return {"boot_medium": self.boot_medium, "memory": self.memory, "soc": self.soc}

    def describe(self) -> str:
        return f"{self.boot_medium}, {self.memory}, {self.soc}"


@dataclasses.dataclass(frozen=True)
class Inputs:
    """Verified local copies of the sources."""

    tarball: Path
    signature: str  # how the signature was checked, for the manifest
    patch: Path


@dataclasses.dataclass(frozen=True)
class Plan:
    """What ``build`` will do: return the cached file (``inputs`` is None) or build from ``inputs``."""

    sources: Sources
    variant: Variant
    compiler: str
    key: str
    dest: Path  # <cache>/u-boot/<key>
    offset: int  # where the board writes it...
    limit: int  # ...and the first byte it must not reach
    inputs: Inputs | None


@dataclasses.dataclass(frozen=True)
class Built:
    """The bootloader file and what the manifest records about it."""

    path: Path
    cached: bool
    record: dict[str, Any]


class _DownloadFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- prerequisites ---------------------------------------------------------------------------------


def cross_compiler() -> str:
    """The cross compiler's version line (part of the cache key); one line naming the package if absent."""
    gcc = shutil.which(CROSS_COMPILE + "gcc")
    if gcc is None:
        raise PrerequisiteError(
            f"{CROSS_COMPILE}gcc is not installed (needed to build the Mk II U-Boot): "
            f"apt-get install {CROSS_PACKAGE}, or pass --bootloader FILE"
        )
    out = subprocess.run([gcc, "--version"], capture_output=True, text=True, check=False)
    first = (out.stdout.splitlines() or [""])[0].strip()
    if out.returncode != 0 or not first:
        raise PrerequisiteError(f"{gcc} --version failed; reinstall {CROSS_PACKAGE}")
    return first


def check_host_tools() -> None:
    """Everything else U-Boot's build runs or includes, named by Debian package."""
    missing = [pkg for tool, pkg in HOST_TOOLS if shutil.which(tool) is None]
    missing += [pkg for header, pkg in HOST_HEADERS if not (Path("/usr/include") / header).is_file()]
    if missing:
        raise PrerequisiteError(
            f"building the Mk II U-Boot needs: apt-get install {' '.join(missing)} "
            "(or pass --bootloader FILE)"
        )


# --- sources ---------------------------------------------------------------------------------------


def _download(url: str, dest: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as resp, dest.open("wb") as out:  # noqa: S310
            shutil.copyfileobj(resp, out)
    except urllib.error.HTTPError as e:
        raise _DownloadFailed(f"HTTP {e.code}") from None
    except urllib.error.URLError as e:
        reason = e.reason
        raise _DownloadFailed(getattr(reason, "strerror", None) or str(reason)) from None
    except (OSError, TimeoutError) as e:
        raise _DownloadFailed(getattr(e, "strerror", None) or str(e) or type(e).__name__) from None


def _install(src: Path, dest: Path, *, move: bool) -> None:
    """Put a verified file at ``dest`` atomically (never a half-written file under its final name)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    if move:
        src.replace(tmp)
    else:
        shutil.copyfile(src, tmp)
    tmp.replace(dest)


def fetch_pinned(url: str, sha256: str, dest: Path, what: str) -> Path:
    """``dest`` if it already has the digest, else download ``url`` there; a mismatch keeps nothing.

    Raises ``_DownloadFailed`` when the download itself fails (callers say what to do instead).
    """
    if dest.is_file() and sha256_file(dest) == sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f".{dest.name}.part-{os.getpid()}")
    try:
        _download(url, part)
        got = sha256_file(part)
        if got != sha256:
            raise BuildError(
                f"{what} from {url} does not match its pinned sha256 (got {got[:16]}…, "
                f"expected {sha256[:16]}…); not used"
            )
        _install(part, dest, move=True)
    finally:
        part.unlink(missing_ok=True)
    return dest


def verify_signature(tarball: Path, signature: Path, key: Path, fingerprint: str) -> str:
    """Check upstream's detached signature with gpg in a throwaway home holding only the pinned key.

    The U-Boot release key expired in 2024, before it signed 2025.01, so gpg reports EXPKEYSIG rather
    than GOODSIG: exactly that, a good signature by an expired pinned key, is accepted as well (the
    tarball's digest is pinned anyway). Anything else (bad, revoked, expired signature, other key) is not.
    Returns what was checked, for the manifest.
    """
    if shutil.which("gpg") is None:
        return "not checked: gpg is not installed (the sha256 is pinned)"
    want = openpgp.normalize(fingerprint)
    verdict = openpgp.verify_detached(tarball, signature, key)
    if not verdict.imported:
        raise BuildError(f"cannot import the pinned U-Boot signing key {key}")
    kinds = verdict.keywords
    refused = kinds & {"BADSIG", "ERRSIG", "REVKEYSIG", "EXPSIG", "NO_PUBKEY"}
    good = kinds & {"GOODSIG", "EXPKEYSIG"}
    if refused or not good or verdict.primary_key != want or not verdict.signed_by(want):
        why = ", ".join(sorted(refused)) or "no valid signature by it"
        raise BuildError(
            f"the signature on {tarball.name} does not verify against the pinned U-Boot release key "
            f"{want} ({why}); not used"
        )
    return f"verified: {want}" + (" (key expired, signature made before)" if "EXPKEYSIG" in kinds else "")


def fetch_tarball(sources: Sources, mirror: str, cache_dir: Path, log: Log = print) -> tuple[Path, str]:
    """The release tarball (cached by name, digest checked every time) and how its signature checked."""
    where = cache_dir / "u-boot" / "sources"
    url = sources.tarball_url(mirror)
    if not (where / sources.tarball).is_file():
        log(f"    downloading {sources.tarball} (33 MB) from {mirror}")
    try:
        tarball = fetch_pinned(url, sources.tarball_sha256, where / sources.tarball, "U-Boot's source")
        signature = fetch_pinned(url + ".asc", sources.signature_sha256, where / (sources.tarball + ".asc"),
                                 "U-Boot's source signature")
    except _DownloadFailed as e:
        raise BuildError(
            f"cannot download U-Boot's source {url} ({e.reason}): check --mirror, or pass --bootloader FILE"
        ) from None
    return tarball, verify_signature(tarball, signature, KEYS_DIR / sources.signing_key,
                                     sources.signing_fingerprint)


def fetch_patch(sources: Sources, cache_dir: Path, given: Path | None = None) -> Path:
    """The board patch: ``given`` (a local copy) or the cached/downloaded one, its digest checked."""
    dest = cache_dir / "u-boot" / "sources" / sources.patch_name
    if given is not None:
        path = given.expanduser()
        if not path.is_file():
            raise BuildError(f"--uboot-patch {path} does not exist")
        got = sha256_file(path)
        if got != sources.patch_sha256:
            raise BuildError(
                f"--uboot-patch {path} is not the pinned {sources.patch_name} (sha256 {got[:16]}…, "
                f"expected {sources.patch_sha256[:16]}…); not used"
            )
        if not (dest.is_file() and sha256_file(dest) == got):
            _install(path, dest, move=False)
        return dest
    try:
        return fetch_pinned(sources.patch_url, sources.patch_sha256, dest, "the Mk II U-Boot patch")
    except _DownloadFailed as e:
        host = sources.patch_url.split("/")[2]
        raise BuildError(
            f"cannot download the Mk II U-Boot patch from {host} ({e.reason}): pass --uboot-patch FILE "
            f"(a copy of {sources.patch_url}) or --bootloader FILE"
        ) from None


# --- planning, configuring, building ----------------------------------------------------------------


def cache_key(sources: Sources, variant: Variant, compiler: str) -> str:
    data = {"recipe": RECIPE, "tarball": sources.tarball_sha256, "patch": sources.patch_sha256,
            "defconfig": sources.defconfig, "switches": variant.as_dict(), "compiler": compiler}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def check_output(path: Path, offset: int, limit: int) -> int:
    """An i.MX image (IVT header first) that ends before ``limit`` when written at ``offset``."""
    with path.open("rb") as f:
        head = f.read(4)
    size = path.stat().st_size
    if len(head) < 4 or head[0] != IVT_TAG or int.from_bytes(head[1:3], "big") != 0x20:
        raise BuildError(f"{path.name} is not an i.MX image (no IVT header at its start); nothing was cached")
    if offset + size > limit:
        raise BuildError(
            f"the built {path.name} is {size} bytes: written at byte {offset} it would reach byte {limit} "
            f"(the board's U-Boot environment); nothing was cached"
        )
    return size


def prepare(
    sources: Sources,
    variant: Variant,
    *,
    cache_dir: Path,
    mirror: str,
    offset: int,
    limit: int,
    patch_file: Path | None = None,
    log: Log = print,
) -> Plan:
    """Everything that can fail fast: tools, and (unless cached) the verified sources. No compiling."""
    compiler = cross_compiler()
    key = cache_key(sources, variant, compiler)
    dest = cache_dir / "u-boot" / key
    inputs: Inputs | None = None
    if _cached(dest, sources.output):
        check_output(dest / sources.output, offset, limit)
        log(f"    U-Boot {sources.version} ({variant.describe()}): built before, cached as {key}")
    else:
        check_host_tools()
        patch = fetch_patch(sources, cache_dir, patch_file)  # first: it is the one that may be unreachable
        tarball, signature = fetch_tarball(sources, mirror, cache_dir, log)
        inputs = Inputs(tarball=tarball, signature=signature, patch=patch)
        log(f"    U-Boot {sources.version} sources: tarball and patch sha256 as pinned, "
            f"signature {signature}")
    return Plan(sources, variant, compiler, key, dest, offset, limit, inputs)


def _cached(dest: Path, output: str) -> bool:
    """A cache entry counts only when its file still has the digest recorded when it was built."""
    try:
        record = json.loads((dest / "build.json").read_text())
        return isinstance(record, dict) and record.get("sha256") == sha256_file(dest / output)
    except (OSError, ValueError):
        return False


def _run(argv: list[str], cwd: Path, what: str, env: dict[str, str] | None = None) -> str:
    res = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        text = (res.stderr.strip() or res.stdout.strip()).splitlines()
        line = next((ln for ln in text if re.search(r"error|fail|reject|can't|No such", ln, re.I)),
                    text[-1] if text else "no output")
        raise BuildError(f"{what} failed: {line.strip()[:200]}")
    return res.stdout


def _make_env(sources: Sources) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    env.update({"ARCH": "arm", "CROSS_COMPILE": CROSS_COMPILE, "LC_ALL": "C",
                "SOURCE_DATE_EPOCH": str(sources.release_epoch)})
    return env


def unpack(sources: Sources, inputs: Inputs, work: Path, log: Log = print) -> Path:
    """Extract the release into ``work`` and apply the board patch; returns the source tree."""
    log(f"    extracting {sources.tarball}")
    _run(["tar", "-x", "-j", "-f", str(inputs.tarball), "-C", str(work)], work,
         f"extracting {sources.tarball}")
    tree = work / sources.source_dir
    if not tree.is_dir():
        raise BuildError(f"{sources.tarball} has no {sources.source_dir}/ directory")
    log(f"    applying {sources.patch_name}")
    _run(["patch", "-p1", "--batch", "--forward", "--silent", "-i", str(inputs.patch)], tree,
         f"applying {sources.patch_name} to U-Boot {sources.version} (the patch does not apply)")
    return tree


def select(sources: Sources, tree: Path, variant: Variant, log: Log = print) -> Path:
    """The variant's switches written into the board's defconfig, then ``make <defconfig>``, as the
    vendor's build does; returns the checked ``.config``.

    Boot medium and memory are Kconfig choices of the patch's board Kconfig. They must be in the
    defconfig, not set afterwards: symbols that default from them (the environment's MMC device, the
    DDR setup file) are fixed once ``make <defconfig>`` has written them. The SoC only changes
    ``fdtfile`` in the board header's default environment.
    """
    log(f"    configuring {sources.defconfig} ({variant.describe()})")
    defconfig = tree / "configs" / sources.defconfig
    wanted = {f"CONFIG_{sym}": (f"CONFIG_{sym}=y" if on else f"# CONFIG_{sym} is not set")
              for sym, on in variant.kconfig().items()}
    lines = [ln for ln in defconfig.read_text().splitlines()
             if _symbol_of(ln) not in wanted]
    defconfig.write_text("\n".join([*lines, *wanted.values()]) + "\n")
    _run(["make", sources.defconfig], tree, f"make {sources.defconfig}", _make_env(sources))
    dotconfig = tree / ".config"
    have = set(dotconfig.read_text().splitlines())
    for want in wanted.values():
        if want not in have:
            raise BuildError(f"U-Boot's configuration did not take {want!r}: the patch has changed")
    header = tree / sources.env_header
    text, count = _FDTFILE.subn(lambda _: f'"fdtfile={variant.fdtfile}\\0"', header.read_text())
    if count != 1:
        raise BuildError(f"{sources.env_header} does not define fdtfile once: the patch has changed")
    header.write_text(text)
    return dotconfig


def _symbol_of(line: str) -> str | None:
    """"CONFIG_X" of a ``CONFIG_X=...`` or ``# CONFIG_X is not set`` line."""
    if line.startswith("CONFIG_"):
        return line.split("=", 1)[0]
    if line.startswith("# CONFIG_") and line.endswith(" is not set"):
        return line[2:-len(" is not set")]
    return None


def _make(sources: Sources, tree: Path, log: Log) -> None:
    """``make -j2``, one line per phase as it starts; the error line if it fails."""
    started = time.monotonic()
    seen: set[str] = set()
    tail: collections.deque[str] = collections.deque(maxlen=400)
    with subprocess.Popen(["make", f"-j{JOBS}"], cwd=tree, env=_make_env(sources), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, errors="replace") as proc:
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                tail.append(line.rstrip())
                tag = line.split(maxsplit=1)[0] if line.strip() else ""
                phase = PHASES.get(tag)
                if phase and phase not in seen:
                    seen.add(phase)
                    log(f"    [{time.monotonic() - started:4.0f} s] {phase}")
            proc.wait()
        except BaseException:
            proc.kill()
            raise
    if proc.returncode != 0:
        errors = [ln for ln in tail if re.search(r"\berror\b|Error \d", ln, re.I)]
        first = (errors or list(tail)[-1:] or ["no output"])[0]
        raise BuildError(f"building U-Boot {sources.version} failed: {first.strip()[:200]}")


def build(plan: Plan, log: Log = print) -> Built:
    """The cached file, or build it (in a temporary directory, moved into the cache only when it is good)."""
    output = plan.sources.output
    if plan.inputs is None:
        record = json.loads((plan.dest / "build.json").read_text())
        log(f"    reused cached U-Boot {plan.key} ({plan.variant.describe()})")
        return Built(plan.dest / output, True, record)
    root = plan.dest.parent
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        tree = unpack(plan.sources, plan.inputs, work, log)
        select(plan.sources, tree, plan.variant, log)
        _make(plan.sources, tree, log)
        built = tree / output
        if not built.is_file():
            raise BuildError(f"U-Boot's build finished without {output}")
        size = check_output(built, plan.offset, plan.limit)
        staged = work / "result"
        staged.mkdir()
        shutil.copyfile(built, staged / output)
        record = {
            "u_boot": plan.sources.version,
            "tarball": {"name": plan.sources.tarball, "sha256": plan.sources.tarball_sha256,
                        "signature": plan.inputs.signature},
            "patch": {"url": plan.sources.patch_url, "sha256": plan.sources.patch_sha256},
            "defconfig": plan.sources.defconfig,
            "switches": plan.variant.as_dict(),
            "cross_compiler": plan.compiler,
            "cache_key": plan.key,
            "output": output,
            "size": size,
            "sha256": sha256_file(staged / output),
        }
        (staged / "build.json").write_text(json.dumps(record, indent=2) + "\n")
        if plan.dest.exists():  # a concurrent build of the same key finished first: same inputs
            shutil.rmtree(plan.dest)
        staged.rename(plan.dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"    built U-Boot {plan.sources.version} ({plan.variant.describe()}): {size} bytes "
        f"in {time.monotonic() - started:.0f} s")
    return Built(plan.dest / output, False, record)


def bootloader(
    sources: Sources,
    variant: Variant,
    *,
    cache_dir: Path,
    mirror: str,
    offset: int,
    limit: int,
    patch_file: Path | None = None,
    log: Log = print,
) -> Built:
    """The Mk II U-Boot for ``variant``: cached, or checked and built now."""
    return build(prepare(sources, variant, cache_dir=cache_dir, mirror=mirror, offset=offset, limit=limit,
                         patch_file=patch_file, log=log), log)


def default_environment(binary: bytes) -> dict[str, str]:
    """The ``name=value`` entries of a U-Boot binary's built-in default environment (NUL-separated
    strings; the first definition of a name wins). For checking what a board's U-Boot does at boot
    (e.g. that distro boot scans the bootable partition first) without running it."""
    env: dict[str, str] = {}
    for chunk in binary.split(b"\0"):
        m = _ENV_ENTRY.search(chunk)
        if m:
            env.setdefault(m.group(1).decode(), m.group(2).decode())
    return env


_ENV_ENTRY = re.compile(rb"(?:^|[^\x20-\x7e])([a-z][a-z0-9_]*)=([\x20-\x7e]*)$")
