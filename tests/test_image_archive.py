"""The archives the rootfs is built from (image/archive.py).

A signed archive served from loopback (real gpg, real gpgv, real apt, real HTTP) stands in for the
mirror, so both states are reproducible: whole, and mid-sync (an index that does not match its
InRelease). One test reads the real Debian mirror and shows what it serves today.
"""

from __future__ import annotations

import email.utils
import functools
import hashlib
import http.server
import lzma
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clef_armory import config
from clef_armory.errors import BuildError
from image import archive, rootfs

SUITE = "testsuite"


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def _gpg(home: Path, *args: str) -> bytes:
    return subprocess.run(["gpg", "--homedir", str(home), "--batch", "--no-tty", "--passphrase", "", *args],
                          capture_output=True, check=True, timeout=120).stdout


class LocalArchive:
    """dists/<suite>/{InRelease, main/binary-{armhf,all}/Packages.xz}, signed with a fresh key."""

    def __init__(self, root: Path, home: Path) -> None:
        self.root, self.home = root, home
        home.mkdir(mode=0o700)
        _gpg(home, "--pinentry-mode", "loopback", "--quick-gen-key", "archive test <t@example.org>",
             "ed25519", "sign", "never")
        self.keyring = root.parent / "keyring.gpg"
        self.keyring.write_bytes(_gpg(home, "--export"))

    def publish(self, suite: str, packages: str = "", date: int | None = None) -> None:
        dist = self.root / "dists" / suite
        sums = []
        for arch in ("armhf", "all"):
            plain = packages.encode()
            index = dist / "main" / f"binary-{arch}"
            index.mkdir(parents=True, exist_ok=True)
            (index / "Packages.xz").write_bytes(lzma.compress(plain))
            for name, data in ((f"main/binary-{arch}/Packages", plain),
                               (f"main/binary-{arch}/Packages.xz", (index / "Packages.xz").read_bytes())):
                sums.append(f" {hashlib.sha256(data).hexdigest()} {len(data):8d} {name}")
        stamp = email.utils.formatdate(date if date is not None else time.time() - 60, usegmt=True)
        release = "\n".join([f"Suite: {suite}", f"Codename: {suite}", "Version: 13.9", f"Date: {stamp}",
                             "Architectures: armhf all", "Components: main", "Acquire-By-Hash: no",
                             "SHA256:", *sums]) + "\n"
        (dist / "Release").write_text(release)
        _gpg(self.home, "--yes", "--clearsign", "-o", str(dist / "InRelease"), str(dist / "Release"))

    def truncate_index(self, suite: str) -> None:
        """What a mirror mid-sync serves: an index that is not the one InRelease describes."""
        index = self.root / "dists" / suite / "main" / "binary-armhf" / "Packages.xz"
        index.write_bytes(index.read_bytes()[:-8])


@pytest.fixture()
def local(tmp_path: Path) -> Iterator[tuple[str, LocalArchive]]:
    root = tmp_path / "mirror"
    root.mkdir()
    repo = LocalArchive(root, tmp_path / "gnupg")
    handler = functools.partial(_Quiet, directory=str(root))
    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler) as httpd:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{httpd.server_address[1]}", repo
        finally:
            httpd.shutdown()


def _resolve(url: str, repo: LocalArchive, tmp_path: Path, mode: str = "include",
             log: list[str] | None = None) -> archive.ArchiveState:
    lines = log if log is not None else []
    return archive.resolve(SUITE, url, url, mode, tmp_path / "cache", log=lines.append, keyring=repo.keyring)


# --- pure -------------------------------------------------------------------------------------------

_INRELEASE = """-----BEGIN PGP SIGNED MESSAGE-----
Hash: SHA512

Suite: stable
Version: 13.8
Date: Sat, 21 Nov 2026 09:15:44 UTC
SHA256:
 aaaa 53392187 main/binary-armhf/Packages
 bbbb  9246996 main/binary-armhf/Packages.xz
 cccc 24089534 main/binary-all/Packages
 dddd 1 contrib/binary-armhf/Packages
-----BEGIN PGP SIGNATURE-----
xyz
-----END PGP SIGNATURE-----
"""


def _state(text: str, security: str = archive.INCLUDED) -> archive.ArchiveState:
    base = archive.parse_inrelease(text, archive.Archive("http://m/debian", "trixie"))
    extras = (archive.parse_inrelease(text, archive.Archive("http://m/debian-security", "trixie-security")),)
    return archive.ArchiveState(base, extras if security == archive.INCLUDED else (), security)


def test_parse_inrelease_takes_date_version_and_the_main_indices() -> None:
    r = archive.parse_inrelease(_INRELEASE, archive.Archive("http://m/debian", "trixie"))
    assert r.version == "13.8"
    assert r.date == 1795252544
    assert r.indices == (("main/binary-all/Packages", "cccc"), ("main/binary-armhf/Packages", "aaaa"))
    assert r.record()["source"] == "deb http://m/debian trixie main"
    with pytest.raises(BuildError, match="no Date"):
        archive.parse_inrelease(_INRELEASE.replace("Date:", "X-Date:"), r.archive)
    with pytest.raises(BuildError, match="binary-armhf/Packages"):
        archive.parse_inrelease(_INRELEASE.replace(" aaaa", " aaaa x"), r.archive)


def test_rootfs_key_follows_the_indices_not_the_signature_date() -> None:
    key = rootfs.RootfsSpec(archives=_state(_INRELEASE)).key()
    resigned = _INRELEASE.replace("09:15:44", "10:00:00")
    assert rootfs.RootfsSpec(archives=_state(resigned)).key() == key
    fixed = _INRELEASE.replace(" aaaa", " eeee")  # new packages in the index
    assert rootfs.RootfsSpec(archives=_state(fixed)).key() != key
    without = rootfs.RootfsSpec(archives=_state(_INRELEASE, "unavailable: mid-sync")).key()
    assert without != key
    assert rootfs.RootfsSpec(archives=_state(_INRELEASE), packages=("vim",)).key() != key


def test_sources_and_warning() -> None:
    state = _state(_INRELEASE)
    assert state.sources() == ["deb http://m/debian trixie main",
                               "deb http://m/debian-security trixie-security main"]
    assert archive.warning(state) == []
    lines = archive.warning(_state(_INRELEASE, "unavailable: trixie-security: File has unexpected size"))
    assert any("WITHOUT Debian's security updates" in line for line in lines)
    assert any("File has unexpected size" in line for line in lines)


def test_settings_know_the_modes(tmp_path: Path) -> None:
    assert config.Settings().security_updates == "include"
    assert config.load().security_updates == "include"
    with pytest.raises(config.ConfigError, match="security_updates"):
        config.Settings(security_updates="maybe")


# --- a signed archive on loopback: real gpg, gpgv, apt ---------------------------------------------


@pytest.mark.integration
def test_whole_archives_are_all_used(local: tuple[str, LocalArchive], tmp_path: Path) -> None:
    url, repo = local
    for suite in (SUITE, f"{SUITE}-security", f"{SUITE}-updates"):
        repo.publish(suite)
    log: list[str] = []
    state = _resolve(url, repo, tmp_path, log=log)
    assert state.security_updates == archive.INCLUDED
    assert state.sources() == [f"deb {url} {SUITE} main", f"deb {url} {SUITE}-security main",
                               f"deb {url} {SUITE}-updates main"]
    assert log == []
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]  # the probe leaves nothing


@pytest.mark.integration
def test_mid_sync_security_index_is_left_out_loudly(local: tuple[str, LocalArchive], tmp_path: Path) -> None:
    url, repo = local
    for suite in (SUITE, f"{SUITE}-security", f"{SUITE}-updates"):
        repo.publish(suite, packages="Package: x\n")
    key_before = rootfs.RootfsSpec(archives=_resolve(url, repo, tmp_path)).key()
    repo.truncate_index(f"{SUITE}-security")
    log: list[str] = []
    state = _resolve(url, repo, tmp_path, log=log)
    assert state.security_updates.startswith(f"unavailable: {SUITE}-security: File has unexpected size")
    assert "Mirror sync in progress?" in state.security_updates
    assert state.sources() == [f"deb {url} {SUITE} main", f"deb {url} {SUITE}-updates main"]
    assert any("WITHOUT" in line for line in log) and any("unexpected size" in line for line in log)
    assert rootfs.RootfsSpec(archives=state).key() != key_before
    with pytest.raises(BuildError, match=r"security updates required but unavailable.*unexpected size"):
        _resolve(url, repo, tmp_path, mode="require")


@pytest.mark.integration
def test_new_fixes_change_the_key(local: tuple[str, LocalArchive], tmp_path: Path) -> None:
    url, repo = local
    for suite in (SUITE, f"{SUITE}-security", f"{SUITE}-updates"):
        repo.publish(suite)
    first = rootfs.RootfsSpec(archives=_resolve(url, repo, tmp_path)).key()
    repo.publish(f"{SUITE}-security")  # re-signed, same packages
    assert rootfs.RootfsSpec(archives=_resolve(url, repo, tmp_path)).key() == first
    repo.publish(f"{SUITE}-security", packages="Package: openssl\nVersion: 3.5.4-1~deb13u2\n")
    assert rootfs.RootfsSpec(archives=_resolve(url, repo, tmp_path)).key() != first


@pytest.mark.integration
def test_missing_security_suite_and_bad_signature(local: tuple[str, LocalArchive], tmp_path: Path) -> None:
    url, repo = local
    repo.publish(SUITE)
    state = _resolve(url, repo, tmp_path)  # no -security, no -updates at all (a suite like sid)
    assert state.sources() == [f"deb {url} {SUITE} main"]
    assert state.security_updates.startswith(f"unavailable: {SUITE}-security: cannot read")
    release = repo.root / "dists" / SUITE / "InRelease"
    release.write_text(release.read_text().replace("Version: 13.9", "Version: 13.10"))
    with pytest.raises(BuildError, match="bad signature"):
        _resolve(url, repo, tmp_path)
    assert state.record()[0]["version"] == "13.9"


@pytest.mark.integration
def test_off_uses_only_the_suite(local: tuple[str, LocalArchive], tmp_path: Path) -> None:
    url, repo = local
    repo.publish(SUITE)
    state = _resolve(url, repo, tmp_path, mode="off")
    assert (state.security_updates, len(state.sources())) == ("off", 1)


# --- the real mirror ----------------------------------------------------------------------------------


@pytest.mark.integration
def test_real_mirror_state(tmp_path: Path) -> None:
    """The mirror's InRelease files verify against Debian's keyring and name the point release;
    the extra suites are either whole or their problem is one line (printed: the state of today)."""
    s = config.load()
    log: list[str] = []
    state = archive.resolve(s.suite, s.mirror, s.security_mirror, "include", tmp_path, log=log.append)
    assert state.base.version.startswith("13.")
    assert state.sources()[0] == f"deb {s.mirror} {s.suite} main"
    if state.security_updates == archive.INCLUDED:
        assert len(state.sources()) == 3 and log == []
    else:
        assert state.security_updates.startswith("unavailable: ") and "\n" not in state.security_updates
        assert log
    print(f"mirror: {s.suite} {state.base.version}; security updates: {state.security_updates}")


@pytest.mark.integration
def test_require_security_updates_fails_fast_on_the_real_mirror(tmp_path: Path) -> None:
    """Through the real CLI, while the mirror serves mid-sync -security/-updates indices: one error
    line within seconds, before anything slow, and no image."""
    s = config.load()
    state = archive.resolve(s.suite, s.mirror, s.security_mirror, "include", tmp_path / "probe",
                            log=lambda _m: None)
    if state.security_updates == archive.INCLUDED:
        pytest.skip("the mirror serves whole -security/-updates indices now (the build would run)")
    key = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    out = tmp_path / "out"
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "invoke", "build-image", "--board", "qemu",
                             "--output", str(out), "--ssh-key", f"{key}.pub", "--require-security-updates"],
                            cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: security updates required but unavailable: ")
    assert "Mirror sync in progress?" in lines[0] and "Traceback" not in result.stderr
    assert "root filesystem" not in result.stdout
    assert time.monotonic() - started < 120
    assert not [p for p in out.rglob("*") if p.is_file()]
