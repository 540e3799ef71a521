"""The Mk II U-Boot from pinned sources (image/uboot.py).

One real build of the default variant (uSD, 512M, imx6ulz) through the verified path; the other
switches checked by the .config and environment they produce; every bad input refused in one line with
nothing cached; and the real `invoke build-image` for the Mk II with --uboot-patch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from clef_armory import config
from clef_armory.errors import ArmoryError, BuildError, ConfigError, PrerequisiteError
from image import boards, devicetree, uboot
from image.build import BuildResult
from image.inspect import Image

REPO = Path(__file__).resolve().parent.parent
OFFSET, LIMIT = boards.MK2.bootloader.offset, boards.MK2.bootloader.limit  # type: ignore[union-attr]


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _one_line(err: ArmoryError) -> str:
    text = str(err)
    assert "\n" not in text, text
    return text


@pytest.fixture(scope="module")
def sources(settings: config.Settings) -> tuple[Path, Path]:
    """The release tarball and its signature, verified, in the shared cache (downloaded once)."""
    tarball, _ = uboot.fetch_tarball(uboot.MK2, settings.mirror, settings.cache_path)
    return tarball, tarball.with_name(tarball.name + ".asc")


def _seeded_cache(root: Path, sources: tuple[Path, Path]) -> Path:
    """A fresh cache whose sources/ links to the shared tarball (checked again on use, like any cache)."""
    where = root / "u-boot" / "sources"
    where.mkdir(parents=True)
    for src in sources:
        (where / src.name).symlink_to(src)
    return root


# --- pure logic ----------------------------------------------------------------------------------


def test_variants_map_to_the_vendor_switches() -> None:
    assert uboot.Variant().kconfig() == {"SYS_BOOT_DEV_MICROSD": True, "SYS_BOOT_DEV_EMMC": False,
                                         "SYS_DDR_512MB": True, "SYS_DDR_1GB": False}
    assert uboot.Variant("eMMC", "1G").kconfig() == {"SYS_BOOT_DEV_MICROSD": False, "SYS_BOOT_DEV_EMMC": True,
                                                     "SYS_DDR_512MB": False, "SYS_DDR_1GB": True}
    assert uboot.Variant().fdtfile == "imx6ulz-usbarmory.dtb"
    assert uboot.Variant(soc="imx6ul").fdtfile == "imx6ul-usbarmory.dtb"
    s = config.load()
    assert uboot.Variant.from_settings(s) == uboot.Variant()  # invoke.yaml's defaults are the vendor's
    assert uboot.Variant.from_settings(s.replace(boot_medium="eMMC", memory="1G", soc="imx6ul")) == \
        uboot.Variant("eMMC", "1G", "imx6ul")


@pytest.mark.parametrize(("field", "value"), [("boot_medium", "sd"), ("memory", "2G"), ("soc", "imx6ull")])
def test_bad_switches_are_one_line_errors(field: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"{field} '{value}' is not one of") as e:
        config.load().replace(**{field: value})
    _one_line(e.value)
    with pytest.raises(ConfigError):
        uboot.Variant(**{field: value})


def test_cache_key_covers_every_input() -> None:
    base = uboot.cache_key(uboot.MK2, uboot.Variant(), "gcc 12")
    others = {
        uboot.cache_key(uboot.MK2, uboot.Variant("eMMC"), "gcc 12"),
        uboot.cache_key(uboot.MK2, uboot.Variant(memory="1G"), "gcc 12"),
        uboot.cache_key(uboot.MK2, uboot.Variant(soc="imx6ul"), "gcc 12"),
        uboot.cache_key(uboot.MK2, uboot.Variant(), "gcc 13"),
        uboot.cache_key(dataclasses.replace(uboot.MK2, patch_sha256="0" * 64), uboot.Variant(), "gcc 12"),
        uboot.cache_key(dataclasses.replace(uboot.MK2, tarball_sha256="0" * 64), uboot.Variant(), "gcc 12"),
    }
    assert base == uboot.cache_key(uboot.MK2, uboot.Variant(), "gcc 12")
    assert base not in others and len(others) == 6


def test_mk2_device_tree_follows_the_soc() -> None:
    dt = boards.MK2.device_tree
    assert dt is not None
    assert dt.for_soc("imx6ulz") == dt and dt.dtb_name == "imx6ulz-usbarmory.dtb"
    ul = dt.for_soc("imx6ul")
    assert (ul.dtb_name, ul.dts_file) == ("imx6ul-usbarmory.dtb", "imx6ul-usbarmory.dts")
    assert ul.dtb_name == uboot.Variant(soc="imx6ul").fdtfile  # U-Boot's fallback names the same file
    assert (devicetree.DTS_DIR / ul.dts_file).is_file()
    mk1 = boards.MK1.device_tree
    assert mk1 is not None and mk1.for_soc("imx6ul") == mk1  # single-SoC boards ignore the setting
    assert boards.MK2.bootloader is not None and boards.MK2.bootloader.uboot == uboot.MK2


def test_output_must_be_an_imx_image_that_ends_before_the_environment(tmp_path: Path) -> None:
    imx = tmp_path / "u-boot-dtb.imx"
    imx.write_bytes(bytes([0xD1, 0x00, 0x20, 0x40]) + bytes(LIMIT - OFFSET - 4))
    assert uboot.check_output(imx, OFFSET, LIMIT) == LIMIT - OFFSET
    imx.write_bytes(bytes([0xD1, 0x00, 0x20, 0x40]) + bytes(LIMIT - OFFSET - 3))
    with pytest.raises(BuildError, match=f"would reach byte {LIMIT}") as e:
        uboot.check_output(imx, OFFSET, LIMIT)
    _one_line(e.value)
    imx.write_bytes(b"\x7fELF" + bytes(1000))
    with pytest.raises(BuildError, match=r"not an i\.MX image"):
        uboot.check_output(imx, OFFSET, LIMIT)


def test_pinned_download_keeps_nothing_on_a_mismatch(tmp_path: Path) -> None:
    src = tmp_path / "file.bin"
    src.write_bytes(b"\x01" * 4096)
    good = hashlib.sha256(src.read_bytes()).hexdigest()
    dest = tmp_path / "cache" / "file.bin"
    with pytest.raises(BuildError, match="does not match its pinned sha256"):
        uboot.fetch_pinned(src.as_uri(), "0" * 64, dest, "a file")
    assert _files(tmp_path / "cache") == []
    assert uboot.fetch_pinned(src.as_uri(), good, dest, "a file").read_bytes() == src.read_bytes()
    dest.write_bytes(b"changed in the cache")  # a damaged cache entry is fetched again
    assert uboot.fetch_pinned(src.as_uri(), good, dest, "a file").read_bytes() == src.read_bytes()
    assert _files(tmp_path / "cache") == ["file.bin"]


# --- real programs: gpg, tar, patch, make ----------------------------------------------------------


@pytest.mark.integration
def test_signature_is_checked_with_the_pinned_key(sources: tuple[Path, Path], tmp_path: Path) -> None:
    tarball, signature = sources
    key = uboot.KEYS_DIR / uboot.MK2.signing_key
    how = uboot.verify_signature(tarball, signature, key, uboot.MK2.signing_fingerprint)
    assert how.startswith("verified: 1A3C7F70E08FAB1707809BBF147C39FF9634B72C") and "expired" in how
    altered = tmp_path / tarball.name
    shutil.copyfile(tarball, altered)
    with altered.open("r+b") as f:
        f.seek(1 << 20)
        f.write(b"\x00" * 16)
    with pytest.raises(BuildError, match="BADSIG") as e:
        uboot.verify_signature(altered, signature, key, uboot.MK2.signing_fingerprint)
    _one_line(e.value)
    geth = uboot.KEYS_DIR / "geth-linux-builder.asc"  # another pinned key: not U-Boot's signer
    with pytest.raises(BuildError, match="does not verify"):
        uboot.verify_signature(tarball, signature, geth, "FDE5A1A044FA13D2F7ADA019A61A13569BA28146")
    with pytest.raises(BuildError, match="does not verify"):  # right key, wrong pinned fingerprint
        uboot.verify_signature(tarball, signature, key, "FDE5A1A044FA13D2F7ADA019A61A13569BA28146")


@pytest.mark.integration
def test_tampered_tarball_is_refused(sources: tuple[Path, Path], tmp_path: Path, uboot_patch: Path) -> None:
    mirror = tmp_path / "mirror"
    pool = mirror / uboot.MK2.pool_dir
    pool.mkdir(parents=True)
    tarball, signature = sources
    shutil.copyfile(tarball, pool / tarball.name)
    shutil.copyfile(signature, pool / signature.name)
    with (pool / tarball.name).open("r+b") as f:
        f.seek(-100, os.SEEK_END)
        f.write(b"tampered")
    cache = tmp_path / "cache"
    with pytest.raises(BuildError, match=r"U-Boot's source from file:.* does not match its pinned") as e:
        uboot.bootloader(uboot.MK2, uboot.Variant(), cache_dir=cache, mirror=mirror.as_uri(),
                         offset=OFFSET, limit=LIMIT, patch_file=uboot_patch, log=lambda _: None)
    _one_line(e.value)
    assert not [f for f in _files(cache) if "orig.tar" in f or not f.startswith("u-boot/sources/")]


@pytest.mark.integration
def test_tampered_patch_is_refused(tmp_path: Path, uboot_patch: Path) -> None:
    altered = tmp_path / uboot_patch.name
    altered.write_bytes(uboot_patch.read_bytes().replace(b"SYS_DDR_512MB", b"SYS_DDR_1GB", 1))
    cache = tmp_path / "cache"
    with pytest.raises(BuildError, match="is not the pinned 0001-ARM-mx6") as e:
        uboot.prepare(uboot.MK2, uboot.Variant(), cache_dir=cache, mirror="file:///nonexistent",
                      offset=OFFSET, limit=LIMIT, patch_file=altered)
    assert "--uboot-patch" in _one_line(e.value)
    with pytest.raises(BuildError, match="does not exist"):
        uboot.prepare(uboot.MK2, uboot.Variant(), cache_dir=cache, mirror="file:///nonexistent",
                      offset=OFFSET, limit=LIMIT, patch_file=tmp_path / "nope.patch")
    assert _files(cache) == []


@pytest.mark.integration
def test_unreachable_patch_names_both_ways_out(tmp_path: Path) -> None:
    unreachable = dataclasses.replace(uboot.MK2, patch_url="http://patch-host.invalid/u-boot/0001-x.patch")
    cache = tmp_path / "cache"
    t0 = time.monotonic()
    with pytest.raises(BuildError) as e:
        uboot.prepare(unreachable, uboot.Variant(), cache_dir=cache, mirror="file:///nonexistent",
                      offset=OFFSET, limit=LIMIT)
    assert time.monotonic() - t0 < uboot.DOWNLOAD_TIMEOUT + 5
    line = _one_line(e.value)
    assert "cannot download the Mk II U-Boot patch from patch-host.invalid" in line
    assert "--uboot-patch FILE" in line and "--bootloader FILE" in line
    assert _files(cache) == []


@pytest.mark.integration
def test_cached_build_is_used_only_while_it_matches_its_record(tmp_path: Path) -> None:
    """A cache hit needs neither patch nor tarball; a damaged entry is not a hit (it is built again)."""
    unreachable = dataclasses.replace(uboot.MK2, patch_url="http://patch-host.invalid/u-boot/0001-x.patch")
    key = uboot.cache_key(unreachable, uboot.Variant(), uboot.cross_compiler())
    entry = tmp_path / "u-boot" / key
    entry.mkdir(parents=True)
    imx = entry / unreachable.output
    imx.write_bytes(bytes([0xD1, 0x00, 0x20, 0x40]) + bytes(4000))
    (entry / "build.json").write_text(json.dumps({"sha256": hashlib.sha256(imx.read_bytes()).hexdigest()}))
    plan = uboot.prepare(unreachable, uboot.Variant(), cache_dir=tmp_path, mirror="file:///nonexistent",
                         offset=OFFSET, limit=LIMIT)
    assert plan.inputs is None and uboot.build(plan, log=lambda _: None).path == imx
    imx.write_bytes(bytes([0xD1, 0x00, 0x20, 0x40]) + bytes(3999) + b"\x01")
    with pytest.raises(BuildError, match="cannot download the Mk II U-Boot patch"):
        uboot.prepare(unreachable, uboot.Variant(), cache_dir=tmp_path, mirror="file:///nonexistent",
                      offset=OFFSET, limit=LIMIT)


@pytest.mark.integration
def test_patch_that_does_not_apply_caches_nothing(
    sources: tuple[Path, Path], tmp_path: Path, uboot_patch: Path
) -> None:
    # A well-formed patch whose context is not in U-Boot 2025.01, pinned by its own digest.
    bad = tmp_path / "0001-does-not-apply.patch"
    bad.write_text("--- a/Makefile\n+++ b/Makefile\n@@ -1,3 +1,3 @@\n-NOT A LINE OF U-BOOT\n"
                   "+ours\n NOR THIS\n NOR THIS ONE\n")
    pinned = dataclasses.replace(uboot.MK2, patch_url="https://example.invalid/0001-does-not-apply.patch",
                                 patch_sha256=hashlib.sha256(bad.read_bytes()).hexdigest())
    cache = _seeded_cache(tmp_path / "cache", sources)
    with pytest.raises(BuildError, match="does not apply") as e:
        uboot.bootloader(pinned, uboot.Variant(), cache_dir=cache, mirror="file:///nonexistent",
                         offset=OFFSET, limit=LIMIT, patch_file=bad, log=lambda _: None)
    _one_line(e.value)
    built = [p.name for p in (cache / "u-boot").iterdir() if p.name != "sources"]
    assert built == [], built  # no build directory, no cache entry


@pytest.mark.integration
def test_missing_cross_compiler_names_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uboot_patch: Path
) -> None:
    """PATH with every program the host has except the cross compiler."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for d in os.environ["PATH"].split(os.pathsep):
        if not Path(d).is_dir():
            continue
        for exe in Path(d).iterdir():
            if not exe.name.startswith(uboot.CROSS_COMPILE) and not (bin_dir / exe.name).exists():
                (bin_dir / exe.name).symlink_to(exe)
    monkeypatch.setenv("PATH", str(bin_dir))
    cache = tmp_path / "cache"
    with pytest.raises(PrerequisiteError, match="apt-get install gcc-arm-linux-gnueabihf") as e:
        uboot.prepare(uboot.MK2, uboot.Variant(), cache_dir=cache, mirror="file:///nonexistent",
                      offset=OFFSET, limit=LIMIT, patch_file=uboot_patch)
    assert "--bootloader FILE" in _one_line(e.value)
    assert _files(cache) == []


@pytest.mark.integration
def test_switches_change_only_their_own_config(
    sources: tuple[Path, Path], tmp_path: Path, uboot_patch: Path
) -> None:
    """defconfig + switches, no compiling: each switch changes exactly its own symbols (or fdtfile)."""
    inputs = uboot.Inputs(tarball=sources[0], signature="", patch=uboot_patch)
    tree = uboot.unpack(uboot.MK2, inputs, tmp_path, log=lambda _: None)
    env = {**os.environ, "ARCH": "arm", "CROSS_COMPILE": uboot.CROSS_COMPILE}
    subprocess.run(["make", "-s", uboot.MK2.defconfig], cwd=tree, env=env, check=True, capture_output=True)
    plain = (tree / ".config").read_text().splitlines()

    def configured(variant: uboot.Variant) -> tuple[dict[str, str], str]:
        lines = uboot.select(uboot.MK2, tree, variant, log=lambda _: None).read_text().splitlines()
        header = (tree / uboot.MK2.env_header).read_text()
        fdt = [ln.strip() for ln in header.splitlines() if '"fdtfile=' in ln]
        assert len(fdt) == 1
        return _symbols(lines), fdt[0]

    default, default_fdt = configured(uboot.Variant())
    assert default == _symbols(plain)  # the defaults are the vendor's defconfig, untouched
    assert default_fdt == '"fdtfile=imx6ulz-usbarmory.dtb\\0"\t\\'
    assert default["CONFIG_SYS_BOOT_DEV_MICROSD"] == "y" and default["CONFIG_SYS_DDR_512MB"] == "y"
    assert default["CONFIG_ENV_OFFSET"] == "0x100000"  # the environment the image keeps free

    emmc, emmc_fdt = configured(uboot.Variant(boot_medium="eMMC"))
    assert _changed(default, emmc) == {"CONFIG_SYS_BOOT_DEV_MICROSD": ("y", "n"),
                                       "CONFIG_SYS_BOOT_DEV_EMMC": ("n", "y"),
                                       "CONFIG_SYS_MMC_ENV_DEV": ("0", "1")}
    assert emmc_fdt == default_fdt

    big, big_fdt = configured(uboot.Variant(memory="1G"))
    changed = _changed(default, big)
    assert changed.pop("CONFIG_SYS_DDR_512MB") == ("y", "n")
    assert changed.pop("CONFIG_SYS_DDR_1GB") == ("n", "y")
    assert changed.pop("CONFIG_IMX_CONFIG") == ('"board/inversepath/usbarmory-mark-two/imximage-512mb.cfg"',
                                                '"board/inversepath/usbarmory-mark-two/imximage-1gb.cfg"')
    # The vendor's Kconfig defaults SYS_MEMTEST_END "if SYS_DDR_1G" (sic), so 1 GiB boards get U-Boot's
    # generic default: only the `mtest` command's default range; the vendor's own build does the same.
    assert changed == {"CONFIG_SYS_MEMTEST_END": ("0xa0000000", "0x1000")}, changed
    assert big_fdt == default_fdt

    ul, ul_fdt = configured(uboot.Variant(soc="imx6ul"))
    assert ul == default
    assert ul_fdt == '"fdtfile=imx6ul-usbarmory.dtb\\0"\t\\'

    both, both_fdt = configured(uboot.Variant("eMMC", "1G", "imx6ul"))
    assert _changed(default, both).keys() == _changed(default, emmc).keys() | _changed(default, big).keys()
    assert both_fdt == ul_fdt


def _symbols(lines: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in lines:
        if line.startswith("CONFIG_"):
            name, value = line.split("=", 1)
            out[name] = value
        elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
            out[line[2:-11]] = "n"
    return out


def _changed(a: dict[str, str], b: dict[str, str]) -> dict[str, tuple[str, str]]:
    return {k: (a.get(k, "n"), b.get(k, "n")) for k in a.keys() | b.keys() if a.get(k, "n") != b.get(k, "n")}


@pytest.mark.slow
@pytest.mark.integration
def test_real_build_of_the_default_variant(
    sources: tuple[Path, Path], tmp_path: Path, uboot_patch: Path
) -> None:
    cache = _seeded_cache(tmp_path / "cache", sources)
    lines: list[str] = []
    built = uboot.bootloader(uboot.MK2, uboot.Variant(), cache_dir=cache, mirror="file:///nonexistent",
                             offset=OFFSET, limit=LIMIT, patch_file=uboot_patch, log=lines.append)
    assert not built.cached
    assert any("compiling" in ln for ln in lines) and any("mkimage" in ln for ln in lines)
    assert len(lines) < 20, lines  # a line per phase, not make's output
    data = built.path.read_bytes()
    # i.MX Image Vector Table: tag 0xD1, length 0x0020 (big endian), version 0x40-0x43.
    assert data[0] == 0xD1 and data[1:3] == b"\x00\x20" and 0x40 <= data[3] <= 0x43
    assert 300_000 < len(data) <= LIMIT - OFFSET
    assert b"fdtfile=imx6ulz-usbarmory.dtb\x00" in data and b"U-Boot 2025.01" in data
    rec = built.record
    assert rec["sha256"] == hashlib.sha256(data).hexdigest() and rec["size"] == len(data)
    assert rec["tarball"]["sha256"] == uboot.MK2.tarball_sha256
    assert rec["patch"]["sha256"] == uboot.MK2.patch_sha256
    assert rec["tarball"]["signature"].startswith("verified")
    assert rec["switches"] == {"boot_medium": "uSD", "memory": "512M", "soc": "imx6ulz"}
    assert rec["cross_compiler"].startswith(uboot.CROSS_COMPILE + "gcc")
    assert built.path.parent.name == rec["cache_key"]
    entries = sorted(p.name for p in (cache / "u-boot").iterdir())
    assert entries == sorted(["sources", rec["cache_key"]]), entries  # no build directory left

    t0 = time.monotonic()
    again = uboot.bootloader(uboot.MK2, uboot.Variant(), cache_dir=cache, mirror="file:///nonexistent",
                             offset=OFFSET, limit=LIMIT, log=lambda _: None)  # no patch needed now
    assert again.cached and again.path == built.path and again.record == rec
    assert time.monotonic() - t0 < 5

    # The same U-Boot for a board whose environment started lower: refused, and nothing new cached.
    with pytest.raises(BuildError, match="would reach byte") as e:
        uboot.bootloader(uboot.MK2, uboot.Variant(), cache_dir=cache, mirror="file:///nonexistent",
                         offset=OFFSET, limit=OFFSET + len(data) - 1, log=lambda _: None)
    _one_line(e.value)
    assert sorted(p.name for p in (cache / "u-boot").iterdir()) == entries


# --- the real CLI ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_mk2(mk2_build: BuildResult) -> Path:
    """The session's mk2 image: `invoke build-image --board mk2` with nothing but --uboot-patch
    (tests/conftest.py; shared cache: the rootfs and the U-Boot are reused when present)."""
    return mk2_build.out_dir


@pytest.mark.slow
@pytest.mark.integration
def test_cli_mk2_build_writes_the_built_u_boot(cli_mk2: Path) -> None:
    m = json.loads((cli_mk2 / "manifest.json").read_text())
    bl = m["disk"]["bootloader"]
    assert bl["source"] == "u-boot from pinned sources" and bl["offset"] == 1024
    assert bl["tarball"]["sha256"] == uboot.MK2.tarball_sha256
    assert bl["patch"]["sha256"] == uboot.MK2.patch_sha256
    assert bl["switches"] == {"boot_medium": "uSD", "memory": "512M", "soc": "imx6ulz"}
    image = cli_mk2 / m["files"]["image"]
    with image.open("rb") as f:
        f.seek(1024)
        written = f.read(bl["size"])
        f.seek(1 << 20)
        env_area = f.read(8192)
    assert hashlib.sha256(written).hexdigest() == bl["sha256"]
    assert written[0] == 0xD1 and b"fdtfile=imx6ulz-usbarmory.dtb\x00" in written
    assert env_area == bytes(8192), "the U-Boot environment at 1 MiB must stay free"
    ext = Image(image).read("/boot/extlinux/extlinux.conf").decode()
    assert "fdt /boot/dtbs/imx6ulz-usbarmory.dtb" in ext


@pytest.mark.slow
@pytest.mark.integration
def test_imx6ul_device_tree_compiles_from_the_shared_board(
    cli_mk2: Path, settings: config.Settings, tmp_path: Path
) -> None:
    """The imx6ul variant: same board .dtsi on the kernel's imx6ul.dtsi, its own compatible."""
    m = json.loads((cli_mk2 / "manifest.json").read_text())
    series = ".".join(m["kernel_version"].split(".")[:2])
    includes, _ = devicetree.kernel_includes(series, settings, log=lambda _: None)
    sources = {}
    for soc in ("imx6ulz", "imx6ul"):
        dt = boards.MK2.device_tree.for_soc(soc)  # type: ignore[union-attr]
        assert dt.dts_file is not None
        out = tmp_path / dt.dtb_name
        devicetree.compile_dts(devicetree.DTS_DIR / dt.dts_file, includes, out)
        sources[soc] = subprocess.run(["dtc", "-q", "-I", "dtb", "-O", "dts", str(out)], capture_output=True,
                                      text=True, check=True).stdout.replace("\\0", " ")
    assert "usbarmory,imx6ul-usbarmory-mk2" in sources["imx6ul"] and "fsl,imx6ul" in sources["imx6ul"]
    assert "imx6ulz" not in sources["imx6ul"] and "fsl,imx6ull" not in sources["imx6ul"]
    for soc, text in sources.items():
        assert 'label = "LED_WHITE"' in text and 'label = "LED_BLUE"' in text, soc
        assert 'dr_mode = "peripheral"' in text and "non-removable" in text, soc
    installed = Image(cli_mk2 / m["files"]["image"]).read("/boot/dtbs/imx6ulz-usbarmory.dtb")
    assert installed == (tmp_path / "imx6ulz-usbarmory.dtb").read_bytes()


@pytest.mark.slow
@pytest.mark.integration
def test_imx6ul_setting_installs_and_names_the_imx6ul_dtb(
    cli_mk2: Path, settings: config.Settings, build_ssh_key: Path, tmp_path: Path
) -> None:
    """--soc imx6ul: the image carries imx6ul-usbarmory.dtb and extlinux.conf names it (the bootloader
    is given, so no second U-Boot is built here)."""
    from image.build import build_image

    loader = tmp_path / "u-boot.imx"
    loader.write_bytes(bytes([0xD1, 0x00, 0x20, 0x40]) + bytes(400_000))
    result = build_image(settings.replace(board="mk2", soc="imx6ul", output_dir=str(tmp_path / "out"),
                                          ssh_key=str(build_ssh_key)), bootloader=loader, log=lambda _: None)
    image = Image(result.image)
    ext = image.read("/boot/extlinux/extlinux.conf").decode()
    assert "fdt /boot/dtbs/imx6ul-usbarmory.dtb" in ext
    assert image.stat("/boot/dtbs/imx6ulz-usbarmory.dtb") is None
    dtb = tmp_path / "installed.dtb"
    dtb.write_bytes(image.read("/boot/dtbs/imx6ul-usbarmory.dtb"))
    compat = subprocess.run(["fdtget", "-t", "s", str(dtb), "/", "compatible"], capture_output=True,
                            text=True, check=True).stdout
    assert "usbarmory,imx6ul-usbarmory-mk2" in compat and "imx6ulz" not in compat
    assert result.manifest["device_tree"]["name"] == "imx6ul-usbarmory.dtb"
    assert result.manifest["disk"]["bootloader"]["source"] == "file"
