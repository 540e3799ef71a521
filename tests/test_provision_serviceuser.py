"""Clef and the agent as a separate service user, as on the device (runuser, file ownership)."""

from __future__ import annotations

import functools
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path

import pytest

from provision import checks, commands
from provision.commands import ProvisionInputs
from provision.secrets import Passwords, Secret
from tests.sshd_helpers import device_env, service_user

# These tests choose the account password (standard scrypt); tests/test_provision_words.py
# covers the generated words.
AskInputs = functools.partial(ProvisionInputs, account_password="ask")

pytestmark = pytest.mark.integration


def test_provision_as_service_user_owns_everything_and_catches_a_root_owned_key(clef_binary: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix="armtest-", dir="/tmp"))
    os.chmod(work, 0o755)  # noqa: S103 - the service user must reach it
    master, account = "M-" + secrets.token_urlsafe(16), "A-" + secrets.token_urlsafe(16)
    answers = iter([master, master, account, account])
    policy = work / "policy.yaml"
    policy.write_text(json.dumps({"recipients": ["0x" + "11" * 20], "allow_text_signing": True}))
    try:
        with service_user() as user, device_env(work, clef_binary, user=user) as env:
            _, results = commands.provision(
                env.session(), Passwords(ask=lambda p: next(answers)),
                AskInputs(accounts=1, policy_file=policy, write_agent_config=False), lambda _: None)
            by_name = {r.name: r for r in results}
            for name in ("keystore", "masterseed", "vault", "rules-enabled", "link-sign", "listeners"):
                assert by_name[name].ok, by_name[name]
            assert f"owner {user}" in by_name["keystore"].reason
            state = Path(env.layout.state_dir)
            for path in (state, state / "rules.js", Path(env.layout.configdir) / "masterseed.json",
                         *Path(env.layout.keystore).iterdir()):
                assert path.owner() == user, path

            key = next(Path(env.layout.keystore).iterdir())
            shutil.chown(key, "root", "root")
            conn, device = env.session().open()
            with conn:
                found = {r.name: r for r in checks.device_checks(device, [Secret(master)])}
            assert not found["keystore"].ok
            assert found["keystore"].reason == f"{key} is owned by root, not {user}"
    finally:
        shutil.rmtree(work, ignore_errors=True)
