"""The A/B system slots on real bootloaders: each board's U-Boot boots the partition marked bootable.

Switching slots is flipping the MBR's bootable flag (./do update does it on the device). The qemu
board's U-Boot does it for real in tests/test_system.py; the Mk II and Mk I U-Boot cannot run in
QEMU, so their built default environment is checked for distro boot's bootable-partition scan.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from clef_armory import config
from image import boards, debs, uboot

pytestmark = pytest.mark.integration

# distro boot (include/config_distro_bootcmd.h): list the bootable partitions, fall back to 1 only
# when none is marked, and scan them in order for extlinux.conf.
SCAN = ("part list ${devtype} ${devnum} -bootable devplist; env exists devplist || setenv devplist 1; "
        "for distro_bootpart in ${devplist}; do")


def _check_scans_bootable_first(env: dict[str, str]) -> None:
    assert env["scan_dev_for_boot_part"].startswith(SCAN), env["scan_dev_for_boot_part"]
    assert "run scan_dev_for_extlinux" in env["scan_dev_for_boot"]
    assert env["mmc_boot"].endswith("run scan_dev_for_boot_part; fi")
    assert env["boot_targets"].split() == ["mmc0"] or "mmc0" in env["boot_targets"].split()
    # Boot starts with distro boot (the fallbacks after it only run when no slot boots).
    bootcmd = env["bootcmd"]
    if bootcmd == "run start_normal":
        bootcmd = env["start_normal"]
    assert bootcmd.startswith("run distro_bootcmd"), bootcmd


def test_environment_parser() -> None:
    blob = b"\x01\x02bootcmd=run distro_bootcmd\0x=1\0\xffmmc_boot=a b\0bootcmd=other\0"
    assert uboot.default_environment(blob) == {"bootcmd": "run distro_bootcmd", "x": "1", "mmc_boot": "a b"}


@pytest.mark.slow
def test_mk2_u_boot_scans_the_bootable_partition_first(settings: config.Settings, uboot_patch: Path) -> None:
    spec = boards.MK2.bootloader
    assert spec is not None and spec.uboot is not None
    built = uboot.bootloader(spec.uboot, uboot.Variant(), cache_dir=settings.cache_path,
                             mirror=settings.mirror, offset=spec.offset, limit=spec.limit,
                             patch_file=uboot_patch, log=lambda _: None)
    _check_scans_bootable_first(uboot.default_environment(built.path.read_bytes()))


def test_mk1_u_boot_scans_the_bootable_partition_first(settings: config.Settings) -> None:
    spec = boards.MK1.bootloader
    assert spec is not None and spec.deb_package and spec.deb_path
    path, _ = debs.cached_member(spec.deb_package, spec.deb_path, mirror=settings.mirror,
                                 suite=settings.suite, cache_dir=settings.cache_path, log=lambda _: None)
    env = uboot.default_environment(path.read_bytes())
    _check_scans_bootable_first(env)
    # Debian's Mk I U-Boot is larger than the room before its environment offset: nothing may saveenv,
    # so the slot choice lives in the MBR, not in U-Boot's environment.
    assert 1024 + path.stat().st_size > 0x60000


# -- the device side's pieces, on plain files ------------------------------------------------------------


def test_bootable_flag_flips_in_one_sector(tmp_path: Path) -> None:
    import subprocess

    from armory_agent import slots
    from image import disk

    img = tmp_path / "disk.img"
    with img.open("wb") as f:
        f.truncate(40 << 20)
    layout = disk.Layout(40 << 20, 8 << 20)
    subprocess.run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", str(img)], check=True, text=True,
                   input=layout.sfdisk_script(0x1234ABCD))
    before = img.read_bytes()
    mbr = slots.read_mbr(str(img))
    assert (slots.bootable_partition(mbr), slots.disk_id(mbr)) == (1, "1234abcd")
    assert slots.set_bootable(str(img), 2) == 1
    after = img.read_bytes()
    assert [e[3] for e in disk.read_table(img)] == [False, True, False, False]
    assert before[512:] == after[512:]
    changed = [i for i in range(512) if before[i] != after[i]]
    assert changed == [446, 462], changed  # p1's and p2's status bytes, nothing else


def test_a_cut_stream_is_refused(tmp_path: Path) -> None:
    import hashlib
    import io
    import os
    import zlib

    from armory_agent import slots

    target = tmp_path / "slot"
    target.write_bytes(b"\xa5" * (1 << 20))
    data = os.urandom(300_000)
    ranges = [[4096, 100_000], [200_704, 200_000]]
    packed = zlib.compress(data)
    assert slots._receive(str(target), ranges, io.BytesIO(packed)) == hashlib.sha256(data).hexdigest()
    written = target.read_bytes()
    assert written[4096:104_096] == data[:100_000] and written[200_704:400_704] == data[100_000:]
    assert written[:4096] == b"\xa5" * 4096  # outside the ranges: untouched
    assert slots._read_back(str(target), ranges) == hashlib.sha256(data).hexdigest()
    with pytest.raises(slots.SlotError, match="the stream ended early"):
        slots._receive(str(target), ranges, io.BytesIO(packed[: len(packed) // 2]))
