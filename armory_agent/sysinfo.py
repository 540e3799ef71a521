"""What system the device runs: Debian's point release (read live) and the image's own record.

The image build writes ``/etc/clef-armory/system.json`` (overlay template ``system.json.j2``) with the
suite, point release, kernel, agent and Clef versions and whether Debian's security updates were in
the archives it was built from. ``./do status`` shows these through ``device_admin system``.
Standard library only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RECORD = "etc/clef-armory/system.json"
DEBIAN_VERSION = "etc/debian_version"


def read(root: Path = Path("/")) -> dict[str, Any]:
    """{"debian_version": live point release or None, "image": the build's record or None,
    "problem": why the record could not be read, or None}."""
    facts: dict[str, Any] = {"debian_version": None, "image": None, "problem": None}
    try:
        facts["debian_version"] = (root / DEBIAN_VERSION).read_text().strip() or None
    except OSError:
        pass
    try:
        record = json.loads((root / RECORD).read_text())
    except FileNotFoundError:
        facts["problem"] = f"no /{RECORD} (an image built before it was recorded)"
    except (OSError, ValueError) as e:
        facts["problem"] = f"cannot read /{RECORD}: {e}"
    else:
        if isinstance(record, dict):
            facts["image"] = record
        else:
            facts["problem"] = f"/{RECORD} is not a JSON object"
    return facts
