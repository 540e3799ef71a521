"""What a fresh laptop lacks for `./do build-image`: Go (checked before anything slow), an SSH key
(made for the device), root (a normal user's build goes through sudo), and the eMMC loader."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from clef_armory import clef, config
from clef_armory.errors import BuildError, ClefError, FlashError, PrerequisiteError
from image import asroot, boards, flash, overlay, sshkey
from provision import ssh

REPO = Path(__file__).resolve().parent.parent
INVOKE = [sys.executable, "-m", "invoke"]


def _make_key(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test@laptop",
                    "-f", str(directory / "id_ed25519")], check=True)
    return directory / "id_ed25519.pub"


def _no_go() -> Path:
    raise PrerequisiteError("Go is not installed")


# --- Go ------------------------------------------------------------------------------------------


def _every_go() -> list[str]:
    """Every `go` the build could find: on PATH and where Go's tarball or Debian put it."""
    found = {str(Path(d) / "go") for d in os.environ.get("PATH", "").split(os.pathsep) if d}
    found.update(clef.GO_CANDIDATES)
    return sorted(os.path.realpath(f) for f in found if os.path.isfile(f))


@pytest.mark.integration
def test_build_image_without_go_stops_in_the_inputs_step(tmp_path: Path) -> None:
    """No Go anywhere (hidden in a private mount namespace) and no cached Clef: one line naming the
    install step, from the first step, before the root file system is touched."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("hiding Go needs root and unshare(1) for a private mount namespace")
    key = _make_key(tmp_path / "key")
    out, cache = tmp_path / "out", tmp_path / "cache"
    hide = "".join(f'mount --bind /dev/null "{g}" && ' for g in _every_go())
    command = [*INVOKE, "build-image", "--board", "qemu", "--output", str(out), "--ssh-key", str(key)]
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", hide + 'exec "$@"', "sh",
         *command],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "INVOKE_ARMORY_CACHE_DIR": str(cache)},
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: Go is not installed"), lines[0]
    assert "./do" in lines[0] and "--clef release" in lines[0]
    assert "[1] checking inputs" in proc.stdout and "[2]" not in proc.stdout, proc.stdout
    assert not (cache / "rootfs").exists()
    assert not out.exists() or not any(out.iterdir())


def test_preflight_accepts_a_cached_source_build_without_go(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clef, "go_binary", _no_go)
    with pytest.raises(PrerequisiteError, match="Go is not installed"):
        clef.preflight("source", version="1.17.3", arch="armv7", cache_dir=tmp_path)
    built = tmp_path / "clef" / "1.17.3-armv7-go1.24.5" / "clef"
    built.parent.mkdir(parents=True)
    built.write_bytes(b"\x7fELF")
    assert "cached" in clef.preflight("source", version="1.17.3", arch="armv7", cache_dir=tmp_path)
    assert clef.cached_source_build("1.17.3", clef.ARCHS["armv7"], tmp_path) == built
    assert clef.cached_source_build("1.17.3", clef.ARCHS["arm64"], tmp_path) is None


def test_preflight_for_release_and_path(tmp_path: Path) -> None:
    assert clef.preflight("release", version="1.17.3", arch="armv7", cache_dir=tmp_path)
    with pytest.raises(ClefError, match="does not exist"):
        clef.preflight(f"path:{tmp_path / 'nope'}", version="1.17.3", arch="armv7", cache_dir=tmp_path)
    script = tmp_path / "clef"
    script.write_text("#!/bin/sh\n")
    with pytest.raises(ClefError, match="not an ELF"):
        clef.preflight(f"path:{script}", version="1.17.3", arch="armv7", cache_dir=tmp_path)
    with pytest.raises(ClefError, match="unknown Clef source"):
        clef.preflight("git", version="1.17.3", arch="armv7", cache_dir=tmp_path)


def test_go_env_turns_toolchain_switching_on_and_keeps_it_in_the_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOTOOLCHAIN", "local")  # as Go's tarball or a user may set it
    monkeypatch.setenv("GOBIN", "/elsewhere")
    env = clef.go_env(tmp_path, tmp_path / "gopath")
    assert env["GOTOOLCHAIN"] == "auto" and "GOBIN" not in env
    assert env["GOMODCACHE"] == str(tmp_path / "go" / "mod")  # fetched toolchains land here too
    monkeypatch.setenv("GOTOOLCHAIN", "go1.24.5")  # a toolchain the user named is kept
    assert clef.go_env(tmp_path, tmp_path)["GOTOOLCHAIN"] == "go1.24.5"


# --- the SSH key ---------------------------------------------------------------------------------


def test_no_key_makes_a_dedicated_key_pair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    said: list[str] = []
    line = sshkey.authorized_key(config.Settings().ssh_key, log=said.append, interactive=False)
    key = tmp_path / ".ssh" / "clef-armory_ed25519"
    assert sshkey.device_key() == key
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    assert Path(f"{key}.pub").read_text().strip() == line
    # the private key opens without a passphrase (no terminal) and belongs to that public key
    derived = subprocess.run(["ssh-keygen", "-y", "-P", "", "-f", str(key)], capture_output=True,
                             text=True, check=True).stdout.split()[:2]
    assert derived == line.split()[:2]
    assert any(str(key) in s and "SHA256:" in s and "WITHOUT a passphrase" in s for s in said), said
    assert not [p for p in key.parent.iterdir() if ".tmp-" in p.name]
    # the image's authorized key is that key
    b = boards.BOARDS["qemu"]
    cfg = overlay.DeviceConfig(board=b, suite="trixie", kernel_version="6.12", root=b.root_device,
                               authorized_key=line, network=overlay.Network())
    assert overlay.render_all(cfg)["/var/lib/clef-armory/ssh/authorized_keys/armory"].decode().strip() == line
    # provisioning tries it by default (after ssh-agent's keys)
    assert ssh.default_identities()[0] == key
    # a second build reuses it
    assert sshkey.authorized_key(config.Settings().ssh_key, log=said.append, interactive=False) == line


def test_existing_or_given_keys_are_used_as_they_are(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(BuildError, match="no SSH public key"):  # a chosen key must exist
        sshkey.authorized_key(tmp_path / "chosen.pub", interactive=False)
    pub = _make_key(tmp_path / ".ssh")
    assert sshkey.authorized_key(config.Settings().ssh_key, interactive=False) == pub.read_text().strip()
    assert not sshkey.device_key().exists()


def test_failed_ssh_keygen_leaves_no_half_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "ssh-keygen").write_text("#!/bin/sh\nfor a; do f=$a; done\ntouch \"$f\"\n"
                                     "echo 'ssh-keygen: broken' >&2\nexit 1\n")
    (fake / "ssh-keygen").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    with pytest.raises(BuildError, match=r"could not make the SSH key .*broken"):
        sshkey.authorized_key(config.Settings().ssh_key, interactive=False)
    assert not list((tmp_path / ".ssh").iterdir())


# --- sudo ----------------------------------------------------------------------------------------


def test_sudo_command_keeps_the_callers_settings() -> None:
    env = {"PATH": "/home/u/go/bin:/usr/bin", "INVOKE_ARMORY_CACHE_DIR": "/c", "GOPROXY": "x",
           "SECRET_TOKEN": "no", "HOME": "/home/u"}
    argv = asroot.sudo_command(["/r/.venv/bin/invoke", "build-image", "--output", "out"], env,
                               "/usr/bin/sudo")
    assert argv[:3] == ["/usr/bin/sudo", "--", "env"]
    assert "PATH=/home/u/go/bin:/usr/bin" in argv and "INVOKE_ARMORY_CACHE_DIR=/c" in argv
    assert "GOPROXY=x" in argv and not [a for a in argv if "SECRET" in a or a.startswith("HOME=")]
    assert argv[-5:] == ["-m", "invoke", "build-image", "--output", "out"]


USER = "clefarmorytest"


@pytest.fixture()
def sudo_user() -> Iterator[tuple[str, Path]]:
    """A throwaway user with NOPASSWD sudo and its own home; removed afterwards."""
    if os.geteuid() != 0 or not shutil.which("sudo") or not shutil.which("useradd"):
        pytest.skip("needs root, sudo (./do installs it) and useradd")
    home = Path(tempfile.mkdtemp(prefix="clef-armory-sudo-"))
    home.chmod(0o755)
    sudoers = Path("/etc/sudoers.d") / USER
    subprocess.run(["userdel", USER], capture_output=True, check=False)
    subprocess.run(["useradd", "--home-dir", str(home), "--no-create-home", "--shell", "/bin/sh", USER],
                   check=True)
    try:
        os.chown(home, pwd.getpwnam(USER).pw_uid, pwd.getpwnam(USER).pw_gid)
        sudoers.write_text(f"{USER} ALL=(root) NOPASSWD: ALL\n")
        sudoers.chmod(0o440)
        probe = subprocess.run(["runuser", "-u", USER, "--", "test", "-r", str(REPO / "tasks.py")],
                               check=False)
        if probe.returncode != 0:
            pytest.skip(f"{USER} cannot read {REPO}")
        yield USER, home
    finally:
        sudoers.unlink(missing_ok=True)
        subprocess.run(["userdel", USER], capture_output=True, check=False)
        shutil.rmtree(home, ignore_errors=True)


def _python_for(user: str) -> tuple[str, list[str]]:
    """This venv's Python, or (when the user cannot run it, e.g. a pyenv under /root) the system's
    Python of the same minor version with the venv's packages on PYTHONPATH."""
    if subprocess.run(["runuser", "-u", user, "--", sys.executable, "-c", ""], capture_output=True,
                      check=False).returncode == 0:
        return sys.executable, []
    system = "/usr/bin/python3"
    same = subprocess.run([system, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                          text=True, check=False).stdout.strip() == str(sys.version_info[:2])
    site = next((p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix)), "")
    if not same or not site:
        pytest.skip(f"{user} cannot run {sys.executable} and no system Python matches it")
    return system, [f"PYTHONPATH={site}:{REPO}"]


@pytest.mark.integration
def test_a_normal_user_builds_through_sudo_and_gets_the_outputs(sudo_user: tuple[str, Path]) -> None:
    """The build re-runs itself under sudo with the caller's home, key and cache, and what it made is
    the caller's afterwards. It stops at a bad input (--usb-net) after the SSH key is made."""
    user, home = sudo_user
    pw = pwd.getpwnam(user)
    out = home / "out"
    python, extra = _python_for(user)
    proc = subprocess.run(
        ["runuser", "-u", user, "--", "env", f"HOME={home}", f"PATH={os.environ['PATH']}", *extra,
         python, "-m", "invoke", "build-image", "--board", "qemu", "--output", str(out),
         "--usb-net", "bogus"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "running it with sudo" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown USB network function")
    key = home / ".ssh" / "clef-armory_ed25519"
    assert key.is_file() and Path(f"{key}.pub").is_file(), proc.stdout + proc.stderr
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    cache = home / ".cache" / "clef-armory"
    assert cache.is_dir()
    for path in (out, cache, cache.parent, key, Path(f"{key}.pub"), key.parent):
        st = path.lstat()
        assert (st.st_uid, st.st_gid) == (pw.pw_uid, pw.pw_gid), path


# --- the eMMC tools ------------------------------------------------------------------------------


def test_emmc_error_names_every_missing_piece(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flash, "_installed_loader", lambda _image: None)
    monkeypatch.setattr(clef, "go_binary", _no_go)
    with pytest.raises(FlashError) as e:
        flash.emmc_tools(config.Settings(cache_dir=tmp_path), None)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"armory-ums.imx at {tmp_path / 'armory-ums' / 'armory-ums.imx'}" in msg
    assert flash.ARMORY_UMS_RELEASE in msg and "--ums-image" in msg
    assert "armory-boot-usb" in msg and "./do" in msg and "imx_usb" in msg


@pytest.mark.integration
def test_pinned_armory_boot_usb_builds(settings: config.Settings) -> None:
    """The pinned `go install` of armory-boot-usb works and is cached (needs the Go module proxy to
    serve github.com/usbarmory modules)."""
    probe = subprocess.run(
        ["go", "mod", "download", "-json", f"{flash.ARMORY_BOOT_MODULE}@{flash.ARMORY_BOOT_VERSION}"],
        capture_output=True, text=True, cwd=tempfile.gettempdir(), timeout=300, check=False,
        env=clef.go_env(settings.cache_path, Path(tempfile.gettempdir()) / "gopath-probe"),
    ) if shutil.which("go") else None
    if probe is None or "not available" in probe.stdout + probe.stderr or "403" in probe.stdout:
        pytest.skip("the Go module proxy does not serve github.com/usbarmory/armory-boot here")
    tool = flash.armory_boot_usb(settings.cache_path, log=lambda _s: None)
    assert tool.is_file() and os.access(tool, os.X_OK)
    assert flash.armory_boot_usb(settings.cache_path, log=lambda _s: None) == tool
    head = tool.read_bytes()[:4]
    assert head == b"\x7fELF"


@pytest.mark.integration
def test_provisioning_logs_in_with_the_made_key_by_default(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real sshd that accepts only the key the build made: no --identity, no ssh-agent."""
    from tests.sshd_helpers import DEVICE_IP, sshd, usb_link

    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    line = sshkey.authorized_key(config.Settings().ssh_key, log=lambda _s: None, interactive=False)
    with usb_link() as link, sshd(tmp_path / "sshd", link) as s:
        (s.config.parent / "authorized_keys").write_text(line + "\n")
        target = ssh.Target(host=DEVICE_IP, port=s.port, user="root", identity=None,
                            known_hosts=s.known_hosts, timeout=5.0)

        def never(prompt: str) -> str:
            raise AssertionError(f"asked for a passphrase: {prompt}")

        with ssh.connect(target, sock=link.connect(DEVICE_IP, s.port, 5.0), passphrase=never) as conn:
            assert conn.run(["true"]).status == 0
