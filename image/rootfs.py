"""The device's root filesystem: one armhf tarball from mmdebstrap, cached by a hash of its inputs.

The rootfs is the same for every board (the union of what the boards need), so mk1, mk2 and qemu
builds share one cached tarball and only the cheap steps (overlay, disk assembly) differ. What makes
the armhf build take minutes instead of half an hour (see docs/image.md):

- the initramfs is built once, at the end, with an explicit module list (``MODULES=list``): under
  qemu-user ``MODULES=most`` runs ``modinfo`` over thousands of modules, and it would run twice;
- dpkg skips docs, man pages, locales and the kernel's drivers no board has;
- downloaded .debs are kept in the cache and fed back in, so a rebuild downloads nothing.

Files the rootfs step needs from ``overlay/`` (the initramfs settings) are part of the cache key;
every other overlay file is applied later, so changing it reuses the cached tarball. So is the state
of the Debian archives it is built from (``image/archive.py``: the suite, ``-updates`` and
``-security`` and the digests of their package indices), so new fixes give a new rootfs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from clef_armory.errors import BuildError, PrerequisiteError
from image.archive import ARCH, ArchiveState
from image.overlay import OVERLAY_DIR

# Bump when the way the rootfs is made changes in a way the key below does not see.
RECIPE_VERSION = "4"

# The union of what every board needs. No compilers, no docs.
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    "kmod",
    "iproute2",
    "openssh-server",
    "sudo",
    "python3",
    "nftables",
    "initramfs-tools",
    "zstd",
    "linux-image-armmp",
    "rng-tools5",
)

# Kernel modules the initramfs loads by name: the root file system's. The storage drivers of every
# board are copied in by the hook below and loaded by udev only where their hardware is.
INITRAMFS_MODULES = (
    "ext4",
    "crc32c_generic",
)
INITRAMFS_HOOK = OVERLAY_DIR / "etc" / "initramfs-tools" / "hooks" / "armory-drivers"

# dpkg never unpacks these (saves time under qemu-user and space on the device).
DPKG_EXCLUDES = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/lintian/*",
    "path-exclude=/usr/share/bug/*",
    # Device trees of boards we do not build for (only the USB armory ones stay).
    "path-exclude=/usr/lib/linux-image-*/*",
    "path-include=/usr/lib/linux-image-*/*imx53-usbarmory*",
    # Drivers for hardware no USB armory or qemu -M virt has.
    "path-exclude=/usr/lib/modules/*/kernel/drivers/gpu/*",
    "path-exclude=/usr/lib/modules/*/kernel/drivers/media/*",
    "path-exclude=/usr/lib/modules/*/kernel/drivers/net/wireless/*",
    "path-exclude=/usr/lib/modules/*/kernel/drivers/infiniband/*",
    "path-exclude=/usr/lib/modules/*/kernel/drivers/staging/*",
    "path-exclude=/usr/lib/modules/*/kernel/drivers/iio/*",
    "path-exclude=/usr/lib/modules/*/kernel/drivers/input/touchscreen/*",
    "path-exclude=/usr/lib/modules/*/kernel/sound/*",
    "path-exclude=/usr/lib/modules/*/kernel/net/bluetooth/*",
    "path-exclude=/usr/lib/modules/*/kernel/net/wireless/*",
    "path-exclude=/usr/lib/modules/*/kernel/net/mac80211/*",
)

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class RootfsSpec:
    """Everything the rootfs depends on; its hash names the cached tarball."""

    archives: ArchiveState  # image.archive.resolve: the suite and whichever of -updates/-security are whole
    packages: tuple[str, ...] = PACKAGES
    initramfs_modules: tuple[str, ...] = INITRAMFS_MODULES
    dpkg_excludes: tuple[str, ...] = DPKG_EXCLUDES
    initramfs_hook: Path = INITRAMFS_HOOK

    @property
    def suite(self) -> str:
        return self.archives.base.archive.suite

    def sources(self) -> list[str]:
        return self.archives.sources()

    def key(self) -> str:
        data = {"recipe": RECIPE_VERSION, "packages": self.packages,
                "initramfs_modules": self.initramfs_modules, "dpkg_excludes": self.dpkg_excludes,
                "initramfs_hook": hashlib.sha256(self.initramfs_hook.read_bytes()).hexdigest(),
                "archives": self.archives.key_data()}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Rootfs:
    """A built rootfs tarball and what the manifest records about it."""

    tarball: Path
    key: str
    source_date_epoch: int
    packages: dict[str, str]  # name -> version, every installed package
    kernel_version: str  # e.g. 6.12.117-armmp (the /usr/lib/modules directory name)
    cached: bool
    debian_version: str = ""  # the point release, /etc/debian_version (e.g. 13.8)


def check_binfmt() -> None:
    """armhf binaries must run here (qemu-user through binfmt_misc) before mmdebstrap can work."""
    if shutil.which("mmdebstrap") is None:
        raise PrerequisiteError("mmdebstrap is not installed; run: sudo apt-get install mmdebstrap")
    if shutil.which("arch-test") is None:
        raise PrerequisiteError("arch-test is not installed; run: sudo apt-get install arch-test")
    result = subprocess.run(["arch-test", ARCH], capture_output=True, text=True, check=False)
    if result.returncode != 0 or "ok" not in result.stdout:
        raise PrerequisiteError(
            "armhf binaries cannot run on this machine (binfmt_misc); fix: sudo apt-get install "
            "qemu-user-static binfmt-support && sudo update-binfmts --enable qemu-arm"
        )


def _setup_hook_script(spec: RootfsSpec) -> str:
    """Files that must exist before the first package is unpacked (initramfs settings, dpkg excludes)."""
    modules = "\n".join(spec.initramfs_modules) + "\n"
    excludes = "\n".join(spec.dpkg_excludes) + "\n"
    return "\n".join(
        [
            "set -e",
            'mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/etc/dpkg/dpkg.cfg.d"',
            f'printf %s {shlex.quote(excludes)} > "$1/etc/dpkg/dpkg.cfg.d/01-armory-excludes"',
            'printf "MODULES=list\\nCOMPRESS=zstd\\n" > "$1/etc/initramfs-tools/conf.d/armory.conf"',
            f'printf %s {shlex.quote(modules)} > "$1/etc/initramfs-tools/modules"',
            'mkdir -p "$1/etc/initramfs-tools/hooks"',
            f'install -m 0755 {shlex.quote(str(spec.initramfs_hook))} "$1/etc/initramfs-tools/hooks/"',
            # Neither the kernel's postinst nor the trigger builds an initramfs; we build one at the end.
            'printf "update_initramfs=no\\nbackup_initramfs=no\\n" '
            '> "$1/etc/initramfs-tools/update-initramfs.conf"',
        ]
    )


_CUSTOMIZE_SCRIPT = "\n".join(
    [
        "set -e",
        'printf "update_initramfs=yes\\nbackup_initramfs=no\\n" '
        '> "$1/etc/initramfs-tools/update-initramfs.conf"',
        'chroot "$1" update-initramfs -c -k all',
        # Host keys are made per image at build time, never shared through the cache.
        'rm -f "$1"/etc/ssh/ssh_host_*',
        'rm -f "$1/etc/resolv.conf" "$1/etc/hostname"',
        'chroot "$1" dpkg-query -W -f="\\${Package}\\t\\${Version}\\n" > "$1/.armory-packages"',
    ]
)


def build(
    spec: RootfsSpec,
    cache_dir: Path,
    log: Log = print,
    refresh: bool = False,
) -> Rootfs:
    """Return the cached rootfs for `spec`, building it with mmdebstrap if there is none."""
    key = spec.key()
    rootfs_dir = cache_dir / "rootfs"
    tarball = rootfs_dir / f"{key}.tar"
    meta_path = rootfs_dir / f"{key}.json"
    if not refresh and tarball.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        return Rootfs(
            tarball=tarball,
            key=key,
            source_date_epoch=int(meta["source_date_epoch"]),
            packages=dict(meta["packages"]),
            kernel_version=str(meta["kernel_version"]),
            cached=True,
            debian_version=str(meta.get("debian_version", "")),
        )
    check_binfmt()
    epoch = spec.archives.source_date_epoch()
    apt_cache = cache_dir / "apt" / f"{spec.suite}-{ARCH}"
    apt_cache.mkdir(parents=True, exist_ok=True)
    rootfs_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f".{key}-", dir=rootfs_dir) as tmp:
        tmp_tar = Path(tmp) / "rootfs.tar"
        packages_out = Path(tmp) / "packages.tsv"
        cmd = mmdebstrap_command(spec, tmp_tar, apt_cache, packages_out)
        log(f"  mmdebstrap: {len(spec.packages)} packages for {spec.suite}/{ARCH} (several minutes)")
        # INITRD=No stops the kernel's postinst hook from building an initramfs (update_initramfs=no
        # only stops the trigger); the customize hook builds the one initramfs at the end.
        env = dict(os.environ, SOURCE_DATE_EPOCH=str(epoch), LC_ALL="C.UTF-8", INITRD="No")
        result = subprocess.run(cmd, env=env, check=False)
        if result.returncode != 0 and not _complete(tmp_tar, packages_out):
            raise BuildError(f"mmdebstrap failed (exit {result.returncode}); see its output above")
        if result.returncode != 0:
            # Seen under load: the tarball is written ("I: done") but removing the temporary
            # directory fails because /proc inside it could not be unmounted yet.
            log("  mmdebstrap could not clean up its temporary directory; the tarball is complete")
        packages = dict(
            line.split("\t", 1) for line in packages_out.read_text().splitlines() if "\t" in line
        )
        kernel_version = _kernel_version(tmp_tar)
        debian_version = _debian_version(tmp_tar)
        elapsed = time.monotonic() - started
        meta = {
            "sources": spec.sources(),
            "archives": spec.archives.record(),
            "security_updates": spec.archives.security_updates,
            "packages_requested": list(spec.packages),
            "source_date_epoch": epoch,
            "packages": packages,
            "kernel_version": kernel_version,
            "debian_version": debian_version,
            "built_seconds": round(elapsed, 1),
        }
        tmp_tar.replace(tarball)
        tmp_meta = meta_path.with_suffix(".json.tmp")
        tmp_meta.write_text(json.dumps(meta, indent=1, sort_keys=True))
        tmp_meta.replace(meta_path)
    return Rootfs(tarball, key, epoch, packages, kernel_version, cached=False,
                  debian_version=debian_version)


def mmdebstrap_command(
    spec: RootfsSpec,
    output: Path,
    apt_cache: Path,
    packages_out: Path,
    *,
    keep_debs: bool = True,
    tuned: bool = True,
) -> list[str]:
    """The mmdebstrap command line. ``tuned=False`` gives the bare baseline the benchmark compares to."""
    cmd = [
        "mmdebstrap",
        "--mode=root",
        "--variant=minbase",
        f"--architectures={ARCH}",
        "--format=tar",
        "--aptopt=APT::Install-Recommends false",
        "--aptopt=Acquire::Languages none",
        f"--include={','.join(spec.packages)}",
    ]
    if tuned:
        cmd += [
            "--dpkgopt=force-unsafe-io",
            "--dpkgopt=force-confdef",
            "--dpkgopt=force-confold",
            f"--setup-hook={_setup_hook_script(spec)}",
            f"--customize-hook={_CUSTOMIZE_SCRIPT}",
            f'--customize-hook=mv "$1/.armory-packages" {shlex.quote(str(packages_out))}',
        ]
    if keep_debs:
        cache = shlex.quote(str(apt_cache))
        cmd += [
            "--skip=essential/unlink",
            "--skip=download/empty",
            f'--setup-hook=mkdir -p "$1/var/cache/apt/archives/partial" && '
            f'find {cache} -maxdepth 1 -name "*.deb" -exec cp -t "$1/var/cache/apt/archives/" {{}} +',
            f'--customize-hook=find "$1/var/cache/apt/archives" -maxdepth 1 -name "*.deb" '
            f"-exec cp -n -t {cache} {{}} +",
        ]
    cmd += [spec.suite, str(output), *spec.sources()]
    return cmd


def unpack(tarball: Path, tree: Path) -> None:
    """Unpack the cached rootfs into `tree` (owners, modes and xattrs as built)."""
    tree.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["tar", "-x", "-p", "--numeric-owner", "--xattrs", "--xattrs-include=*",
                             "-f", str(tarball), "-C", str(tree)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
        raise BuildError(f"cannot unpack the cached rootfs {tarball.name}: {last} "
                         "(run build-image --refresh-rootfs)")


def _complete(tarball: Path, packages_out: Path) -> bool:
    """The customize hooks ran (package list written) and the tarball reads to its end."""
    if not (tarball.is_file() and packages_out.is_file() and packages_out.stat().st_size > 0):
        return False
    check = subprocess.run(["tar", "-tf", str(tarball)], capture_output=True, check=False)
    return check.returncode == 0


def _kernel_version(tarball: Path) -> str:
    """The kernel release the rootfs carries (name of its modules directory)."""
    listing = subprocess.run(
        ["tar", "-tf", str(tarball), "--wildcards", "./usr/lib/modules/*/modules.dep"],
        capture_output=True,
        text=True,
        check=False,
    )
    versions = sorted({p.split("/")[4] for p in listing.stdout.split() if p.count("/") >= 5})
    if len(versions) != 1:
        raise BuildError(f"expected one kernel in the rootfs, found {versions or 'none'}")
    return versions[0]


def _debian_version(tarball: Path) -> str:
    """The Debian point release the rootfs carries (base-files' /etc/debian_version, e.g. 13.8)."""
    result = subprocess.run(["tar", "-xOf", str(tarball), "./etc/debian_version"], capture_output=True,
                            text=True, check=False)
    if result.returncode != 0 or not result.stdout.strip():
        raise BuildError("the rootfs has no /etc/debian_version")
    return result.stdout.strip()
