"""./do update's wait for the device after "reboot" (pure logic: a scripted session, no device)."""

from __future__ import annotations

from typing import Any

import pytest

from armory_agent import contract
from clef_armory.errors import ProvisionError, UpdateError
from provision import update

HELLO = contract.Hello(contract=contract.VERSION, agent_version="1", board="qemu")


class _Conn:
    def close(self) -> None:
        pass


class _Scripted:
    """session.open() answers, in order: a boot id (the device answered) or None (unreachable)."""

    def __init__(self, answers: list[str | None]) -> None:
        self.answers = answers
        self.opened = 0

    def open(self) -> tuple[_Conn, str]:
        answer = self.answers[min(self.opened, len(self.answers) - 1)]
        self.opened += 1
        if answer is None:
            raise ProvisionError("cannot reach 10.0.0.1:22: connection refused")
        return _Conn(), answer


def _slots(boot_id: str) -> contract.Slots:
    return contract.Slots(disk="/dev/vda", disk_id="0badcafe", running=2, bootable=2, slots=[],
                          boot_id=boot_id)


@pytest.fixture(autouse=True)
def _no_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(update.time, "sleep", lambda _s: None)
    monkeypatch.setattr(update, "_survey", lambda boot_id: (HELLO, _slots(boot_id)))


@pytest.mark.parametrize(("before", "answers", "opened"), [
    # The old system still answers for a moment after "reboot": wait for the new boot id.
    ("aaaa", ["aaaa", "aaaa", None, "bbbb"], 4),
    ("aaaa", ["aaaa", "bbbb"], 2),
    # A device too old to report a boot id, updated to one that does: the new one's id is news.
    ("", ["", "bbbb"], 2),
    # Neither reports one: only after the device went away once.
    ("", ["", "", None, ""], 4),
])
def test_the_system_that_came_back_is_a_new_boot(before: str, answers: list[str | None], opened: int) -> None:
    session: Any = _Scripted(answers)
    _hello, slots = update.wait_for_reboot(session, before, 60)
    assert session.opened == opened and slots.boot_id == answers[opened - 1]


def test_a_device_that_never_reboots_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(range(0, 10_000, 10))
    monkeypatch.setattr(update.time, "monotonic", lambda: next(clock))
    session: Any = _Scripted(["aaaa"])
    with pytest.raises(UpdateError, match=r"did not come back within 60 s \(still the system from before"):
        update.wait_for_reboot(session, "aaaa", 60)
