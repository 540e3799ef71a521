"""What a build records next to the image: host keys, known_hosts, manifest.json, SHA256SUMS.

SSH host keys are made per image at build time (host ``ssh-keygen``) so provisioning can pin them:
``known_hosts`` lists the device's public key for its USB address, and the manifest carries the
fingerprints. The private keys exist only inside the image (docs/image.md says so).
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

from clef_armory.clef import sha256_file
from clef_armory.errors import BuildError, PrerequisiteError
from image.archive import ArchiveState
from image.overlay import SystemRecord
from image.rootfs import Rootfs

HOST_KEY_TYPES = ("ed25519",)

__all__ = ["sha256_file"]


def archive_fields(fs: Rootfs, archives: ArchiveState) -> dict[str, Any]:
    """The manifest's record of what the rootfs was built from: the point release, the archives
    (InRelease dates and digests) and whether Debian's security updates are in it."""
    return {"debian_version": fs.debian_version, "security_updates": archives.security_updates,
            "archives": archives.record()}


def system_record(fs: Rootfs, archives: ArchiveState, agent_version: str) -> SystemRecord:
    """The same facts for the device itself (rendered into /etc/clef-armory/system.json)."""
    return SystemRecord(
        suite=archives.base.archive.suite, debian_version=fs.debian_version,
        security_updates=archives.security_updates,
        archives=tuple(f"{r['source']} ({r['date']})" for r in archives.record()),
        agent_version=agent_version,
    )


def fingerprint(public_key_line: str) -> str:
    """OpenSSH's SHA256 fingerprint of a public key line ("SHA256:..." without padding)."""
    blob = base64.b64decode(public_key_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def generate_host_keys(dest: Path, comment: str) -> dict[str, str]:
    """New host keys in `dest` (ssh_host_<type>_key + .pub); returns type -> public key line."""
    dest.mkdir(parents=True, exist_ok=True)
    public: dict[str, str] = {}
    for kind in HOST_KEY_TYPES:
        key = dest / f"ssh_host_{kind}_key"
        key.unlink(missing_ok=True)
        key.with_suffix(".pub").unlink(missing_ok=True)
        try:
            result = subprocess.run(
                ["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", comment, "-f", str(key)],
                capture_output=True, text=True, check=False,
            )
        except FileNotFoundError:
            raise PrerequisiteError(
                "ssh-keygen is not installed; run: sudo apt-get install openssh-client"
            ) from None
        if result.returncode != 0:
            raise BuildError(f"ssh-keygen failed: {result.stderr.strip()}")
        public[kind] = (dest / f"ssh_host_{kind}_key.pub").read_text().strip()
    return public


def known_hosts(address: str, public: dict[str, str]) -> str:
    """known_hosts lines pinning the device's host keys at `address`."""
    return "".join(f"{address} {' '.join(line.split()[:2])}\n" for line in public.values())


def read_authorized_key(path: Path) -> str:
    """The admin's SSH public key: exactly one OpenSSH public key line, never a private key."""
    try:
        text = path.expanduser().read_text()
    except FileNotFoundError:
        raise BuildError(
            f"no SSH public key at {path}: pass --ssh-key PUBKEY (make one with: ssh-keygen -t ed25519)"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise BuildError(f"cannot read SSH public key {path}: {getattr(e, 'strerror', e)}") from None
    if "PRIVATE KEY" in text:
        raise BuildError(f"{path} is a private key: pass the .pub file with --ssh-key")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if len(lines) != 1:
        raise BuildError(f"{path} must hold exactly one public key line, not {len(lines)}")
    parts = lines[0].split()
    if len(parts) < 2 or not parts[0].startswith(("ssh-", "ecdsa-", "sk-")):
        raise BuildError(f"{path} is not an OpenSSH public key")
    try:
        base64.b64decode(parts[1], validate=True)
    except ValueError:
        raise BuildError(f"{path} is not an OpenSSH public key (bad base64)") from None
    return lines[0]


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_sums(directory: Path, names: list[str], known: dict[str, str] | None = None) -> None:
    """SHA256SUMS in sha256sum's format, for `sha256sum -c` (`known`: digests already computed)."""
    known = known or {}
    lines = [f"{known.get(name) or sha256_file(directory / name)}  {name}\n" for name in sorted(names)]
    (directory / "SHA256SUMS").write_text("".join(lines))
