"""`invoke build-image`: rootfs (cached) -> device tree -> overlay -> disk -> outputs.

The system tree goes into slot A, everything the overlay puts under /var/lib/clef-armory (SSH host
keys, authorized_keys, the agent's empty state directory) into the data partition (image/disk.py).

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
from image import bmap as bmap_mod
from image.boards import Board

REPO_ROOT = Path(__file__).resolve().parent.parent
AGENT_SRC = REPO_ROOT / "armory_agent"
AGENT_DEST = "usr/lib/python3/dist-packages/armory_agent"
# Where the data partition is mounted (overlay/etc/fstab.j2), its SSH and agent subtrees.
DATA_MOUNT = "var/lib/clef-armory"
SSH_STATE = f"{DATA_MOUNT}/ssh"
AGENT_STATE = f"{DATA_MOUNT}/agent"
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
        _chroot(tree, "useradd", "--system", "--user-group", "--home-dir", f"/{AGENT_STATE}",
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
    # ahead of udevd, so ahead of the data partition sshd and the agent wait for (critical chain, 2026-12-05):
    # users are made at build time by the packages' postinsts (and with update-done masked, sysusers'
    # ConditionNeedsUpdate would hold on every boot); / is mounted rw from the command line and has no
    # fstab line to remount; setup-dev makes the same static /dev nodes as its "early" twin.
    "systemd-sysusers.service", "systemd-remount-fs.service", "systemd-tmpfiles-setup-dev-early.service",
)

# systemd runs every generator before it starts anything; these have nothing to do on the appliance.
GENERATOR_TRIM = (
    # would add sshd listeners on AF_VSOCK and a local AF_UNIX socket: sshd listens on the USB link only.
    "systemd-ssh-generator",
    # no GPT (the disk is MBR, A/B by the bootable flag), no swap to resume from, no TPM, no SysV scripts
    # or rc.local, no offline system updates, no units or debug shells from the kernel command line.
    "systemd-gpt-auto-generator", "systemd-hibernate-resume-generator", "systemd-tpm2-generator",
    "systemd-sysv-generator", "systemd-rc-local-generator", "systemd-system-update-generator",
    "systemd-run-generator", "systemd-debug-generator",
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
    generators = tree / "etc" / "systemd" / "system-generators"
    generators.mkdir(parents=True, exist_ok=True)
    for name in GENERATOR_TRIM:
        masked = generators / name
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


@dataclasses.dataclass(frozen=True)
class _Inputs:
    """Everything checked before the slow work starts."""

    board: Board
    authorized_key: str
    loader: _Loader
    firmware: tuple[Path, str] | None
    archives: archive.ArchiveState


def _check_inputs(settings: Settings, bootloader: Path | None, usb_function: str, log: Log) -> _Inputs:
    board = boards.BOARDS[settings.board]
    _check_output_dir(settings.output_dir.expanduser())
    rootfs.check_binfmt()
    # Go (or a cached Clef, or --clef release/path:) now, not after minutes of mmdebstrap.
    clef_plan = clef_mod.preflight(settings.clef_source, version=settings.clef_version,
                                   arch="armv7", cache_dir=settings.cache_path)
    log(f"    Clef: {clef_plan}")
    loader = _resolve_bootloader(board, bootloader, settings, log)
    firmware = _resolve_firmware(board, settings, log)
    settings.cache_path.mkdir(parents=True, exist_ok=True)
    archives = archive.resolve(settings.suite, settings.mirror, settings.security_mirror,
                               settings.security_updates, settings.cache_path, log=log)
    # Last: it may make a key pair and ask for its passphrase.
    authorized_key = sshkey.authorized_key(settings.ssh_key, log=log)
    overlay.DeviceConfig(board=board, suite=settings.suite, kernel_version="", root="",
                         authorized_key=authorized_key, network=overlay.Network(usb_function=usb_function))
    return _Inputs(board, authorized_key, loader, firmware, archives)


def _host_keys(ssh_dir: Path, host_keys_from: Path | None, hostname: str) -> dict[str, str]:
    """The device's SSH host keys in ``ssh_dir`` (new ones, or copies for reproducibility checks)."""
    ssh_dir.mkdir(parents=True, exist_ok=True)
    if host_keys_from is not None:
        for key in host_keys_from.glob("ssh_host_*"):
            shutil.copy2(key, ssh_dir / key.name)
        public = {k: (ssh_dir / f"ssh_host_{k}_key.pub").read_text().strip() for k in manifest.HOST_KEY_TYPES}
    else:
        public = manifest.generate_host_keys(ssh_dir, f"root@{hostname}")
    for kind in manifest.HOST_KEY_TYPES:
        os.chmod(ssh_dir / f"ssh_host_{kind}_key", 0o600)
        os.chmod(ssh_dir / f"ssh_host_{kind}_key.pub", 0o644)
    return public


def _populate(tree: Path, cfg: overlay.DeviceConfig, clef_path: Path, epoch: int,
              host_keys_from: Path | None, overlay_dir: Path, log: Log) -> dict[str, str]:
    """Users, host keys, rendered overlay, agent, Clef and services into the tree; returns the
    public host keys."""
    _create_users(tree, cfg, epoch)
    uids, gids = _ids(tree, "passwd"), _ids(tree, "group")
    public = _host_keys(tree / SSH_STATE, host_keys_from, cfg.hostname)
    installed = overlay.install(tree, overlay.render_all(cfg, overlay_dir), uids, gids)
    overlay.copy_tree(AGENT_SRC, tree / AGENT_DEST)
    # Bytecode made here: the agent's unit cannot write __pycache__ (ProtectSystem=strict), so
    # without it every start (and every device_admin call over SSH) compiles the agent again.
    # checked-hash: valid whatever the files' mtimes (clamped below), deterministic.
    _chroot(tree, "python3", "-m", "compileall", "-q", "--invalidation-mode", "checked-hash",
            f"/{AGENT_DEST}", epoch=epoch)
    clef_dest = tree / "usr" / "local" / "bin" / "clef"
    shutil.copyfile(clef_path, clef_dest)
    os.chown(clef_dest, 0, 0)
    os.chmod(clef_dest, 0o755)  # noqa: S103 - an executable for every user
    # The data partition's root and its ssh/ subtree are root's; the agent's subtree is the service user's.
    for sub, owner, mode in ((DATA_MOUNT, 0, 0o755), (SSH_STATE, 0, 0o755),
                             (AGENT_STATE, uids[cfg.service_user], 0o700)):
        (tree / sub).mkdir(parents=True, exist_ok=True)
        os.chown(tree / sub, owner, gids[cfg.service_user] if owner else 0)
        os.chmod(tree / sub, mode)
    _enable_units(tree, cfg.board, epoch)
    log(f"    {len(installed)} overlay files, agent {_agent_version()}, Clef {cfg.clef_version}")
    return public


def _split_data(tree: Path, data: Path, epoch: int) -> None:
    """Move what the tree holds under the data partition's mount point into ``data`` (the data
    partition's own tree), leaving the mount point empty in the system."""
    mount = tree / DATA_MOUNT
    data.mkdir()
    st = mount.stat()
    os.chown(data, st.st_uid, st.st_gid)
    os.chmod(data, st.st_mode & 0o7777)
    for child in mount.iterdir():
        child.rename(data / child.name)
    _clamp_mtimes(tree, epoch)
    _clamp_mtimes(data, epoch)


def _firmware_output(board: Board, firmware: tuple[Path, str] | None, stage: Path) -> dict[str, Any] | None:
    """The emulated board's U-Boot: next to the image, not in it (it is the machine's ROM)."""
    if board.firmware is None or firmware is None:
        return None
    fw_path, fw_version = firmware
    shutil.copyfile(fw_path, stage / board.firmware.file_name)
    return {"file": board.firmware.file_name, "package": board.firmware.deb_package,
            "version": fw_version, "path": board.firmware.deb_path, "sha256": manifest.sha256_file(fw_path)}


def _compress(image: Path, compressed: Path) -> None:
    try:
        result = subprocess.run(["zstd", "-q", "-T0", "-6", "-f", "-o", str(compressed), str(image)],
                                capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise BuildError("zstd is not installed: run sudo apt-get install -y zstd") from None
    if result.returncode != 0:
        raise BuildError(f"zstd failed: {result.stderr.strip()}")


@dataclasses.dataclass(frozen=True)
class _Disk:
    """What the disk step made, for the manifest."""

    disk_id: int
    layout: disk.Layout
    bootloader: Path | None
    bootloader_origin: dict[str, Any]
    public_keys: dict[str, str]
    cfg: overlay.DeviceConfig
    dtb_info: dict[str, Any] | None


def _system_record(image: Path, layout: disk.Layout, block_map: bmap_mod.Bmap) -> dict[str, Any]:
    """Slot A's filesystem as ./do update streams it: its mapped ranges (relative to the slot) and
    the sha256 of their bytes in order, which the device checks after writing them."""
    slot = layout.slots[0]
    ranges = bmap_mod.ranges_within(block_map, slot.start, slot.end)
    return {"offset": slot.start, "size": slot.size, "label": disk.SYSTEM_LABELS[0],
            "mapped_bytes": sum(length for _, length in ranges),
            "sha256": bmap_mod.ranges_digest(image, slot.start, ranges)}


def _manifest(settings: Settings, board: Board, name: str, fs: rootfs.Rootfs, clef: clef_mod.ClefBinary,
              made: _Disk, image: Path, block_map: bmap_mod.Bmap, firmware: dict[str, Any] | None,
              compressed: Path, archives: archive.ArchiveState) -> dict[str, Any]:
    root = made.cfg.root
    mapped = sum(r.last - r.first + 1 for r in block_map.ranges)
    spec_bl = board.bootloader
    return {
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
        "agent": {"version": _agent_version(), "sha256": _tree_digest(AGENT_SRC),
                  "contract": contract_version()},
        "host_keys": {k: {"public": v, "fingerprint": manifest.fingerprint(v)}
                      for k, v in made.public_keys.items()},
        "config_digest": made.cfg.digest(),
        "config": json.loads(json.dumps(made.cfg.as_dict(), default=str)),
        "disk": {
            "size": settings.image_size_bytes,
            "partition_start": boards.PARTITION_START,
            "slot_size": made.layout.slot_size,
            "data": {"offset": made.layout.data.start, "size": made.layout.data.size,
                     "label": disk.DATA_LABEL},
            "partuuid": disk.partuuid(made.disk_id),
            "root": root,
            "bootloader": None if made.bootloader is None else {
                **made.bootloader_origin,
                "offset": spec_bl.offset if spec_bl else 0,
                "size": made.bootloader.stat().st_size,
                "sha256": manifest.sha256_file(made.bootloader),
            },
            "bmap_mapped_blocks": mapped,
            "bmap_block_size": block_map.block_size,
        },
        "system": _system_record(image, made.layout, block_map),
        "device_tree": made.dtb_info,
        "kernel_cmdline": board.cmdline(root),
        "firmware": firmware,
        "files": {"image": image.name, "bmap": f"{name}.img.bmap", "compressed": compressed.name,
                  "firmware": firmware["file"] if firmware else None},
        "image_sha256": manifest.sha256_file(image),
    }


def _publish(stage: Path, out_root: Path, board: Board) -> Path:
    """Replace <out_root>/<board>/ with the finished stage in one rename."""
    final = out_root / board.name
    old = out_root / f".{board.name}.old-{os.getpid()}"
    if final.exists():
        final.rename(old)
    stage.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _system_tree(settings: Settings, board: Board, inputs: _Inputs, fs: rootfs.Rootfs,
                 clef: clef_mod.ClefBinary, disk_id: int, work: Path, steps: Steps, usb_function: str,
                 host_keys_from: Path | None, overlay_dir: Path,
                 log: Log) -> tuple[overlay.DeviceConfig, dict[str, str], dict[str, Any] | None]:
    """The system in <work>/tree and the data partition's contents in <work>/data; returns the device
    config, the public host keys and the device tree record."""
    tree, data = work / "tree", work / "data"
    with steps.step("unpacking the rootfs"):
        rootfs.unpack(fs.tarball, tree)
    root = f"PARTUUID={disk.partuuid(disk_id)}" if board.root_device == "partuuid" else board.root_device
    device_tree = board.device_tree.for_soc(settings.soc) if board.device_tree else None
    cfg = overlay.DeviceConfig(
        board=board, suite=settings.suite, kernel_version=fs.kernel_version, root=root,
        authorized_key=inputs.authorized_key, chain_id=settings.chain_id, clef_version=clef.version,
        network=overlay.Network(usb_function=usb_function),
        dtb_path=f"/boot/dtbs/{device_tree.dtb_name}" if device_tree else None,
        system=manifest.system_record(fs, inputs.archives, _agent_version()),
    )
    dtb_info: dict[str, Any] | None = None
    if device_tree is not None:
        with steps.step(f"device tree {device_tree.dtb_name}"):
            dest = tree / "boot" / "dtbs" / device_tree.dtb_name
            dtb_info = devicetree.install(device_tree, tree, dest, settings, log=log)
    with steps.step("overlay: users, host keys, rendered files, agent, Clef, services"):
        public = _populate(tree, cfg, clef.path, fs.source_date_epoch, host_keys_from, overlay_dir, log)
        _split_data(tree, data, fs.source_date_epoch)
    return cfg, public, dtb_info


def _outputs(settings: Settings, board: Board, inputs: _Inputs, fs: rootfs.Rootfs, clef: clef_mod.ClefBinary,
             made: _Disk, image: Path, steps: Steps) -> dict[str, Any]:
    """Next to the image in its stage: firmware, bmap, .zst, known_hosts, manifest, SHA256SUMS."""
    stage, name = image.parent, image.name.removesuffix(".img")
    firmware = _firmware_output(board, inputs.firmware, stage)
    with steps.step("block map (bmap)"):
        block_map = bmap_mod.create(image, stage / f"{name}.img.bmap")
    compressed = stage / f"{name}.img.zst"
    with steps.step("compressing (zstd)"):
        _compress(image, compressed)
    with steps.step("manifest, known_hosts, SHA256SUMS"):
        (stage / "known_hosts").write_text(manifest.known_hosts(made.cfg.network.device_address,
                                                                made.public_keys))
        record = _manifest(settings, board, name, fs, clef, made, image, block_map, firmware, compressed,
                           inputs.archives)
        manifest.write_json(stage / "manifest.json", record)
        manifest.write_sums(stage, [image.name, f"{name}.img.bmap", compressed.name, "manifest.json",
                                    "known_hosts", *([firmware["file"]] if firmware else [])],
                            known={image.name: record["image_sha256"]})
    return record


def contract_version() -> int:
    """The device-admin contract the agent in this checkout speaks (armory_agent/contract.py)."""
    from armory_agent import contract

    return contract.VERSION


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
        inputs = _check_inputs(settings, bootloader, usb_function, log)
        disk.Layout(settings.image_size_bytes, boards.SLOT_SIZE)

    bootloader_file, bootloader_origin = inputs.loader.path, inputs.loader.origin
    if inputs.loader.plan is not None:
        plan = inputs.loader.plan
        with steps.step(f"U-Boot {plan.sources.version} for {board.name} ({plan.variant.describe()}; "
                        "cached, or built: 1-2 minutes)"):
            built = uboot.build(plan, log)
            bootloader_file, bootloader_origin = built.path, {**bootloader_origin, **built.record}

    spec = rootfs.RootfsSpec(archives=inputs.archives)
    with steps.step(f"root filesystem {spec.key()} (cached, or mmdebstrap: several minutes)"):
        fs = rootfs.build(spec, cache, log=log, refresh=refresh_rootfs)
        log(f"    {'reused cached' if fs.cached else 'built'} rootfs: kernel {fs.kernel_version}, "
            f"{len(fs.packages)} packages")

    with steps.step(f"Clef {settings.clef_version} for ARMv7 ({settings.clef_source})"):
        clef = clef_mod.acquire(settings.clef_source, version=settings.clef_version, arch="armv7",
                                cache_dir=cache, log=log)

    name = image_name(board, settings.suite)
    seed = f"{board.name}:{settings.suite}:{fs.key}"
    stage = Path(tempfile.mkdtemp(prefix=f".{board.name}.partial-", dir=out_root))
    work = Path(tempfile.mkdtemp(prefix="tree-", dir=cache))
    tree, data = work / "tree", work / "data"
    try:
        disk_id, _, _ = disk.disk_identity(seed)
        cfg, public, dtb_info = _system_tree(settings, board, inputs, fs, clef, disk_id, work, steps,
                                             usb_function, host_keys_from, overlay_dir, log)

        image = stage / f"{name}.img"
        layout = disk.Layout(settings.image_size_bytes, boards.SLOT_SIZE)
        with steps.step(f"disk image {name}.img ({settings.image_size}: system slots A and B of "
                        f"{layout.slot_size >> 20} MiB, data {layout.data.size >> 20} MiB)"):
            spec_bl = board.bootloader
            disk.assemble(
                image, tree, settings.image_size_bytes, seed=seed, epoch=fs.source_date_epoch,
                slot_size=layout.slot_size, data_tree=data, bootloader=bootloader_file,
                bootloader_offset=spec_bl.offset if spec_bl else 0,
                bootloader_limit=spec_bl.limit if spec_bl else boards.PARTITION_START,
            )
        made = _Disk(disk_id, layout, bootloader_file, bootloader_origin, public, cfg, dtb_info)
        data_record = _outputs(settings, board, inputs, fs, clef, made, image, steps)
        final = _publish(stage, out_root, board)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    compressed_size = (final / data_record["files"]["compressed"]).stat().st_size
    log(f"built {final / image.name} in {steps.total():.0f} s ({compressed_size >> 20} MiB compressed, "
        f"{data_record['disk']['bmap_mapped_blocks']} mapped blocks)")
    return BuildResult(final, final / image.name, data_record, tuple(steps.timings))


__all__ = ["ArmoryError", "BuildResult", "build_image"]
