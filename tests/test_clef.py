"""Clef acquisition: real builds, real gpg, a real HTTP server on loopback, real `clef init`."""

from __future__ import annotations

import functools
import http.server
import io
import os
import shutil
import socketserver
import stat
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from clef_armory import clef
from clef_armory.errors import ClefError, VerificationError

pytestmark = pytest.mark.integration

VERSION = "1.17.3"


def test_clef_init_leaves_masterseed_0400(clef_binary: Path, tmp_path: Path) -> None:
    """`clef init` with the password on stdin (never argv) creates masterseed.json with mode 0400."""
    configdir = tmp_path / "clef"
    password = "correct horse battery staple"
    proc = subprocess.run(
        [str(clef_binary), "--configdir", str(configdir), "--keystore", str(tmp_path / "ks"),
         "--suppress-bootwarn", "--lightkdf", "init"],
        input=f"{password}\n{password}\n", capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    seed = configdir / "masterseed.json"
    assert stat.S_IMODE(seed.stat().st_mode) == 0o400
    assert stat.S_IMODE(configdir.stat().st_mode) == 0o700
    assert password not in seed.read_text()
    assert '"description": "Clef seed"' in seed.read_text() or "Clef seed" in seed.read_text()


def test_armv7_build_is_32bit_arm_and_runs_under_qemu(clef_binary_armv7: clef.ClefBinary) -> None:
    head = clef_binary_armv7.path.read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and head[4] == 1  # ELFCLASS32
    assert int.from_bytes(head[18:20], "little") == 40  # EM_ARM
    out = subprocess.run(
        ["qemu-arm-static", str(clef_binary_armv7.path), "--version"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert f"Clef version {VERSION}" in out.stdout
    assert clef_binary_armv7.manifest()["source"] == "source"
    assert len(clef_binary_armv7.sha256) == 64


def test_source_build_is_cached_by_inputs(settings: object, clef_binary: Path) -> None:
    # The fixture built (or reused) it; the cache path names version, GOARCH and the Go version.
    assert clef_binary.parent.name.startswith(f"{VERSION}-{clef.ARCHS[clef.host_arch()].goarch}")
    assert "-go1." in clef_binary.parent.name


# --- path:FILE -----------------------------------------------------------------------------------


def test_path_source_accepts_matching_binary(clef_binary_armv7: clef.ClefBinary, tmp_path: Path) -> None:
    got = clef.acquire(
        f"path:{clef_binary_armv7.path}", version=VERSION, arch="armv7", cache_dir=tmp_path
    )
    assert got.source == "path" and got.sha256 == clef_binary_armv7.sha256


def test_path_source_refuses_wrong_arch(clef_binary: Path, tmp_path: Path) -> None:
    with pytest.raises(VerificationError, match="not for armv7"):
        clef.acquire(f"path:{clef_binary}", version=VERSION, arch="armv7", cache_dir=tmp_path)


def test_path_source_refuses_non_elf_and_missing(tmp_path: Path) -> None:
    script = tmp_path / "clef"
    script.write_text("#!/bin/sh\necho Clef version 1.17.3-stable\n")
    script.chmod(0o755)
    with pytest.raises(VerificationError, match="not an ELF"):
        clef.acquire(f"path:{script}", version=VERSION, arch="amd64", cache_dir=tmp_path)
    with pytest.raises(ClefError, match="does not exist"):
        clef.acquire(f"path:{tmp_path / 'nope'}", version=VERSION, arch="amd64", cache_dir=tmp_path)


def test_unknown_source_and_arch(tmp_path: Path) -> None:
    with pytest.raises(ClefError, match="unknown Clef source"):
        clef.acquire("ftp", version=VERSION, arch="amd64", cache_dir=tmp_path)
    with pytest.raises(ClefError, match="unknown architecture"):
        clef.acquire("source", version=VERSION, arch="mips", cache_dir=tmp_path)


# --- release: a signed tarball served from loopback --------------------------------------------


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTP server on 127.0.0.1 serving a directory, standing in for the builds store."""
    root = tmp_path / "store"
    root.mkdir()
    handler = functools.partial(_Quiet, directory=str(root))
    with socketserver.TCPServer(("127.0.0.1", 0), handler) as httpd:
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{httpd.server_address[1]}/builds/", root
        finally:
            httpd.shutdown()


def _gpg(home: Path, *args: str, input_data: bytes | None = None) -> bytes:
    return subprocess.run(
        ["gpg", "--homedir", str(home), "--batch", "--no-tty", "--passphrase", "", *args],
        input=input_data, capture_output=True, check=True, timeout=120,
    ).stdout  # fmt: skip


def _make_key(home: Path, uid: str) -> tuple[str, Path]:
    home.mkdir(mode=0o700)
    _gpg(home, "--pinentry-mode", "loopback", "--quick-gen-key", uid, "ed25519", "sign", "never")
    listing = _gpg(home, "--with-colons", "--list-keys").decode()
    fpr = next(ln.split(":")[9] for ln in listing.splitlines() if ln.startswith("fpr:"))
    pub = home / "pub.asc"
    pub.write_bytes(_gpg(home, "--armor", "--export", fpr))
    return fpr, pub


def _make_release(store: Path, arm_clef: Path) -> Path:
    name = clef.release_name(VERSION, clef.ARCHS["armv7"])
    (store / "builds").mkdir(exist_ok=True)
    archive = store / "builds" / f"{name}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(arm_clef, arcname=f"{name}/clef")
        data = b"GNU GENERAL PUBLIC LICENSE\n"
        info = tarfile.TarInfo(f"{name}/COPYING")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return archive


def _sign(home: Path, archive: Path) -> None:
    sig = archive.with_name(archive.name + ".asc")
    _gpg(home, "--pinentry-mode", "loopback", "--armor", "--detach-sign", "--output", str(sig),
         str(archive))  # fmt: skip


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str, Path]]:
    """Two independent signing keys made with real gpg: the pinned one and a stranger's."""
    base = tmp_path_factory.mktemp("gpg")
    made = {}
    for who in ("pinned", "stranger"):
        fpr, pub = _make_key(base / who, f"{who} builder <{who}@example.invalid>")
        made[who] = (base / who, fpr, pub)
    return made


def _acquire_release(url: str, cache: Path, keys: dict[str, tuple[Path, str, Path]]) -> clef.ClefBinary:
    _, fpr, pub = keys["pinned"]
    return clef.acquire(
        "release", version=VERSION, arch="armv7", cache_dir=cache,
        release_base_url=url, keyring=pub, fingerprint=fpr, log=lambda _: None,
    )  # fmt: skip


def test_release_good_signature_accepted(
    served: tuple[str, Path], keys: dict[str, tuple[Path, str, Path]],
    clef_binary_armv7: clef.ClefBinary, tmp_path: Path,
) -> None:  # fmt: skip
    url, store = served
    archive = _make_release(store, clef_binary_armv7.path)
    _sign(keys["pinned"][0], archive)
    got = _acquire_release(url, tmp_path / "cache", keys)
    assert got.source == "release" and got.sha256 == clef_binary_armv7.sha256
    assert (got.path.parent / "release.json").exists()
    # Second call is served from the cache even with the store gone.
    shutil.rmtree(store / "builds")
    assert _acquire_release(url, tmp_path / "cache", keys).path == got.path


def test_release_tampered_archive_rejected(
    served: tuple[str, Path], keys: dict[str, tuple[Path, str, Path]],
    clef_binary_armv7: clef.ClefBinary, tmp_path: Path,
) -> None:  # fmt: skip
    url, store = served
    archive = _make_release(store, clef_binary_armv7.path)
    _sign(keys["pinned"][0], archive)
    with archive.open("r+b") as f:  # flip one byte after signing
        f.seek(archive.stat().st_size // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(VerificationError, match="bad signature"):
        _acquire_release(url, tmp_path / "cache", keys)
    assert not any((tmp_path / "cache").rglob("clef"))


def test_release_wrong_key_rejected(
    served: tuple[str, Path], keys: dict[str, tuple[Path, str, Path]],
    clef_binary_armv7: clef.ClefBinary, tmp_path: Path,
) -> None:  # fmt: skip
    url, store = served
    archive = _make_release(store, clef_binary_armv7.path)
    _sign(keys["stranger"][0], archive)
    with pytest.raises(VerificationError, match="not signed by the pinned key"):
        _acquire_release(url, tmp_path / "cache", keys)
    assert not any((tmp_path / "cache").rglob("clef"))


def test_release_missing_signature_rejected(
    served: tuple[str, Path], keys: dict[str, tuple[Path, str, Path]],
    clef_binary_armv7: clef.ClefBinary, tmp_path: Path,
) -> None:  # fmt: skip
    url, store = served
    _make_release(store, clef_binary_armv7.path)
    with pytest.raises(ClefError, match=r"cannot download the signature .*HTTP 404"):
        _acquire_release(url, tmp_path / "cache", keys)
    assert not any((tmp_path / "cache").rglob("clef"))


def test_pinned_key_in_repo_has_pinned_fingerprint(tmp_path: Path) -> None:
    out = subprocess.run(
        ["gpg", "--homedir", str(tmp_path), "--batch", "--with-colons", "--show-keys",
         str(clef.LINUX_BUILDER_KEY)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    fprs = [ln.split(":")[9] for ln in out.splitlines() if ln.startswith("fpr:")]
    assert fprs[0] == clef.LINUX_BUILDER_FINGERPRINT
    assert clef.release_name(VERSION, clef.ARCHS["armv7"]) == (
        "geth-alltools-linux-arm7-1.17.3-117e067f"
    )
