"""Host prerequisites: each missing tool is one line naming the apt command that installs it.

`./do` installs the full set up front; this module re-checks at the point of use so that calling the
library or `invoke` directly still fails with a clear line rather than a traceback.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable

from clef_armory.errors import PrerequisiteError

# command -> Debian package that provides it
PACKAGES = {
    "mmdebstrap": "mmdebstrap",
    "qemu-arm-static": "qemu-user-static",
    "arch-test": "arch-test",
    "update-binfmts": "binfmt-support",
    "mke2fs": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "sfdisk": "fdisk",
    "bmaptool": "bmap-tools",
    "gpg": "gnupg",
    "zstd": "zstd",
    "xz": "xz-utils",
    "dtc": "device-tree-compiler",
    "mkimage": "u-boot-tools",
    "qemu-system-arm": "qemu-system-arm",
    "qemu-img": "qemu-utils",
    "ssh-keygen": "openssh-client",
    "sshd": "openssh-server",
    "nft": "nftables",
    "ip": "iproute2",
    "losetup": "mount",
    "lsblk": "util-linux",
}


def which(command: str) -> str | None:
    """Like shutil.which, but also looks in the sbin directories a non-root PATH may lack."""
    return shutil.which(command) or shutil.which(command, path="/usr/sbin:/sbin:/usr/bin:/bin")


def require(commands: Iterable[str]) -> None:
    """Raise one PrerequisiteError naming every missing command's package."""
    missing = [c for c in commands if which(c) is None]
    if missing:
        pkgs = sorted({PACKAGES.get(c, c) for c in missing})
        raise PrerequisiteError(
            f"missing {', '.join(missing)}: run sudo apt-get install -y {' '.join(pkgs)}"
        )
