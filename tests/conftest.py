"""Shared fixtures: the real Clef binary for the laptop's architecture, and a built Mk II image."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from clef_armory import clef, config
from image.build import BuildResult


@pytest.fixture(scope="session")
def settings() -> config.Settings:
    """The project's defaults from invoke.yaml."""
    return config.load()


@pytest.fixture(scope="session")
def clef_binary(settings: config.Settings) -> Path:
    """A real Clef built from source (cached under the cache dir) for this machine."""
    binary = clef.acquire(
        "source", version=settings.clef_version, arch=clef.host_arch(), cache_dir=settings.cache_path
    )
    return binary.path


@pytest.fixture(scope="session")
def clef_binary_armv7(settings: config.Settings) -> clef.ClefBinary:
    """The device's Clef (ARMv7), built from source and cached."""
    return clef.acquire(
        "source", version=settings.clef_version, arch="armv7", cache_dir=settings.cache_path
    )


REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO.parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def uboot_patch() -> Path:
    """A byte-identical local copy of the pinned Mk II U-Boot board patch (GitHub is unreachable in CI):
    pass it as --uboot-patch / ``patch_file``; the build still checks its pinned sha256."""
    from image import uboot

    path = FIXTURES / "u-boot" / uboot.MK2.patch_name
    if not path.is_file():
        pytest.fail(f"missing test fixture {path} (shared/fixtures/ must sit beside the clone)")
    return path


@pytest.fixture(scope="session")
def build_ssh_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh admin public key for test builds (the private half stays in the test's temp dir)."""
    d = tmp_path_factory.mktemp("build-sshkey")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test@laptop",
                    "-f", str(d / "id_ed25519")], check=True)
    return d / "id_ed25519.pub"


@pytest.fixture(scope="session")
def mk2_build(tmp_path_factory: pytest.TempPathFactory, build_ssh_key: Path,
              uboot_patch: Path) -> BuildResult:
    """One real mk2 image for the whole session, built the way a user does: `invoke build-image --board
    mk2` with only --uboot-patch (GitHub is unreachable in CI), so it carries the U-Boot built from the
    pinned sources. The rootfs and U-Boot caches are reused when present."""
    out = tmp_path_factory.mktemp("mk2-out")
    result = subprocess.run([sys.executable, "-m", "invoke", "build-image", "--board", "mk2", "--output",
                             str(out), "--ssh-key", str(build_ssh_key), "--uboot-patch", str(uboot_patch)],
                            cwd=REPO, capture_output=True, text=True, check=False, timeout=3000)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert "U-Boot 2025.01 for mk2 (uSD, 512M, imx6ulz" in result.stdout
    manifest = json.loads((out / "mk2" / "manifest.json").read_text())
    return BuildResult(out / "mk2", out / "mk2" / manifest["files"]["image"], manifest, ())


@pytest.fixture(scope="session")
def geth_binary(settings: config.Settings) -> Path:
    """A real geth for this machine, the same go-ethereum version as Clef (built once, cached)."""
    from clef_armory import geth

    return geth.host_geth(settings.clef_version, settings.cache_path)
