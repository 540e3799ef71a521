"""Real image builds, inspected without mounting (debugfs on the partition offset).

The qemu image is built for real (mmdebstrap through qemu-user on a cold cache: minutes); mk1 and
mk2 then reuse the cached rootfs and check their own parts. Bad inputs go through the real
`invoke build-image` and must give one line and leave no output behind.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clef_armory import config
from image import debs
from image.build import BuildResult, build_image
from image.inspect import Image

REPO = Path(__file__).resolve().parent.parent
INVOKE = [sys.executable, "-m", "invoke"]
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ssh_key(build_ssh_key: Path) -> Path:
    return build_ssh_key


def _settings(board: str, out: Path, key: Path, **extra: str) -> config.Settings:
    return config.load().replace(board=board, output_dir=str(out), ssh_key=str(key), **extra)


@pytest.fixture(scope="module")
def qemu_build(tmp_path_factory: pytest.TempPathFactory, ssh_key: Path) -> BuildResult:
    out = tmp_path_factory.mktemp("out")
    return build_image(_settings("qemu", out, ssh_key))


@pytest.fixture(scope="module")
def qemu_image(qemu_build: BuildResult) -> Image:
    return Image(qemu_build.image)


@pytest.fixture(scope="module")
def qemu_data(qemu_build: BuildResult) -> Image:
    """The data partition (p3), mounted at /var/lib/clef-armory on the device."""
    return Image(qemu_build.image, partition=3)


def _on(system: Image, data: Image, path: str) -> tuple[Image, str]:
    """Which partition holds a device path, and its path there."""
    prefix = "/var/lib/clef-armory"
    return (data, path.removeprefix(prefix) or "/") if path.startswith(prefix) else (system, path)


@pytest.fixture()
def tree_with(qemu_build: BuildResult, qemu_image: Image, qemu_data: Image, tmp_path: Path) -> Iterator[Path]:
    """The cached rootfs unpacked, with the image's own config files copied in (for checks that run
    the device's binaries under qemu-user)."""
    cache = config.load().cache_path
    tarball = cache / "rootfs" / f"{qemu_build.manifest['rootfs_key']}.tar"
    tree = tmp_path / "tree"
    tree.mkdir()
    subprocess.run(["tar", "-x", "-p", "--numeric-owner", "-f", str(tarball), "-C", str(tree)],
                   check=True)
    for path in ("/etc/ssh/sshd_config.d/armory.conf", "/var/lib/clef-armory/ssh/ssh_host_ed25519_key",
                 "/var/lib/clef-armory/ssh/ssh_host_ed25519_key.pub", "/etc/passwd", "/etc/group",
                 "/etc/shadow", "/etc/systemd/system/clef-armory-agent.service",
                 "/var/lib/clef-armory/ssh/authorized_keys/armory"):
        dest = tree / path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        part, inner = _on(qemu_image, qemu_data, path)
        dest.write_bytes(part.read(inner))
        os.chmod(dest, part.stat(inner).mode)  # type: ignore[union-attr]
    (tree / "run" / "sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege separation dir
    yield tree
    shutil.rmtree(tree, ignore_errors=True)


# --- the qemu image ---------------------------------------------------------------------------


@pytest.mark.slow
def test_outputs_are_complete_and_checksummed(qemu_build: BuildResult) -> None:
    out = qemu_build.out_dir
    name = qemu_build.manifest["name"]
    for f in (f"{name}.img", f"{name}.img.bmap", f"{name}.img.zst", "SHA256SUMS", "manifest.json",
              "known_hosts", "u-boot.bin"):
        assert (out / f).is_file(), f
    assert not (out / "vmlinuz").exists() and not (out / "initrd.img").exists()  # the disk has them
    assert "u-boot.bin" in (out / "SHA256SUMS").read_text()
    subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=out, check=True)
    subprocess.run(["zstd", "-q", "-t", str(out / f"{name}.img.zst")], check=True)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "partial dirs left"
    m = json.loads((out / "manifest.json").read_text())
    assert m["board"] == "qemu" and m["suite"] == "trixie"
    assert m["packages"]["openssh-server"] and m["packages"]["nftables"]
    compilers = re.compile(r"^(gcc|g\+\+|cpp|clang|golang-go|rustc)(-[\d.]+)?$|^(make|binutils)$")
    assert not [p for p in m["packages"] if compilers.match(p)]
    assert m["clef"]["version"].startswith("1.17.3") and len(m["clef"]["sha256"]) == 64
    assert m["agent"]["version"]
    assert len(m["config_digest"]) == 64
    assert m["disk"]["bmap_mapped_blocks"] > 0
    from image import bmap

    parsed = bmap.parse(out / f"{name}.img.bmap")
    assert sum(r.last - r.first + 1 for r in parsed.ranges) == m["disk"]["bmap_mapped_blocks"]


@pytest.mark.slow
def test_manifest_and_device_say_whether_security_updates_are_in(qemu_image: Image,
                                                                  qemu_build: BuildResult) -> None:
    """The build records the point release and the archives it used, and whether -security/-updates
    were among them; the device carries the same in /etc/clef-armory/system.json."""
    m = qemu_build.manifest
    security = m["security_updates"]
    assert security == "included" or security.startswith("unavailable: "), security
    sources = [a["source"] for a in m["archives"]]
    assert sources[0] == f"deb {m['mirror']} trixie main"
    assert (len(sources) == 3) == (security == "included")
    assert all(len(a["inrelease_sha256"]) == 64 and a["date"] for a in m["archives"])
    assert m["debian_version"] == qemu_image.read("/etc/debian_version").decode().strip()
    assert m["debian_version"].startswith("13.")
    record = json.loads(qemu_image.read("/etc/clef-armory/system.json"))
    assert (record["security_updates"], record["debian_version"], record["suite"]) == (
        security, m["debian_version"], "trixie")
    assert record["agent_version"] == m["agent"]["version"]
    assert record["kernel_version"] == m["kernel_version"]


@pytest.mark.slow
def test_partition_table_two_slots_and_data(qemu_build: BuildResult) -> None:
    dump = subprocess.run(["sfdisk", "--json", str(qemu_build.image)], capture_output=True,
                          text=True, check=True)
    table = json.loads(dump.stdout)["partitiontable"]
    assert table["label"] == "dos"
    a, b, data = table["partitions"]
    slot = 1024 * 1024 * 1024
    assert a["start"] * 512 == 5 * 1024 * 1024 and a["size"] * 512 == slot and a.get("bootable")
    assert b["start"] == a["start"] + a["size"] and b["size"] == a["size"] and not b.get("bootable")
    assert data["start"] == b["start"] + b["size"] and not data.get("bootable")
    assert (data["start"] + data["size"]) * 512 == qemu_build.image.stat().st_size
    assert {p["type"] for p in (a, b, data)} == {"83"}
    m = qemu_build.manifest
    assert m["disk"]["slot_size"] == slot and m["disk"]["data"]["offset"] == data["start"] * 512
    # What ./do update streams: slot A's mapped blocks, far fewer than the slot.
    assert m["system"]["offset"] == a["start"] * 512 and m["system"]["size"] == slot
    assert 100 << 20 < m["system"]["mapped_bytes"] < slot // 2
    assert len(m["system"]["sha256"]) == 64 and m["agent"]["contract"] >= 1


@pytest.mark.slow
def test_key_files_owners_and_modes(qemu_image: Image, qemu_data: Image) -> None:
    expect = {
        "/etc/ssh/sshd_config.d/armory.conf": (0, 0, 0o644),
        "/etc/nftables.conf": (0, 0, 0o644),
        "/etc/systemd/system/clef-armory-agent.service": (0, 0, 0o644),
        "/usr/local/bin/clef": (0, 0, 0o755),
        "/etc/sudoers.d/armory": (0, 0, 0o440),
        "/usr/lib/python3/dist-packages/armory_agent/__init__.py": (0, 0, 0o644),
    }
    for path, (uid, gid, mode) in expect.items():
        st = qemu_image.stat(path)
        assert st is not None, path
        assert (st.uid, st.gid, st.mode) == (uid, gid, mode), path
    passwd = qemu_image.read("/etc/passwd").decode()
    group = qemu_image.read("/etc/group").decode()
    clef_uid = next(int(line.split(":")[2]) for line in passwd.splitlines() if line.startswith("clef:"))
    clef_gid = next(int(line.split(":")[2]) for line in group.splitlines() if line.startswith("clef:"))
    assert clef_uid < 1000
    toml = qemu_image.stat("/etc/clef-armory/agent.toml")
    assert toml and (toml.uid, toml.gid, toml.mode) == (0, clef_gid, 0o640)
    # The system has only the (empty, root's) mount point; the data partition has a root-owned top
    # and ssh/ subtree, and the agent's subtree owned by clef.
    mount = qemu_image.stat("/var/lib/clef-armory")
    assert mount and mount.kind == "directory" and (mount.uid, mount.mode) == (0, 0o755)
    assert qemu_image.listdir("/var/lib/clef-armory") == []
    assert sorted(qemu_data.listdir("/")) == ["agent", "lost+found", "ssh"]
    for path, owner in (("/", (0, 0, 0o755)), ("/ssh", (0, 0, 0o755)),
                        ("/ssh/ssh_host_ed25519_key", (0, 0, 0o600)),
                        ("/ssh/authorized_keys/armory", (0, 0, 0o644)),
                        ("/agent", (clef_uid, clef_gid, 0o700))):
        st = qemu_data.stat(path)
        assert st is not None and (st.uid, st.gid, st.mode) == owner, path
    assert qemu_data.listdir("/agent") == []
    assert "/usr/sbin/nologin" in next(x for x in passwd.splitlines() if x.startswith("clef:"))
    assert (REPO / "armory_agent" / "__init__.py").read_bytes() == qemu_image.read(
        "/usr/lib/python3/dist-packages/armory_agent/__init__.py")
    wants = qemu_image.listdir("/etc/systemd/system/multi-user.target.wants")
    wants += qemu_image.listdir("/etc/systemd/system/sysinit.target.wants")
    for unit in ("clef-armory-agent.service", "nftables.service", "systemd-networkd.service", "ssh.service"):
        assert unit in wants, unit
    assert "rngd.service" not in wants  # no hardware RNG on qemu: masked
    assert qemu_image.readlink("/etc/systemd/system/rngd.service") == "/dev/null"
    from image.build import BOOT_TRIM, GENERATOR_TRIM

    for name in GENERATOR_TRIM:
        assert qemu_image.readlink(f"/etc/systemd/system-generators/{name}") == "/dev/null", name
    for unit in ("systemd-sysusers.service", "systemd-remount-fs.service"):
        assert unit in BOOT_TRIM and qemu_image.readlink(f"/etc/systemd/system/{unit}") == "/dev/null", unit


@pytest.mark.slow
def test_clef_is_32bit_arm(qemu_image: Image, qemu_build: BuildResult) -> None:
    data = qemu_image.read("/usr/local/bin/clef")
    assert data[:4] == b"\x7fELF" and data[4] == 1  # ELFCLASS32
    assert int.from_bytes(data[18:20], "little") == 40  # EM_ARM
    assert hashlib.sha256(data).hexdigest() == qemu_build.manifest["clef"]["sha256"]


@pytest.mark.slow
def test_no_user_has_a_password(qemu_image: Image) -> None:
    shadow = qemu_image.read("/etc/shadow").decode()
    st = qemu_image.stat("/etc/shadow")
    assert st is not None and st.mode & 0o007 == 0
    users = set()
    for line in shadow.splitlines():
        name, pw = line.split(":")[:2]
        users.add(name)
        assert pw in ("*", "!", "!*", "!!") or (pw.startswith("!") and "$" not in pw), (name, pw)
        assert pw != "", f"{name} can log in without a password"
    assert {"root", "armory", "clef"} <= users


@pytest.mark.slow
def test_host_keys_match_manifest_and_known_hosts(qemu_image: Image, qemu_data: Image,
                                                  qemu_build: BuildResult) -> None:
    pub = qemu_data.read("/ssh/ssh_host_ed25519_key.pub").decode().strip()
    entry = qemu_build.manifest["host_keys"]["ed25519"]
    assert entry["public"] == pub
    blob = base64.b64decode(pub.split()[1])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    assert entry["fingerprint"] == "SHA256:" + digest
    known = (qemu_build.out_dir / "known_hosts").read_text().split()
    assert known[:3] == ["10.0.0.1", *pub.split()[:2]]
    # Only this image's keys, on the data partition: none in the system (nor from the cached rootfs).
    assert not [n for n in qemu_image.listdir("/etc/ssh") if n.startswith("ssh_host_")]
    names = [n for n in qemu_data.listdir("/ssh") if n.startswith("ssh_host_")]
    assert sorted(names) == ["ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"]


@pytest.mark.slow
def test_authorized_key_is_the_given_one(qemu_data: Image, ssh_key: Path) -> None:
    assert qemu_data.read("/ssh/authorized_keys/armory").decode().strip() == ssh_key.read_text().strip()


@pytest.mark.slow
def test_nftables_ruleset_is_valid(qemu_image: Image, tmp_path: Path) -> None:
    rules = tmp_path / "nftables.conf"
    rules.write_bytes(qemu_image.read("/etc/nftables.conf"))
    result = subprocess.run(["nft", "-c", "-f", str(rules)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_sshd_config_is_valid_under_qemu_user(tree_with: Path) -> None:
    result = subprocess.run(["chroot", str(tree_with), "/usr/sbin/sshd", "-t"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    effective = subprocess.run(["chroot", str(tree_with), "/usr/sbin/sshd", "-T",
                                "-C", "user=armory,host=laptop,addr=10.0.0.2"],
                               capture_output=True, text=True, check=True).stdout.splitlines()
    for line in ("passwordauthentication no", "kbdinteractiveauthentication no", "permitrootlogin no",
                 "listenaddress 10.0.0.1:22", "pubkeyauthentication yes",
                 # Identity and the admin's key: on the data partition, kept across system updates.
                 "hostkey /var/lib/clef-armory/ssh/ssh_host_ed25519_key",
                 "authorizedkeysfile /var/lib/clef-armory/ssh/authorized_keys/%u"):
        assert line in effective, line


@pytest.mark.slow
def test_agent_unit_verifies(tree_with: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing (apt-get install systemd)")
    result = subprocess.run(
        ["systemd-analyze", "verify", f"--root={tree_with}", "clef-armory-agent.service"],
        capture_output=True, text=True, check=False,
    )
    # The host's systemd may be older than the image's: other units' new keys are noise here; any
    # complaint about our unit is a defect.
    problems = [line for line in result.stderr.splitlines() if "clef-armory-agent" in line]
    assert not problems, "\n".join(problems)


@pytest.mark.slow
def test_qemu_boots_through_u_boot_and_extlinux(qemu_image: Image, qemu_build: BuildResult) -> None:
    m = qemu_build.manifest
    kv = m["kernel_version"]
    # U-Boot for QEMU's virt machine, from the suite's u-boot-qemu: next to the image, not in it.
    firmware = qemu_build.out_dir / "u-boot.bin"
    assert m["files"]["firmware"] == "u-boot.bin" and "kernel" not in m["files"]
    assert m["firmware"]["package"] == "u-boot-qemu" and m["firmware"]["version"]
    assert hashlib.sha256(firmware.read_bytes()).hexdigest() == m["firmware"]["sha256"]
    assert b"U-Boot 20" in firmware.read_bytes() and m["disk"]["bootloader"] is None
    # The disk's extlinux.conf names files that are on the disk, with the manifest's command line.
    ext = qemu_image.read("/boot/extlinux/extlinux.conf").decode()
    assert f"kernel /boot/vmlinuz-{kv}\n" in ext and f"initrd /boot/initrd.img-{kv}\n" in ext
    assert f"append {m['kernel_cmdline']}\n" in ext and "fdt" not in ext.split("label armory")[1]
    for path in (f"/boot/vmlinuz-{kv}", f"/boot/initrd.img-{kv}"):
        st = qemu_image.stat(path)
        assert st is not None and st.kind == "regular" and st.size > 0, path
    assert m["kernel_cmdline"].startswith(f"root=PARTUUID={m['disk']['partuuid']} rw")
    assert "console=ttyAMA0" in m["kernel_cmdline"]
    link = qemu_image.read("/etc/systemd/network/10-usb0.link").decode()
    assert "Driver=virtio_net" in link and "Name=usb0" in link


# --- mk1 and mk2 reuse the cached rootfs ------------------------------------------------------


def _partuuid_root(result: BuildResult) -> str:
    disk_id = int.from_bytes(result.image.open("rb").read(512)[440:444], "little")
    return f"PARTUUID={disk_id:08x}-01"


@pytest.mark.slow
def test_mk1_bootloader_dtb_and_extlinux(tmp_path: Path, ssh_key: Path, qemu_build: BuildResult) -> None:
    result = build_image(_settings("mk1", tmp_path / "out", ssh_key))
    assert result.manifest["rootfs_key"] == qemu_build.manifest["rootfs_key"]
    s = config.load()
    deb, _ = debs.fetch("u-boot-imx", mirror=s.mirror, suite=s.suite, cache_dir=s.cache_path)
    debs.extract(deb, ["usr/lib/u-boot/usbarmory/u-boot-dtb.imx"], tmp_path / "uboot")
    uboot = (tmp_path / "uboot/usr/lib/u-boot/usbarmory/u-boot-dtb.imx").read_bytes()
    with result.image.open("rb") as f:
        f.seek(1024)
        assert f.read(len(uboot)) == uboot
    image = Image(result.image)
    dtb = tmp_path / "mk1.dtb"
    dtb.write_bytes(image.read("/boot/dtbs/imx53-usbarmory.dtb"))
    compat = subprocess.run(["fdtget", "-t", "s", str(dtb), "/", "compatible"], capture_output=True,
                            text=True, check=True).stdout
    assert "inversepath,imx53-usbarmory" in compat
    ext = image.read("/boot/extlinux/extlinux.conf").decode()
    kv = result.manifest["kernel_version"]
    assert f"kernel /boot/vmlinuz-{kv}" in ext and f"initrd /boot/initrd.img-{kv}" in ext
    assert "fdt /boot/dtbs/imx53-usbarmory.dtb" in ext
    assert f"root={_partuuid_root(result)} " in ext and "console=ttymxc0,115200" in ext
    for path in (f"/boot/vmlinuz-{kv}", f"/boot/initrd.img-{kv}"):
        assert image.stat(path) is not None, path
    assert image.stat("/usr/local/lib/clef-armory/usb-gadget").mode == 0o755  # type: ignore[union-attr]


@pytest.mark.slow
def test_mk2_with_given_bootloader_and_own_dtb(
    tmp_path: Path, ssh_key: Path, qemu_build: BuildResult
) -> None:
    loader = tmp_path / "mk2-u-boot.imx"
    loader.write_bytes(os.urandom(600_000))
    result = build_image(_settings("mk2", tmp_path / "out", ssh_key), bootloader=loader)
    assert result.manifest["rootfs_key"] == qemu_build.manifest["rootfs_key"]
    with result.image.open("rb") as f:
        f.seek(1024)
        assert f.read(600_000) == loader.read_bytes()
        f.seek(1 << 20)
        assert f.read(8192) == bytes(8192), "the U-Boot environment area at 1 MiB must stay free"
    image = Image(result.image)
    dtb = tmp_path / "mk2.dtb"
    dtb.write_bytes(image.read("/boot/dtbs/imx6ulz-usbarmory.dtb"))
    source = subprocess.run(["dtc", "-q", "-I", "dtb", "-O", "dts", str(dtb)], capture_output=True,
                            text=True, check=True).stdout
    assert "usbarmory,imx6ulz-usbarmory-mk2" in source.replace("\\0", " ")
    assert 'label = "LED_WHITE"' in source and 'label = "LED_BLUE"' in source
    assert 'dr_mode = "peripheral"' in source
    ext = image.read("/boot/extlinux/extlinux.conf").decode()
    assert "fdt /boot/dtbs/imx6ulz-usbarmory.dtb" in ext and "console=ttymxc1,115200" in ext
    assert f"root={_partuuid_root(result)} " in ext
    assert result.manifest["device_tree"]["linux_source"]


# --- bad input: one line, exit 1, nothing left behind -----------------------------------------


def _invoke(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*INVOKE, "build-image", *args], cwd=REPO, capture_output=True, text=True,
                          check=False, timeout=1200)


def _one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for w in words:
        assert w in lines[0], lines[0]


def _nothing_in(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


def test_unknown_board(tmp_path: Path, ssh_key: Path) -> None:
    out = tmp_path / "out"
    _one_line_error(_invoke("--board", "mk3", "--output", str(out), "--ssh-key", str(ssh_key)),
                    "unknown board", "mk3")
    assert not out.exists()


def test_missing_ssh_key(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _one_line_error(_invoke("--board", "qemu", "--output", str(out), "--ssh-key", str(tmp_path / "nope.pub")),
                    "no SSH public key", "--ssh-key")
    _nothing_in(out)


@pytest.mark.parametrize(("board", "size"), [("mk2", 1 << 20), ("mk1", 5 << 20)])
def test_bootloader_too_large(tmp_path: Path, ssh_key: Path, board: str, size: int) -> None:
    loader = tmp_path / "loader.imx"
    loader.write_bytes(b"\xaa" * size)
    out = tmp_path / "out"
    _one_line_error(_invoke("--board", board, "--output", str(out), "--ssh-key", str(ssh_key),
                            "--bootloader", str(loader)), "bootloader", "must end before byte")
    _nothing_in(out)


def test_mk2_without_bootloader_names_the_flag(tmp_path: Path, ssh_key: Path) -> None:
    """No --bootloader and no --uboot-patch, nothing cached, GitHub unreachable (enforced: a network
    namespace without a network): one line naming both ways out, within seconds, before the rootfs."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    runtime = tmp_path / "runtime.yaml"  # invoke -f: a fresh cache, so no U-Boot or patch is cached
    runtime.write_text(f"armory:\n  cache_dir: {cache}\n")
    started = time.monotonic()
    result = subprocess.run(["unshare", "--net", *INVOKE, "-f", str(runtime), "build-image", "--board", "mk2",
                             "--output", str(out), "--ssh-key", str(ssh_key)],
                            cwd=REPO, capture_output=True, text=True, check=False, timeout=300)
    _one_line_error(result, "cannot download the Mk II U-Boot patch", "--uboot-patch FILE",
                    "--bootloader FILE")
    assert time.monotonic() - started < 60
    assert "root filesystem" not in result.stdout, result.stdout
    _nothing_in(out)
    assert not [p for p in cache.rglob("*") if p.is_file()]


def test_unwritable_output_dir(tmp_path: Path, ssh_key: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    _one_line_error(_invoke("--board", "qemu", "--output", str(blocker / "out"), "--ssh-key", str(ssh_key)),
                    "cannot write to output directory")
    assert blocker.read_text() == "not a directory"


@pytest.mark.slow
def test_image_too_small_for_rootfs(tmp_path: Path, ssh_key: Path, qemu_build: BuildResult) -> None:
    out = tmp_path / "out"
    _one_line_error(_invoke("--board", "qemu", "--output", str(out), "--ssh-key", str(ssh_key),
                            "--size", "64M"), "no room for two 1024 MiB system slots", "--size 2069M")
    _nothing_in(out)


@pytest.mark.slow
def test_rootfs_tarball_has_no_host_keys(qemu_build: BuildResult) -> None:
    """The cached rootfs is shared by every image: it must not carry SSH host keys."""
    tarball = config.load().cache_path / "rootfs" / f"{qemu_build.manifest['rootfs_key']}.tar"
    with tarfile.open(tarball) as tar:
        assert not [n for n in tar.getnames() if "/etc/ssh/ssh_host_" in n]


