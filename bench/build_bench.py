"""Image build benchmark: numbers measured side by side in one run, printed as ratios.

    .venv/bin/python bench/build_bench.py [--cold] [--repro]

- cold (``--cold``): a full qemu build with an empty cache directory (rootfs, apt downloads, device
  tree includes all from scratch; Clef passed as path:FILE so the Go build is not measured), then
  in the same run a baseline mmdebstrap of the same package set with the same minimum setup
  (explicit initramfs module list, one initramfs) but no apt cache and no image assembly.
  Target: ratio <= 1.3.
- warm: a rebuild after an overlay change (a copy of overlay/ with one file changed), with the
  rootfs cached. Target: <= 90 s on 2 cores.
- size: compressed image size (target <= 150 MB) and mapped blocks in the bmap.
- ``--repro``: two warm builds from identical inputs (the second reuses the first's host keys,
  which are otherwise new in every image); prints whether the image hashes match.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from clef_armory import clef as clef_mod
from clef_armory import config
from image import archive, rootfs
from image.build import BuildResult, build_image
from image.inspect import Image
from image.overlay import OVERLAY_DIR

MB = 1_000_000


def _key(tmp: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "id")], check=True)
    return tmp / "id.pub"


def _build(settings: config.Settings, **kwargs: object) -> tuple[BuildResult, float]:
    t0 = time.monotonic()
    result = build_image(settings, log=lambda _m: None, **kwargs)  # type: ignore[arg-type]
    return result, time.monotonic() - t0


def _baseline(spec: rootfs.RootfsSpec, tmp: Path) -> float:
    cmd = rootfs.mmdebstrap_command(spec, tmp / "baseline.tar", tmp / "unused", tmp / "pkgs",
                                    keep_debs=False, tuned=True)
    env = dict(os.environ, INITRD="No", SOURCE_DATE_EPOCH=str(int(time.time())))
    t0 = time.monotonic()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - t0


def _differences(a: Path, b: Path, tmp: Path) -> list[str]:
    """What differs between two images: file contents (rdump + diff) and, failing that, byte ranges."""
    trees = []
    for name, image in (("ta", a), ("tb", b)):
        dest = tmp / name
        dest.mkdir()
        subprocess.run(["debugfs", "-R", f"rdump / {dest}", f"{image}?offset={5 << 20}"],
                       capture_output=True, check=False)
        trees.append(dest)
    diff = subprocess.run(["diff", "-rq", "--no-dereference", str(trees[0]), str(trees[1])],
                          capture_output=True, text=True, check=False)
    lines = [line.replace(str(tmp), "") for line in diff.stdout.splitlines()][:40]
    if not lines:
        cmp = subprocess.run(["cmp", "-l", str(a), str(b)], capture_output=True, text=True, check=False)
        offsets = [int(line.split()[0]) - 1 for line in cmp.stdout.splitlines()[:2000]]
        blocks = sorted({o // 4096 for o in offsets})
        lines = [f"same file contents; {len(offsets)}+ bytes differ in 4 KiB blocks {blocks[:20]}"]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cold", action="store_true", help="also measure a cold build and the baseline")
    parser.add_argument("--repro", action="store_true", help="build twice and compare image hashes")
    args = parser.parse_args()

    base = config.load()
    clef_armv7 = clef_mod.acquire(base.clef_source, version=base.clef_version, arch="armv7",
                                  cache_dir=base.cache_path, log=lambda _m: None)
    report: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="build-bench-", dir="/var/tmp") as tmpdir:
        tmp = Path(tmpdir)
        settings = base.replace(board="qemu", output_dir=str(tmp / "out"), ssh_key=str(_key(tmp)),
                                clef_source=f"path:{clef_armv7.path}")
        if args.cold:
            cold_settings = settings.replace(cache_dir=str(tmp / "cold-cache"))
            cold, cold_s = _build(cold_settings)
            spec = rootfs.RootfsSpec(archives=archive.resolve(
                settings.suite, settings.mirror, settings.security_mirror, settings.security_updates,
                settings.cache_path, log=lambda _m: None))
            bare_s = _baseline(spec, tmp)
            report["cold_build_s"] = round(cold_s, 1)
            report["baseline_mmdebstrap_s"] = round(bare_s, 1)
            report["cold_ratio"] = round(cold_s / bare_s, 2)
            report["cold_steps"] = {k: round(v, 1) for k, v in cold.timings}
            shutil.rmtree(tmp / "cold-cache", ignore_errors=True)

        _first, first_s = _build(settings)  # warms the cache if needed
        changed = tmp / "overlay"
        shutil.copytree(OVERLAY_DIR, changed)
        motd = changed / "etc" / "motd.j2"
        motd.write_text("clef-armory bench {{ cfg.board.name }}\n")
        warm, warm_s = _build(settings, overlay_dir=changed)
        report["first_build_s"] = round(first_s, 1)
        report["warm_rebuild_after_overlay_change_s"] = round(warm_s, 1)
        report["warm_steps"] = {k: round(v, 1) for k, v in warm.timings}
        zst = warm.out_dir / warm.manifest["files"]["compressed"]
        report["compressed_mb"] = round(zst.stat().st_size / MB, 1)
        report["image_mb"] = round(warm.image.stat().st_size / MB, 1)
        report["bmap_mapped_blocks"] = warm.manifest["disk"]["bmap_mapped_blocks"]
        report["bmap_block_size"] = warm.manifest["disk"]["bmap_block_size"]

        if args.repro:
            keys = tmp / "keys"
            keys.mkdir()
            image = Image(warm.image)
            for name in ("ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"):
                (keys / name).write_bytes(image.read(f"/etc/ssh/{name}"))
                (keys / name).chmod(0o600)
            a, _ = _build(settings.replace(output_dir=str(tmp / "a")), host_keys_from=keys)
            b, _ = _build(settings.replace(output_dir=str(tmp / "b")), host_keys_from=keys)
            report["repro_image_sha256_equal"] = a.manifest["image_sha256"] == b.manifest["image_sha256"]
            report["repro_zst_equal"] = (
                (a.out_dir / a.manifest["files"]["compressed"]).read_bytes()
                == (b.out_dir / b.manifest["files"]["compressed"]).read_bytes()
            )
            if not report["repro_image_sha256_equal"]:
                report["repro_differences"] = _differences(a.image, b.image, tmp)
    print(json.dumps(report, indent=1))
    if "cold_ratio" in report:
        print(f"cold build / bare mmdebstrap = {report['cold_ratio']} (target <= 1.3)")
    print(f"warm rebuild after overlay change: {report['warm_rebuild_after_overlay_change_s']} s "
          f"(target <= 90 s on 2 cores)")
    print(f"compressed image: {report['compressed_mb']} MB (target <= 150 MB), "
          f"{report['bmap_mapped_blocks']} mapped blocks of {report['bmap_block_size']} bytes")


if __name__ == "__main__":
    main()
