"""The laptop <-> device contract (armory_agent/contract.py), with the real device helper in a process.

A laptop one contract ahead of the device (N+1 against N) gets the one-line "run ./do update" message
before anything is asked, the device refuses such a request by itself too, and nothing on the device
changes; the frozen calls ./do update needs still work. The device side runs as its own process
(``python -m armory_agent.device_admin``), so patching the laptop's version leaves the device's alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest

from armory_agent import contract
from clef_armory.errors import ContractError
from provision.device import Device
from provision.layout import DeviceLayout
from provision.ssh import Result

REPO = Path(__file__).resolve().parent.parent
DEVICE = (sys.executable, "-m", "armory_agent.device_admin")


class LocalConnection:
    """provision.ssh.Connection's interface, running the command here (the 'device' is this machine)."""

    def __init__(self) -> None:
        self.commands: list[str] = []

    def run(self, argv: Sequence[str], stdin: bytes = b"", timeout: float | None = 600.0) -> Result:
        return self.run_stream(argv, stdin, (), timeout)

    def run_stream(self, argv: Sequence[str], head: bytes, chunks: Iterable[bytes],
                   timeout: float | None = 600.0) -> Result:
        self.commands.append(argv[-1])
        env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO)}
        done = subprocess.run(list(argv), input=head + b"".join(chunks), capture_output=True, env=env,
                              timeout=timeout, check=False)
        return Result(done.returncode, done.stdout, done.stderr)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"<dir>" for p in root.rglob("*")}


@pytest.fixture()
def device(tmp_path: Path) -> tuple[Device, LocalConnection, Path]:
    state = tmp_path / "state"
    state.mkdir()
    (state / "rules.js").write_text("// the device's rules\n")
    layout = DeviceLayout(admin_command=DEVICE, state_dir=str(state), configdir=str(state / "clef"),
                          keystore=str(state / "keystore"), rules=str(state / "rules.js"),
                          rules_record=str(state / "rules.js.sha256"), staging_dir=str(state / "staging"),
                          clef="/nonexistent/clef", clef_user="root", as_clef_user=())
    conn = LocalConnection()
    return Device(conn, layout), conn, state  # type: ignore[arg-type]


# -- pure logic --------------------------------------------------------------------------------------


def test_messages_ignore_unknown_fields_and_fill_defaults() -> None:
    hello = contract.Hello.from_json({"contract": 7, "agent_version": "9.9", "added_in_v7": [1, 2]})
    assert hello == contract.Hello(contract=7, agent_version="9.9")
    assert contract.Hello.from_json(hello.to_json()) == hello
    with pytest.raises(ValueError, match="missing field 'agent_version'"):
        contract.Hello.from_json({"contract": 2})
    with pytest.raises(ValueError, match=r"Hello.contract: expected int, got str"):
        contract.Hello.from_json({"contract": "2", "agent_version": "x"})
    with pytest.raises(ValueError, match=r"Slot.complete: expected bool, got int"):
        contract.Slot.from_json({"number": 1, "device": "/dev/vda1", "size": 1, "complete": 1})
    assert contract.ActivateSlot.from_json({"slot": 2}).extlinux is None


def test_frozen_calls_are_the_ones_update_needs() -> None:
    assert contract.FROZEN == ("hello", "slots", "write-slot", "activate-slot", "reboot")
    # Frozen messages only grow fields with defaults: today's required fields stay the required ones.
    required = {m.__name__: [f.name for f in dataclasses.fields(m)
                             if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
                for m in (contract.Hello, contract.Slots, contract.WriteSlot, contract.ActivateSlot)}
    assert required == {"Hello": ["contract", "agent_version"],
                        "Slots": ["disk", "disk_id", "running", "bootable", "slots"],
                        "WriteSlot": ["slot", "ranges", "sha256"], "ActivateSlot": ["slot"]}


def test_mismatch_message() -> None:
    assert contract.mismatch(2, 3) == "device runs contract 2, this laptop needs 3: run ./do update"
    assert contract.mismatch(4, 3).endswith("update this checkout (git pull)")


# -- the real helper in its own process ----------------------------------------------------------------


@pytest.mark.integration
def test_same_contract_talks(device: tuple[Device, LocalConnection, Path]) -> None:
    dev, conn, _ = device
    hello = dev.hello()
    assert hello.contract == contract.VERSION and hello.agent_version
    assert dev.call("state")["masterseed"] is False
    assert conn.commands == ["hello", "state"]


@pytest.mark.integration
def test_newer_laptop_older_device(device: tuple[Device, LocalConnection, Path],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    dev, conn, state = device
    before = _tree(state)
    device_version = contract.VERSION
    monkeypatch.setattr(contract, "VERSION", device_version + 1)  # this process is the laptop
    with pytest.raises(ContractError) as err:
        dev.call("install-rules", rules="// someone else's rules\n")
    assert str(err.value) == (f"device runs contract {device_version}, this laptop needs "
                              f"{device_version + 1}: run ./do update")
    assert conn.commands == ["hello"], "nothing but hello was asked"
    # The device refuses by itself too, when a newer laptop skips the check.
    request = {"contract": device_version + 1, "layout": dev.layout.as_json(), "rules": "// other\n",
               "secrets": {"master": "x"}}
    answer = conn.run([*DEVICE, "install-rules"], json.dumps(request).encode() + b"\n")
    assert answer.status == 2
    assert json.loads(answer.stdout)["error"] == contract.mismatch(device_version, device_version + 1)
    assert _tree(state) == before, "the device's state changed"
    # The calls update needs still work across versions.
    assert dev.hello().contract == device_version


@pytest.mark.integration
def test_device_from_before_contracts(tmp_path: Path) -> None:
    """A contract-1 device has no hello: its helper answers with a usage line; the laptop says what to do."""
    old = tmp_path / "old_admin.py"
    old.write_text("import json\n"
                   "print(json.dumps({'error': 'usage: device_admin {state,init} < request.json'}))\n"
                   "raise SystemExit(2)\n")
    layout = DeviceLayout(admin_command=(sys.executable, str(old)))
    dev = Device(LocalConnection(), layout)  # type: ignore[arg-type]
    with pytest.raises(ContractError, match=f"device runs contract 1, this laptop needs {contract.VERSION}"):
        dev.call("state")
    with pytest.raises(ContractError, match="from before A/B updates: re-flash it"):
        dev.frozen("slots")
