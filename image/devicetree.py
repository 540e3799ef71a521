"""The board's device tree blob, installed at /boot/dtbs/<name> in the image.

Mk I: Debian's kernel ships ``imx53-usbarmory.dtb``; it is copied from the rootfs.
Mk II: no kernel ships one, so our own ``image/dts/imx6ulz-usbarmory.dts`` is compiled at build
time against the i.MX6UL/ULL/ULZ ``.dtsi`` files and ``dt-bindings`` headers of Debian's kernel
source of the same version (``linux-source-X.Y``). Only those files are extracted from the source
tarball, once, and cached by the package version.
"""

from __future__ import annotations

import glob
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clef_armory.config import Settings
from clef_armory.errors import BuildError, PrerequisiteError
from image import debs
from image.boards import DeviceTree

DTS_DIR = Path(__file__).resolve().parent / "dts"
Log = Callable[[str], None]


def install(dt: DeviceTree, tree: Path, dest: Path, settings: Settings, log: Log = print) -> dict[str, Any]:
    """Put the board's dtb at `dest` (inside `tree`); returns what the manifest records."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dt.from_kernel:
        found = sorted(glob.glob(str(tree / dt.from_kernel)))
        if len(found) != 1:
            raise BuildError(f"expected one {dt.from_kernel} in the rootfs, found {len(found)}")
        shutil.copyfile(found[0], dest)
        origin = "/" + Path(found[0]).relative_to(tree).as_posix()
        info: dict[str, Any] = {"source": "debian-kernel", "from": origin}
    elif dt.dts_file:
        kernel_series = _kernel_series(tree)
        include_dir, source_version = kernel_includes(kernel_series, settings, log)
        compile_dts(DTS_DIR / dt.dts_file, include_dir, dest)
        info = {"source": "image/dts/" + dt.dts_file, "linux_source": source_version}
    else:
        raise BuildError(f"device tree {dt.dtb_name} has no source")
    dest.chmod(0o644)
    info["name"] = dt.dtb_name
    info["path"] = "/" + dest.relative_to(tree).as_posix()
    return info


def _kernel_series(tree: Path) -> str:
    """"6.12" from the rootfs's /usr/lib/modules/6.12.117-armmp."""
    versions = [p.name for p in (tree / "usr" / "lib" / "modules").iterdir()]
    if len(versions) != 1:
        raise BuildError(f"expected one kernel in the rootfs, found {versions}")
    return ".".join(versions[0].split(".")[:2])


def kernel_includes(series: str, settings: Settings, log: Log = print) -> tuple[Path, str]:
    """A directory with the i.MX6UL dtsi files and dt-bindings of linux-source-<series> (cached)."""
    package = f"linux-source-{series}"
    deb, version = debs.fetch(package, mirror=settings.mirror, suite=settings.suite,
                              cache_dir=settings.cache_path, log=log)
    out = settings.cache_path / "dtsi" / f"{package}_{version}"
    if (out / ".complete").is_file():
        return out, version
    log(f"  extracting the i.MX6UL device tree includes from {deb.name} (once per kernel version)")
    with tempfile.TemporaryDirectory(dir=settings.cache_path) as tmp:
        work = Path(tmp)
        debs.extract(deb, [f"usr/src/linux-source-{series}.tar.*"], work)
        tarballs = list((work / "usr" / "src").glob(f"linux-source-{series}.tar.*"))
        if not tarballs:
            raise BuildError(f"{deb.name} has no kernel source tarball")
        top = f"linux-source-{series}"
        members = [
            f"{top}/arch/arm/boot/dts/nxp/imx/imx6ul*.dtsi",
            f"{top}/arch/arm/boot/dts/nxp/imx/imx6ul*.h",
            f"{top}/include/dt-bindings",
            # dt-bindings/input/linux-event-codes.h is a symlink to this uapi header.
            f"{top}/include/uapi/linux/input-event-codes.h",
        ]
        result = subprocess.run(["tar", "-x", "-f", str(tarballs[0]), "-C", str(work), "--wildcards",
                                 *members], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise BuildError(f"cannot extract device tree includes: {result.stderr.strip()[:200]}")
        staged = work / "includes"
        staged.mkdir()
        for dtsi in (work / top / "arch/arm/boot/dts/nxp/imx").iterdir():
            shutil.copy2(dtsi, staged / dtsi.name)
        shutil.copytree(work / top / "include" / "dt-bindings", staged / "dt-bindings", symlinks=True)
        shutil.copytree(work / top / "include" / "uapi", staged / "uapi")
        (staged / ".complete").write_text(version + "\n")
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        staged.rename(out)
    return out, version


def compile_dts(dts: Path, include_dir: Path, dest: Path) -> None:
    """cpp (for #include and macros) then dtc, as the kernel's own build does."""
    for tool in ("cpp", "dtc"):
        if shutil.which(tool) is None:
            package = "cpp" if tool == "cpp" else "device-tree-compiler"
            raise PrerequisiteError(f"{tool} is not installed; run: sudo apt-get install {package}")
    pre = subprocess.run(
        ["cpp", "-nostdinc", "-undef", "-D__DTS__", "-x", "assembler-with-cpp", "-P",
         "-I", str(include_dir), "-I", str(dts.parent), str(dts)],
        capture_output=True, text=True, check=False,
    )
    if pre.returncode != 0:
        errors = [line for line in pre.stderr.splitlines() if "error" in line] or [pre.stderr.strip()]
        raise BuildError(f"preprocessing {dts.name} failed: {errors[0].strip()}")
    tmp = dest.with_name(dest.name + ".tmp")
    dtc = subprocess.run(["dtc", "-q", "-I", "dts", "-O", "dtb", "-o", str(tmp), "-"],
                         input=pre.stdout, capture_output=True, text=True, check=False)
    if dtc.returncode != 0:
        tmp.unlink(missing_ok=True)
        errors = [line for line in dtc.stderr.splitlines() if "rror" in line] or [dtc.stderr.strip()]
        raise BuildError(f"compiling {dts.name} failed: {errors[0].strip()}")
    tmp.replace(dest)
