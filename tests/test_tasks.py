"""The CLI surface: every task has a one-line help and every flag is documented."""

from __future__ import annotations

import inspect
import subprocess
import sys

import tasks
from clef_armory.config import REPO_ROOT


def _tasks() -> list[object]:
    return [obj for obj in vars(tasks).values() if obj.__class__.__name__ == "Task"]


def test_every_task_documents_every_flag() -> None:
    found = _tasks()
    assert found, "tasks.py defines no tasks"
    for t in found:
        body = t.body  # type: ignore[attr-defined]
        name = t.name  # type: ignore[attr-defined]
        assert (inspect.getdoc(body) or "").strip(), f"task {name} has no docstring"
        params = [p for p in inspect.signature(body).parameters if p not in ("c", "ctx")]
        undocumented = sorted(set(params) - set(t.help))  # type: ignore[attr-defined]
        assert not undocumented, f"task {name}: flags without help: {undocumented}"


def test_invoke_list_shows_every_task_with_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "invoke", "--list"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout
    for t in _tasks():
        cli_name = t.name.replace("_", "-")  # type: ignore[attr-defined]
        line = next((ln for ln in out.splitlines() if ln.strip().startswith(cli_name + " ")), "")
        assert line.strip() != cli_name and len(line.split()) > 1, f"{cli_name} has no one-line help"


def test_user_error_is_one_line_without_traceback() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "invoke", "test", "-k", "x"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "INVOKE_ARMORY_BOARD": "mk9"},
    )  # fmt: skip
    assert res.returncode == 1
    assert res.stderr.strip() == "error: unknown board 'mk9': choose one of mk2, mk1, qemu"
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
