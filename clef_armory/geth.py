"""A host `geth` for tests and for users who want `geth --signer`: built from the same pinned go-ethereum
version as Clef (`clef_version` in invoke.yaml; one setting), with the Go toolchain from the module proxy,
cached under the cache dir keyed by version, architecture and Go version."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from clef_armory import clef
from clef_armory.errors import ClefError

MODULE = "github.com/ethereum/go-ethereum/cmd/geth"


def _reported_version(path: Path) -> str:
    try:
        out = subprocess.run([str(path), "version"], capture_output=True, text=True, timeout=60, check=False)
    except OSError as exc:
        raise ClefError(f"cannot run {path}: {exc.strerror}") from exc
    for line in out.stdout.splitlines():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    raise ClefError(f"{path} did not report a version (exit {out.returncode})")


def _checked(path: Path, version: str) -> Path:
    reported = _reported_version(path)
    if reported.split("-")[0] != version:
        raise ClefError(f"{path} reports geth {reported}, expected {version}")
    return path


def host_geth(version: str, cache_dir: Path, log: clef.Log = lambda _msg: None) -> Path:
    """The path of a checked geth `version` for this machine, building it once (a few minutes)."""
    target = clef.ARCHS[clef.host_arch()]
    go = clef.go_binary()
    gover = clef.go_version(go)
    cached = cache_dir / "geth" / f"{version}-{target.goarch}-{gover}" / "geth"
    if cached.exists():
        return _checked(cached, version)
    log(f"building geth {version} with {gover} (a few minutes the first time)")
    with tempfile.TemporaryDirectory(prefix="geth-build-") as tmp:
        env = {**clef.go_env(cache_dir, Path(tmp)), "CGO_ENABLED": "0"}
        argv = [str(go), "install", "-trimpath", "-buildvcs=false", f"{MODULE}@v{version}"]
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            last = proc.stderr.strip().splitlines()[-1:] or ["no output"]
            raise ClefError(f"building geth {version} failed: {last[0]}")
        built = Path(tmp, "bin", "geth")
        if not built.is_file():
            raise ClefError("go install finished but produced no geth binary")
        _checked(built, version)
        clef.install_atomically(built, cached)
    return _checked(cached, version)
