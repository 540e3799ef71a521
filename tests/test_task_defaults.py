"""What the device tasks take when the user gives no --board, and what `status` says in words."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from clef_armory import config
from image import builds
from provision import report

REPO = Path(__file__).resolve().parent.parent


def _built(out: Path, board: str, when: float) -> None:
    (out / board).mkdir(parents=True)
    manifest = out / board / "manifest.json"
    manifest.write_text("{}")
    os.utime(manifest, (when, when))


def test_the_newest_build_decides_and_is_named(tmp_path: Path) -> None:
    settings = config.load().replace(output_dir=str(tmp_path))
    assert builds.choose(settings, None) == builds.Choice(settings, None)  # nothing built: invoke.yaml's
    _built(tmp_path, "mk2", 1_000_000)
    _built(tmp_path, "mk1", 2_000_000)
    choice = builds.choose(settings, None)
    assert choice.settings.board == "mk1"
    assert choice.note is not None and "mk1 build" in choice.note and "also built: mk2" in choice.note
    given = builds.choose(settings, "mk2")
    assert given.settings.board == "mk2" and given.note is None
    (tmp_path / "qemu").mkdir()  # an unfinished build (no manifest) does not count
    assert builds.choose(settings, None).settings.board == "mk1"


def test_a_mk1_user_is_not_sent_to_build_mk2(tmp_path: Path) -> None:
    """Through the real CLI: with only a mk1 build, `status` looks for build/mk1/known_hosts and says so."""
    out = tmp_path / "build"
    _built(out, "mk1", 1_000_000)
    runtime = tmp_path / "invoke.yaml"
    runtime.write_text((REPO / "invoke.yaml").read_text().replace("output_dir: build", f"output_dir: {out}"))
    argv = [sys.executable, "-m", "invoke", "-f", str(runtime), "status", "--host", "127.0.0.1",
            "--port", "1"]
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert lines[0].startswith(f"using the mk1 build in {out}/mk1/"), lines
    assert f"{out}/mk1/known_hosts" in lines[-1] and "mk2" not in lines[-1], lines


@pytest.mark.parametrize(("device", "agent", "expected"), [
    ({"masterseed": False}, {"state": "error", "detail": "Clef has no master seed (run clef init)"},
     "not provisioned (no master seed yet): run ./do provision"),
    ({"masterseed": True}, {"state": "error", "rules": "enabled", "detail": "Clef exited; restarting in 4s"},
     "error, rules enabled: Clef exited; restarting in 4s"),
    ({"masterseed": True}, {"state": "locked", "rules": "enabled"},
     "locked, rules enabled (run ./do unlock)"),
    ({"masterseed": True}, {"state": "ready", "rules": "enabled"}, "ready, rules enabled"),
    ({"masterseed": True}, None, "not answering"),
])
def test_status_says_why(device: dict[str, object], agent: dict[str, object] | None, expected: str) -> None:
    assert report.agent_line(device, agent).startswith(expected)


@pytest.mark.parametrize(("system", "expected"), [
    ({"debian_version": "13.9", "image": {"suite": "trixie", "debian_version": "13.8",
                                          "security_updates": "included", "agent_version": "0.9.1",
                                          "kernel_version": "6.12.117+deb13-armmp"}},
     "Debian 13.9 (trixie), kernel 6.12.117+deb13-armmp, agent 0.9.1, built with security updates"),
    ({"debian_version": "13.8", "image": {"suite": "trixie", "security_updates": "unavailable: mid-sync"}},
     "Debian 13.8 (trixie), built WITHOUT security updates (unavailable: mid-sync): rebuild and update"),
    ({"debian_version": "13.8", "image": None,
      "problem": "no /etc/clef-armory/system.json (an image built before)"},
     "Debian 13.8, security updates unknown (no /etc/clef-armory/system.json"),
    ({"debian_version": None, "image": None,
      "problem": "on the device, system: usage: device_admin {state,...}"},
     "Debian ?, security updates unknown (on the device, system: usage"),
])
def test_status_shows_the_system(system: dict[str, object], expected: str) -> None:
    assert report.system_line(system).startswith(expected)
