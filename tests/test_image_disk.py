"""Disk assembly with the real tools (sfdisk, mke2fs -d, debugfs) on a small tree: seconds."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from clef_armory.errors import BuildError
from image import disk
from image.inspect import Image

pytestmark = pytest.mark.integration
EPOCH = 1_700_000_000


SLOT = 32 << 20


def _data(root: Path) -> Path:
    data = root / "data"
    (data / "ssh").mkdir(parents=True, exist_ok=True)
    (data / "agent").mkdir(exist_ok=True)
    (data / "ssh" / "ssh_host_ed25519_key").write_text("host key\n")
    os.chmod(data / "ssh" / "ssh_host_ed25519_key", 0o600)
    os.chown(data / "agent", 999, 998)
    os.chmod(data / "agent", 0o700)
    for p in [data, *data.rglob("*")]:
        os.utime(p, (EPOCH, EPOCH), follow_symlinks=False)
    return data


def _tree(root: Path) -> Path:
    tree = root / "tree"
    (tree / "etc" / "ssh").mkdir(parents=True)
    (tree / "var" / "lib" / "clef-armory").mkdir(parents=True)
    (tree / "etc" / "ssh" / "key").write_text("secret\n")
    os.chmod(tree / "etc" / "ssh" / "key", 0o600)
    os.chown(tree / "var" / "lib" / "clef-armory", 999, 998)
    os.chmod(tree / "var" / "lib" / "clef-armory", 0o700)
    (tree / "bin").mkdir()
    (tree / "bin" / "tool").write_bytes(b"\x7fELF" + os.urandom(100_000))
    os.chmod(tree / "bin" / "tool", 0o755)  # noqa: S103
    os.symlink("/bin/tool", tree / "etc" / "link")
    for p in [tree, *tree.rglob("*")]:
        os.utime(p, (EPOCH, EPOCH), follow_symlinks=False)
    return tree


def test_layout_owners_modes_and_bootloader(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    loader = tmp_path / "u-boot.imx"
    loader.write_bytes(os.urandom(300_000))
    img = tmp_path / "disk.img"
    disk_id = disk.assemble(img, tree, 128 << 20, seed="t", epoch=EPOCH, bootloader=loader,
                            bootloader_offset=1024, bootloader_limit=1 << 20, slot_size=SLOT,
                            data_tree=_data(tmp_path))
    assert img.stat().st_size == 128 << 20
    assert img.stat().st_blocks * 512 < 64 << 20, "the image is sparse"
    # p1 system A (bootable), p2 system B (same size, nothing written), p3 data to the end.
    table = disk.read_table(img)
    assert table[:3] == [(5 << 20, SLOT, 0x83, True), ((5 << 20) + SLOT, SLOT, 0x83, False),
                         ((5 << 20) + 2 * SLOT, (128 << 20) - (5 << 20) - 2 * SLOT, 0x83, False)]
    with img.open("rb") as f:
        f.seek((5 << 20) + SLOT)
        assert f.read(SLOT) == bytes(SLOT), "slot B is empty"
    labels = [subprocess.run(["blkid", "-p", "-o", "value", "-s", "LABEL", "-O", str(start), str(img)],
                             capture_output=True, text=True, check=True).stdout.strip()
              for start in (5 << 20, (5 << 20) + 2 * SLOT)]
    assert labels == ["system-a", "clef-data"]
    with img.open("rb") as f:
        mbr = f.read(512)
        f.seek(1024)
        assert f.read(300_000) == loader.read_bytes()
    assert int.from_bytes(mbr[440:444], "little") == disk_id
    image = Image(img)
    key = image.stat("/etc/ssh/key")
    assert key is not None and (key.uid, key.gid, key.mode) == (0, 0, 0o600)
    state = image.stat("/var/lib/clef-armory")
    assert state is not None
    assert (state.kind, state.uid, state.gid, state.mode) == ("directory", 999, 998, 0o700)
    assert image.read("/bin/tool") == (tree / "bin" / "tool").read_bytes()
    assert image.readlink("/etc/link") == "/bin/tool"
    assert image.stat("/nope") is None
    assert sorted(image.listdir("/etc")) == ["link", "ssh"]
    data = Image(img, partition=3)
    assert sorted(data.listdir("/")) == ["agent", "lost+found", "ssh"]
    host_key = data.stat("/ssh/ssh_host_ed25519_key")
    assert host_key is not None and (host_key.uid, host_key.mode) == (0, 0o600)
    agent = data.stat("/agent")
    assert agent is not None and (agent.uid, agent.gid, agent.mode) == (999, 998, 0o700)


def test_same_inputs_same_bytes(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    digests = []
    for name in ("a.img", "b.img"):
        time.sleep(1.1)  # a timestamp taken from the clock would now differ
        img = tmp_path / name
        disk.assemble(img, tree, 96 << 20, seed="same", epoch=EPOCH, slot_size=SLOT,
                      data_tree=_data(tmp_path / name.removesuffix(".img")))
        digests.append(hashlib.sha256(img.read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    # Every time the superblock records is the given epoch, never the clock.
    head = subprocess.run(["dumpe2fs", "-h", f"{tmp_path / 'a.img'}?offset={5 << 20}"],
                          capture_output=True, text=True, check=True).stdout
    stamps = [line.split(":", 1)[1].strip() for line in head.splitlines()
              if line.startswith(("Filesystem created", "Last write time", "Last checked"))]
    expected = time.strftime("%a %b %e %H:%M:%S %Y", time.localtime(EPOCH))
    assert stamps == [expected] * 3, stamps


def test_too_small_writes_nothing(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    (tree / "big").write_bytes(os.urandom(8 << 20))
    img = tmp_path / "small.img"
    with pytest.raises(BuildError, match="a system slot of 8 MiB is too small"):
        disk.assemble(img, tree, 64 << 20, seed="s", epoch=EPOCH, slot_size=8 << 20,
                      data_tree=_data(tmp_path))
    assert not img.exists()
    with pytest.raises(BuildError, match=r"no room for two 32 MiB system slots .* use --size 85M"):
        disk.assemble(img, tree, 80 << 20, seed="s", epoch=EPOCH, slot_size=SLOT, data_tree=_data(tmp_path))
    assert not img.exists()


def test_bootloader_overlapping_the_env_area_is_refused(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    loader = tmp_path / "big.imx"
    loader.write_bytes(b"\1" * (1 << 20))
    with pytest.raises(BuildError, match="must end before byte 1048576"):
        disk.assemble(tmp_path / "x.img", tree, 96 << 20, seed="s", epoch=EPOCH, bootloader=loader,
                      slot_size=SLOT, data_tree=_data(tmp_path),
                      bootloader_offset=1024, bootloader_limit=1 << 20)
    assert not (tmp_path / "x.img").exists()
