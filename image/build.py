"""`invoke build-image`: rootfs (cached) -> device tree -> overlay -> disk -> outputs.

Each step says what it does and how long it took. Inputs are checked before any slow work, and the
outputs are assembled in a hidden ``.BOARD.partial-*`` directory that replaces ``build/BOARD/`` only
when everything is written, so a failed or interrupted build leaves nothing that looks complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from clef_armory import clef as clef_mod
from clef_armory.config import Settings
from clef_armory.errors import ArmoryError, BuildError
from image import archive, boards, debs, devicetree, disk, manifest, overlay, rootfs, sshkey, uboot
from image.boards import Board

REPO_ROOT = Path(__file__).resolve().parent.parent
AGENT_SRC = REPO_ROOT / "armory_agent"
AGENT_DEST = "usr/lib/python3/dist-packages/armory_agent"
Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class BuildResult:
    """Where the outputs went and what the build measured."""

    out_dir: Path
    image: Path
    manifest: dict[str, Any]
    timings: tuple[tuple[str, float], ...]


class Steps:
    """Prints each step as it starts and how long it took; keeps the timings for the bench."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.timings: list[tuple[str, float]] = []
        self.started = time.monotonic()

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        self.log(f"[{len(self.timings) + 1}] {what} ...")
        t0 = time.monotonic()
        yield
        took = time.monotonic() - t0
        self.timings.append((what, took))
        self.log(f"    done in {took:.1f} s")

    def total(self) -> float:
        return time.monotonic() - self.started


def image_name(board: Board, suite: str) -> str:
    return f"clef-armory-{board.name}-{suite}"


def _check_output_dir(root: Path) -> None:
    """The output directory must be creatable and writable, before anything slow happens."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-"):
            pass
    except OSError as e:
        raise BuildError(f"cannot write to output directory {root}: {e.strerror}") from None


@dataclasses.dataclass(frozen=True)
class _Loader:
    """The bootloader to write and where it came from (for the manifest): a file now, or a plan to
    build one (the Mk II U-Boot) in its own step."""

    origin: dict[str, Any]
    path: Path | None = None
    plan: uboot.Plan | None = None


def _resolve_bootloader(board: Board, given: Path | None, settings: Settings, log: Log) -> _Loader:
    """--bootloader FILE, else the board's Debian package, else its U-Boot from pinned sources (checked
    here, built later)."""
    spec = board.bootloader
    if spec is None:
        if given is not None:
            raise BuildError(f"board {board.name} boots without a bootloader on the disk; drop --bootloader")
        return _Loader(origin={})
    if given is not None:
        path = given.expanduser()
        if not path.is_file():
            raise BuildError(f"bootloader {path} does not exist")
        disk.check_bootloader(path, spec.offset, spec.limit)
        return _Loader(origin={"source": "file", "file": str(path)}, path=path)
    if spec.deb_package and spec.deb_path:
        target, version = debs.cached_member(spec.deb_package, spec.deb_path, mirror=settings.mirror,
                                             suite=settings.suite, cache_dir=settings.cache_path, log=log)
        disk.check_bootloader(target, spec.offset, spec.limit)
        return _Loader(origin={"source": "debian", "package": spec.deb_package, "version": version,
                               "path": spec.deb_path}, path=target)
    if spec.uboot is not None:
        plan = uboot.prepare(spec.uboot, uboot.Variant.from_settings(settings), cache_dir=settings.cache_path,
                             mirror=settings.mirror, offset=spec.offset, limit=spec.limit,
                             patch_file=settings.uboot_patch, log=log)
        return _Loader(origin={"source": "u-boot from pinned sources"}, plan=plan)
    raise BuildError(f"board {board.name} has no bootloader source: pass --bootloader FILE")


def _resolve_firmware(board: Board, settings: Settings, log: Log) -> tuple[Path, str] | None:
    """An emulated board's firmware (qemu's U-Boot) from the suite's Debian package: (file, version)."""
    spec = board.firmware
    if spec is None:
        return None
    return debs.cached_member(spec.deb_package, spec.deb_path, mirror=settings.mirror,
                              suite=settings.suite, cache_dir=settings.cache_path, log=log)


def _chroot(tree: Path, *args: str, epoch: int) -> str:
    """Run a command inside the armhf tree (through qemu-user binfmt)."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "SOURCE_DATE_EPOCH": str(epoch)}
    result = subprocess.run(["chroot", str(tree), *args], capture_output=True, text=True, env=env,
                            check=False)
    if result.returncode != 0:
        raise BuildError(f"{' '.join(args)} in the image failed: {result.stderr.strip()}")
    return result.stdout


def _ids(tree: Path, db: str) -> dict[str, int]:
    ids: dict[str, int] = {}
    for line in (tree / "etc" / db).read_text().splitlines():
        parts = line.split(":")
        if len(parts) > 2:
            ids[parts[0]] = int(parts[2])
    return ids


def _create_users(tree: Path, cfg: overlay.DeviceConfig, epoch: int) -> None:
    """The service user (no shell, no password, owns the state) and the admin (SSH key only, sudo)."""
    if cfg.service_user not in _ids(tree, "passwd"):
        _chroot(tree, "useradd", "--system", "--user-group", "--home-dir", "/var/lib/clef-armory",
                "--no-create-home", "--shell", "/usr/sbin/nologin", "--comment", "Clef and agent",
                cfg.service_user, epoch=epoch)
    if cfg.admin_user not in _ids(tree, "passwd"):
        # "*" = no password can ever match, but the account is not locked (sshd with PAM would refuse
        # public-key logins to a locked one).
        _chroot(tree, "useradd", "--create-home", "--user-group", "--shell", "/bin/bash",
                "--password", "*", "--comment", "clef-armory admin", cfg.admin_user, epoch=epoch)
    _chroot(tree, "usermod", "--password", "*", "root", epoch=epoch)


# Units the appliance does not need at boot, masked on every board (docs/image.md, "Boot"). Each costs seconds
# to minutes on the first boot under emulation and some on a Cortex-A7:
BOOT_TRIM = (
    # first-boot "update" jobs (ConditionNeedsUpdate): the build already ran ldconfig, the journal catalog
    # and the hwdb update in the tree (package postinsts), and nothing changes /usr on the device later.
    "ldconfig.service", "systemd-journal-catalog-update.service", "systemd-hwdb-update.service",
    "systemd-update-done.service",
    # foreign-binary formats: the device runs only its own armhf programs.
    "systemd-binfmt.service", "proc-sys-fs-binfmt_misc.automount", "proc-sys-fs-binfmt_misc.mount",
    # kernel debugging/tracing filesystems, FUSE, POSIX queues, pstore: nothing on the device uses them
    # (and debugfs is attack surface).
    "sys-kernel-debug.mount", "sys-kernel-tracing.mount", "sys-fs-fuse-connections.mount", "dev-mqueue.mount",
    "modprobe@drm.service", "modprobe@fuse.service", "modprobe@efi_pstore.service", "systemd-pstore.service",
    # housekeeping timers for a networked machine (apt, dpkg database backup, fstrim of a card).
    "apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer", "fstrim.timer",
    # on the way to sshd (systemd-analyze critical-chain in the guest): static /dev nodes for modules the
    # appliance never loads (fuse, loop, tun, ...), network config from the kernel command line, udev
    # rules from credentials, networkd's persistent-storage helper, a separate /run/lock tmpfs.
    "kmod-static-nodes.service", "systemd-network-generator.service", "systemd-udev-load-credentials.service",
    "systemd-networkd-persistent-storage.service", "run-lock.mount",
)


def _enable_units(tree: Path, board: Board, epoch: int) -> None:
    enable = ["systemd-networkd.service", "nftables.service", "ssh.service",
              "clef-armory-agent.service"]
    # sshd-keygen would add RSA/ECDSA host keys nobody pinned; the image has its ed25519 key.
    mask = ["systemd-networkd-wait-online.service", "swap.target", "sshd-keygen.service"]
    if board.gadget:
        enable.append("armory-usb-gadget.service")
    if board.hw_rng:
        enable.append("rngd.service")
    else:
        mask.append("rngd.service")
    _chroot(tree, "systemctl", "enable", "--quiet", *enable, epoch=epoch)
    for wants in (tree / "etc" / "systemd" / "system").glob("*.wants"):
        for unit in mask:
            # lexists: the links point at absolute paths inside the image (dangling from here).
            if os.path.lexists(wants / unit):
                (wants / unit).unlink()
    _chroot(tree, "systemctl", "mask", "--quiet", *mask, *BOOT_TRIM, epoch=epoch)
    # Debian's default is graphical.target; the appliance has no display.
    _chroot(tree, "systemctl", "set-default", "--quiet", "multi-user.target", epoch=epoch)
    # systemd's ssh generator would add sshd listeners on AF_VSOCK and a local AF_UNIX socket:
    # sshd listens on the USB link only.
    generators = tree / "etc" / "systemd" / "system-generators"
    generators.mkdir(parents=True, exist_ok=True)
    masked = generators / "systemd-ssh-generator"
    masked.unlink(missing_ok=True)
    masked.symlink_to("/dev/null")


def _clamp_mtimes(tree: Path, epoch: int) -> None:
    """No file is newer than SOURCE_DATE_EPOCH (what we just wrote would otherwise carry today)."""
    for root, dirs, files in os.walk(tree):
        for name in [*dirs, *files]:
            path = os.path.join(root, name)
            st = os.lstat(path)
            if st.st_mtime > epoch:
                os.utime(path, (epoch, epoch), follow_symlinks=False)
    os.utime(tree, (epoch, epoch))


def _agent_version() -> str:
    for line in (AGENT_SRC / "__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    raise BuildError("armory_agent/__init__.py has no __version__")


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def build_image(
    settings: Settings,
    *,
    bootloader: Path | None = None,
    usb_function: str = "ecm",
    host_keys_from: Path | None = None,
    overlay_dir: Path = overlay.OVERLAY_DIR,
    refresh_rootfs: bool = False,
    log: Log = print,
) -> BuildResult:
    """Build the image for settings.board into <output_dir>/<board>/; see docs/image.md.

    ``host_keys_from`` reuses the SSH host keys of an earlier build (only for reproducibility
    checks: every real image gets its own); ``overlay_dir`` exists for the benchmark.
    """
    steps = Steps(log)
    board = boards.BOARDS[settings.board]
    out_root = settings.output_dir.expanduser()
    cache = settings.cache_path

    with steps.step(f"checking inputs for {board.name} ({board.description})"):
        _check_output_dir(out_root)
        rootfs.check_binfmt()
        # Go (or a cached Clef, or --clef release/path:) now, not after minutes of mmdebstrap.
        clef_plan = clef_mod.preflight(settings.clef_source, version=settings.clef_version,
                                       arch="armv7", cache_dir=cache)
        log(f"    Clef: {clef_plan}")
        loader = _resolve_bootloader(board, bootloader, settings, log)
        firmware = _resolve_firmware(board, settings, log)
        cache.mkdir(parents=True, exist_ok=True)
        archives = archive.resolve(settings.suite, settings.mirror, settings.security_mirror,
                                   settings.security_updates, cache, log=log)
        # Last: it may make a key pair and ask for its passphrase.
        authorized_key = sshkey.authorized_key(settings.ssh_key, log=log)
        overlay.DeviceConfig(board=board, suite=settings.suite, kernel_version="", root="",
                             authorized_key=authorized_key,
                             network=overlay.Network(usb_function=usb_function))

    bootloader_file, bootloader_origin = loader.path, loader.origin
    if loader.plan is not None:
        plan = loader.plan
        with steps.step(f"U-Boot {plan.sources.version} for {board.name} ({plan.variant.describe()}; "
                        "cached, or built: 1-2 minutes)"):
            built = uboot.build(plan, log)
            bootloader_file, bootloader_origin = built.path, {**bootloader_origin, **built.record}

    spec = rootfs.RootfsSpec(archives=archives)
    with steps.step(f"root filesystem {spec.key()} (cached, or mmdebstrap: several minutes)"):
        fs = rootfs.build(spec, cache, log=log, refresh=refresh_rootfs)
        log(f"    {'reused cached' if fs.cached else 'built'} rootfs: kernel {fs.kernel_version}, "
            f"{len(fs.packages)} packages")

    with steps.step(f"Clef {settings.clef_version} for ARMv7 ({settings.clef_source})"):
        clef = clef_mod.acquire(settings.clef_source, version=settings.clef_version, arch="armv7",
                                cache_dir=cache, log=log)

    name = image_name(board, settings.suite)
    stage = Path(tempfile.mkdtemp(prefix=f".{board.name}.partial-", dir=out_root))
    work = Path(tempfile.mkdtemp(prefix="tree-", dir=cache))
    tree = work / "tree"
    try:
        with steps.step("unpacking the rootfs"):
            rootfs.unpack(fs.tarball, tree)

        disk_id, _, _ = disk.disk_identity(f"{board.name}:{settings.suite}:{fs.key}")
        root = f"PARTUUID={disk.partuuid(disk_id)}" if board.root_device == "partuuid" else board.root_device
        device_tree = board.device_tree.for_soc(settings.soc) if board.device_tree else None
        dtb_path = f"/boot/dtbs/{device_tree.dtb_name}" if device_tree else None
        cfg = overlay.DeviceConfig(
            board=board, suite=settings.suite, kernel_version=fs.kernel_version, root=root,
            authorized_key=authorized_key, chain_id=settings.chain_id, clef_version=clef.version,
            network=overlay.Network(usb_function=usb_function), dtb_path=dtb_path,
            system=manifest.system_record(fs, archives, _agent_version()),
        )

        dtb_info: dict[str, Any] | None = None
        if device_tree is not None:
            with steps.step(f"device tree {device_tree.dtb_name}"):
                dest = tree / "boot" / "dtbs" / device_tree.dtb_name
                dtb_info = devicetree.install(device_tree, tree, dest, settings, log=log)

        with steps.step("overlay: users, host keys, rendered files, agent, Clef, services"):
            _create_users(tree, cfg, fs.source_date_epoch)
            uids, gids = _ids(tree, "passwd"), _ids(tree, "group")
            ssh_dir = tree / "etc" / "ssh"
            if host_keys_from is not None:
                for key in host_keys_from.glob("ssh_host_*"):
                    shutil.copy2(key, ssh_dir / key.name)
                public = {k: (ssh_dir / f"ssh_host_{k}_key.pub").read_text().strip()
                          for k in manifest.HOST_KEY_TYPES}
            else:
                public = manifest.generate_host_keys(ssh_dir, f"root@{cfg.hostname}")
            for kind in manifest.HOST_KEY_TYPES:
                os.chmod(ssh_dir / f"ssh_host_{kind}_key", 0o600)
                os.chmod(ssh_dir / f"ssh_host_{kind}_key.pub", 0o644)
            rendered = overlay.render_all(cfg, overlay_dir)
            installed = overlay.install(tree, rendered, uids, gids)
            overlay.copy_tree(AGENT_SRC, tree / AGENT_DEST)
            # Bytecode made here: the agent's unit cannot write __pycache__ (ProtectSystem=strict), so
            # without it every start (and every device_admin call over SSH) compiles the agent again.
            # checked-hash: valid whatever the files' mtimes (clamped below), deterministic.
            _chroot(tree, "python3", "-m", "compileall", "-q", "--invalidation-mode", "checked-hash",
                    f"/{AGENT_DEST}", epoch=fs.source_date_epoch)
            clef_dest = tree / "usr" / "local" / "bin" / "clef"
            shutil.copyfile(clef.path, clef_dest)
            os.chown(clef_dest, 0, 0)
            os.chmod(clef_dest, 0o755)  # noqa: S103 - an executable for every user
            state = tree / "var" / "lib" / "clef-armory"
            state.mkdir(parents=True, exist_ok=True)
            os.chown(state, uids[cfg.service_user], gids[cfg.service_user])
            os.chmod(state, 0o700)
            _enable_units(tree, board, fs.source_date_epoch)
            _clamp_mtimes(tree, fs.source_date_epoch)
            log(f"    {len(installed)} overlay files, agent {_agent_version()}, Clef {clef.version}")

        image = stage / f"{name}.img"
        with steps.step(f"disk image {name}.img ({settings.image_size}, ext4 from 5 MiB)"):
            spec_bl = board.bootloader
            disk.assemble(
                image, tree, settings.image_size_bytes, seed=f"{board.name}:{settings.suite}:{fs.key}",
                epoch=fs.source_date_epoch, bootloader=bootloader_file,
                bootloader_offset=spec_bl.offset if spec_bl else 0,
                bootloader_limit=spec_bl.limit if spec_bl else boards.PARTITION_START,
            )

        extra: list[str] = []
        firmware_record: dict[str, Any] | None = None
        if board.firmware is not None and firmware is not None:
            # The emulated board's U-Boot: next to the image, not in it (it is the machine's ROM).
            fw_path, fw_version = firmware
            shutil.copyfile(fw_path, stage / board.firmware.file_name)
            extra.append(board.firmware.file_name)
            firmware_record = {"file": board.firmware.file_name, "package": board.firmware.deb_package,
                               "version": fw_version, "path": board.firmware.deb_path,
                               "sha256": manifest.sha256_file(fw_path)}

        with steps.step("block map (bmap)"):
            from image import bmap as bmap_mod

            block_map = bmap_mod.create(image, stage / f"{name}.img.bmap")
            mapped = sum(r.last - r.first + 1 for r in block_map.ranges)

        with steps.step("compressing (zstd)"):
            compressed = stage / f"{name}.img.zst"
            result = subprocess.run(["zstd", "-q", "-T0", "-6", "-f", "-o", str(compressed), str(image)],
                                    capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise BuildError(f"zstd failed: {result.stderr.strip()}")

        with steps.step("manifest, known_hosts, SHA256SUMS"):
            image_sha256 = manifest.sha256_file(image)
            (stage / "known_hosts").write_text(manifest.known_hosts(cfg.network.device_address, public))
            data: dict[str, Any] = {
                "name": name,
                "board": board.name,
                "suite": settings.suite,
                "mirror": settings.mirror,
                "source_date_epoch": fs.source_date_epoch,
                "rootfs_key": fs.key,
                "kernel_version": fs.kernel_version,
                "packages": fs.packages,
                **manifest.archive_fields(fs, archives),
                "clef": clef.manifest(),
                "agent": {"version": _agent_version(), "sha256": _tree_digest(AGENT_SRC)},
                "host_keys": {k: {"public": v, "fingerprint": manifest.fingerprint(v)}
                              for k, v in public.items()},
                "config_digest": cfg.digest(),
                "config": json.loads(json.dumps(cfg.as_dict(), default=str)),
                "disk": {
                    "size": settings.image_size_bytes,
                    "partition_start": boards.PARTITION_START,
                    "partuuid": disk.partuuid(disk_id),
                    "root": root,
                    "bootloader": None if bootloader_file is None else {
                        **bootloader_origin,
                        "offset": board.bootloader.offset if board.bootloader else 0,
                        "size": bootloader_file.stat().st_size,
                        "sha256": manifest.sha256_file(bootloader_file),
                    },
                    "bmap_mapped_blocks": mapped,
                    "bmap_block_size": block_map.block_size,
                },
                "device_tree": dtb_info,
                "kernel_cmdline": board.cmdline(root),
                "firmware": firmware_record,
                "files": {"image": image.name, "bmap": f"{name}.img.bmap",
                          "compressed": compressed.name,
                          "firmware": firmware_record["file"] if firmware_record else None},
                "image_sha256": image_sha256,
            }
            manifest.write_json(stage / "manifest.json", data)
            manifest.write_sums(stage, [image.name, f"{name}.img.bmap", compressed.name,
                                        "manifest.json", "known_hosts", *extra],
                                known={image.name: image_sha256})

        final = out_root / board.name
        old = out_root / f".{board.name}.old-{os.getpid()}"
        if final.exists():
            final.rename(old)
        stage.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = steps.total()
    compressed_size = (final / compressed.name).stat().st_size
    log(f"built {final / image.name} in {total:.0f} s "
        f"({compressed_size >> 20} MiB compressed, {mapped} mapped blocks)")
    return BuildResult(final, final / image.name, data, tuple(steps.timings))


__all__ = ["ArmoryError", "BuildResult", "build_image"]
