"""Read files out of a built disk image without mounting it (debugfs on the partition's offset).

Used by the tests and by anyone who wants to check an image before flashing it: no loop device,
no mount, no root needed.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
from pathlib import Path

from clef_armory.errors import BuildError, PrerequisiteError
from image.disk import read_partition


@dataclasses.dataclass(frozen=True)
class Stat:
    """The parts of an inode the checks care about."""

    kind: str  # "regular", "directory", "symlink", ...
    mode: int  # permission bits, e.g. 0o644
    uid: int
    gid: int
    size: int


class Image:
    """A raw image with an ext4 filesystem in an MBR partition (the system slot A unless told)."""

    def __init__(self, path: Path, partition: int = 1) -> None:
        self.path = path
        start, _, _ = read_partition(path, partition)
        self.spec = f"{path}?offset={start}"

    def _debugfs(self, request: str) -> bytes:
        try:
            result = subprocess.run(["debugfs", "-R", request, self.spec], capture_output=True,
                                    check=False)
        except FileNotFoundError:
            raise PrerequisiteError("debugfs is not installed; run: sudo apt-get install e2fsprogs") from None
        if result.returncode != 0:
            raise BuildError(f"debugfs {request!r} failed: {result.stderr.decode().strip()}")
        return result.stdout

    def stat(self, path: str) -> Stat | None:
        """None when `path` does not exist."""
        out = self._debugfs(f'stat "{path}"').decode("utf-8", "replace")
        m = re.search(r"Type: (\w+)\s+Mode:\s+(\d+)", out)
        if not m:
            return None
        ids = re.search(r"User:\s+(\d+)\s+Group:\s+(\d+)", out)
        size = re.search(r"Size: (\d+)", out)
        assert ids and size
        return Stat(m.group(1), int(m.group(2), 8), int(ids.group(1)), int(ids.group(2)),
                    int(size.group(1)))

    def read(self, path: str) -> bytes:
        st = self.stat(path)
        if st is None or st.kind != "regular":
            raise BuildError(f"{path} is not a regular file in {self.path}")
        data = self._debugfs(f'cat "{path}"')
        return data[: st.size]

    def readlink(self, path: str) -> str:
        out = self._debugfs(f'stat "{path}"').decode("utf-8", "replace")
        m = re.search(r'Fast link dest: "(.*)"', out)
        if not m:
            raise BuildError(f"{path} is not a symlink in {self.path}")
        return m.group(1)

    def listdir(self, path: str) -> list[str]:
        out = self._debugfs(f'ls -p "{path}"').decode("utf-8", "replace")
        names = []
        for line in out.splitlines():
            parts = line.strip().strip("/").split("/")
            if len(parts) >= 5 and parts[4] not in (".", ".."):
                names.append(parts[4])
        return names
