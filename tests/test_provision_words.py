"""Generated account passwords: shown once on a (pseudo-)terminal, light scrypt for the account only.

The device is this machine (tests/sshd_helpers) with the test-only global --lightkdf switched
OFF, so what is proven here is what a real device gets: `clef init` with standard scrypt
(N=2^18) and `clef --lightkdf newaccount` (N=2^12) for the account with generated words.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mnemonic import Mnemonic

from clef_armory.errors import ConfigError
from provision import commands, words
from provision.commands import ProvisionInputs
from provision.secrets import Passwords
from tests.sshd_helpers import DeviceEnv, device_env
from tests.test_provision_flow import (
    ProcScanner,
    assert_checks_pass,
    files_containing,
    laptop_roots,
    write_policy,
)
from tests.words_helpers import PtyUser, ScriptedTerminal

STANDARD_N, LIGHT_N = 262144, 4096


# ---------------------------------------------------------------- pure logic


def test_generated_password_is_12_bip39_words_of_128_bits() -> None:
    m = Mnemonic("english")
    a, b = words.generate(), words.generate()
    assert a.value != b.value
    for s in (a, b):
        ws = s.value.split(" ")
        assert len(ws) == 12 and all(w in m.wordlist for w in ws)
        assert m.check(s.value)  # 128 bits of entropy + 4 checksum bits
        assert s.value not in repr(s)


def test_no_terminal_refuses_and_names_the_alternative(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--account-password ask .*0600 --password-file"):
        words.TtyTerminal(str(tmp_path / "no-tty"))


def test_without_a_controlling_terminal_the_real_dev_tty_refuses() -> None:
    """A process in its own session (as under CI or a pipe from cron) has no /dev/tty to open."""
    import subprocess
    import sys

    code = ("from provision import words\n"
            "try:\n    words.TtyTerminal()\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          start_new_session=True, stdin=subprocess.DEVNULL, check=False,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.stdout.startswith("ConfigError no terminal"), proc.stdout + proc.stderr
    assert "--account-password ask" in proc.stdout


def test_words_shown_once_and_two_typed_back() -> None:
    term = ScriptedTerminal()
    secret = words.new_account_password(term, "account 1")
    assert term.written == [secret.value.split(" ")]
    assert term.screen.count(" 1. ") == 1  # one word set, shown once
    assert term.screen.count("Type word") == 2
    assert "\033[2J" in term.screen  # cleared once written down
    with pytest.raises(ConfigError, match=r"does not match.*nothing was created.*new words"):
        words.new_account_password(ScriptedTerminal(mistype=True), "account 1")


def test_options_refuse_an_unknown_mode() -> None:
    with pytest.raises(ConfigError, match="'words' or 'ask'"):
        ProvisionInputs(account_password="typed")


# ---------------------------------------------------------------- real sshd, real Clef, a real pty


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, clef_binary: Path) -> Iterator[DeviceEnv]:
    with device_env(tmp_path_factory.mktemp("words"), clef_binary) as e:
        # What a device does: no global --lightkdf; only the generated-words account gets it.
        yield dataclasses.replace(e, layout=e.layout.replace(lightkdf=False))


def _state(env: DeviceEnv) -> dict[str, Any]:
    conn, device = env.session().open()
    with conn:
        result: dict[str, Any] = device.call("state")
        return result


def _kdf_n(path: Path) -> int:
    doc = json.loads(path.read_text())
    crypto = doc.get("crypto") or doc.get("Crypto") or doc["params"]
    return int(crypto["kdfparams"]["n"])


@pytest.mark.integration
def test_words_through_a_pty_mistype_rerun_light_key_standard_seed_backup(
    env: DeviceEnv, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory,
    capfd: pytest.CaptureFixture[str],
) -> None:
    import time

    from eth_account import Account
    from eth_account.messages import encode_defunct

    started = time.time() - 1
    master = "M-" + secrets.token_urlsafe(18)
    policy = write_policy(tmp_path / "policy.yaml")
    inputs = ProvisionInputs(accounts=1, policy_file=policy, write_agent_config=False)

    # 1. A mistyped word: refused with a clear message, nothing created on the device.
    with PtyUser(mistype=True) as user:
        pty_inputs = dataclasses.replace(inputs, terminal=lambda: words.TtyTerminal(user.path))
        answers = iter([master, master])
        with pytest.raises(ConfigError, match="does not match what was written down; nothing was created"):
            commands.provision(env.session(), Passwords(ask=lambda p: next(answers)), pty_inputs,
                               lambda _: None)
    assert len(user.written) == 1 and len(user.written[0]) == 12
    st = _state(env)
    assert not st["masterseed"] and st["accounts"] == [] and st["rules_sha256"] is None

    # 2. The rerun works: new words, shown once, two typed back; watched for the secrets meanwhile.
    said: list[str] = []
    scanner = ProcScanner([master])
    with scanner, PtyUser(on_words=lambda ws: scanner.needles.append(" ".join(ws).encode())) as user:
        pty_inputs = dataclasses.replace(inputs, terminal=lambda: words.TtyTerminal(user.path))
        answers = iter([master, master])
        passwords = Passwords(ask=lambda p: next(answers))
        steps, results = commands.provision(env.session(), passwords, pty_inputs, said.append)
    phrase = " ".join(user.written[0])
    assert len(user.written) == 1 and len(phrase.split()) == 12
    assert phrase in [s.value for s in passwords.known()]  # the device's secrets check searched for them
    assert_checks_pass(results)
    assert scanner.hits == [] and scanner.scans > 5
    # Shown once, on the terminal only: not in what was said, nor on stdout/stderr.
    assert sum(user.screen.count(f"{i:2d}. {w}") for i, w in enumerate(user.written[0], 1)) == 12
    out, err = capfd.readouterr()
    assert phrase not in "\n".join(said) + out + err
    # Nowhere on the laptop's disk, nor the device's (the agent's log and Clef's audit.log are there too).
    roots = laptop_roots(started, tmp_path_factory.getbasetemp())
    assert files_containing([phrase, master], roots, started, skip=env.root) == []
    assert files_containing([phrase], [env.root], started, skip=env.root / "none") == []

    # 3. Light scrypt for the account, standard for the master seed.
    address = next(s.detail for s in steps if s.name == "new account")
    keystore = Path(env.layout.keystore)
    (key_file,) = list(keystore.iterdir())
    assert _kdf_n(key_file) == LIGHT_N
    assert _kdf_n(Path(env.layout.configdir) / "masterseed.json") == STANDARD_N

    # 4. The backup of docs/backup.md (the keystore file + the written words) decrypts on the laptop.
    backup = tmp_path / "backup.json"
    backup.write_bytes(key_file.read_bytes())
    key = Account.decrypt(json.loads(backup.read_text()), phrase)
    assert Account.from_key(key).address.lower() == address

    # 5. It signs through the link, and a rerun asks for nothing new (no terminal opened).
    link = env.session().link
    assert link is not None
    msg = b"light keystore"
    _, body = link.rpc("account_signData", ["text/plain", address, "0x" + msg.hex()])
    assert Account.recover_message(encode_defunct(primitive=msg), signature=body["result"]).lower() == address

    def no_terminal() -> words.Terminal:
        raise AssertionError("the terminal was opened although nothing is created")

    again, _ = commands.provision(env.session(), Passwords(ask=lambda p: master),
                                  dataclasses.replace(inputs, terminal=no_terminal, run_checks=False),
                                  lambda _: None)
    assert not any(s.changed for s in again), again

    # 6. --account-password ask keeps a user-chosen password with standard scrypt.
    chosen = "A-" + secrets.token_urlsafe(14)
    answers = iter([master, chosen, chosen])
    commands.provision(env.session(), Passwords(ask=lambda p: next(answers)),
                       dataclasses.replace(inputs, accounts=2, account_password="ask", run_checks=False),
                       lambda _: None)
    (new_file,) = [f for f in keystore.iterdir() if f != key_file]
    assert _kdf_n(new_file) == STANDARD_N
