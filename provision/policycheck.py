"""`policy check`: the rendered rules, attested, in a real throw-away Clef on the laptop.

`HostSigner` makes a fresh Clef state (light KDF, random master password that never leaves this
process), attests the rules, starts `clef --stdio-ui` on a loopback port and answers only the
master-password prompt: every approval the rules leave undecided is rejected, as on the device.
Samples go through the agent's own eth_* translation, so Clef sees what the device would see.
The verdict's reason is the rules' own log line ("clef-armory: Reject: ...").
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from armory_agent import ethapi
from armory_agent.keccak import keccak256, selector, to_checksum_address
from armory_agent.rpc import RpcError
from clef_armory.errors import ArmoryError, ConfigError
from provision import policy as policy_mod
from provision import rules as rules_mod

DECISION = re.compile(r"clef-armory: (Approve|Reject): (.*)$")
_DURATION = re.compile(r"^(\d{1,9})(ms|s|m|h|d)?$")
_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
STRANGER = "0x000000000000000000000000000000000000dEaD"


class CheckError(ArmoryError):
    """The throw-away Clef could not be set up or did not answer."""


@dataclass(frozen=True)
class Verdict:
    sample: str
    approved: bool
    reason: str
    result: Any = None


def parse_time(text: str) -> int:
    """'90m', '24h', '30s', '1500ms' or plain seconds -> milliseconds."""
    m = _DURATION.match(str(text).strip())
    if not m:
        raise ConfigError(f"time {text!r} must look like 30s, 90m, 24h or 2d")
    return int(m.group(1)) * _MS[m.group(2) or "s"]


class HostSigner:
    """A throw-away Clef running the given rules, attested (see the module docstring)."""

    def __init__(
        self, clef_binary: Path, rules_text: str, chain_id: int, workdir: Path | None = None
    ) -> None:
        self.clef_binary = clef_binary
        self.rules_text = rules_text
        self.chain_id = chain_id
        self._own_dir = workdir is None
        self.dir = Path(tempfile.mkdtemp(prefix="clef-armory-check-")) if workdir is None else workdir
        self.password = secrets.token_hex(16)  # master and account password of a throw-away state
        self.address = ""
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: list[str] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._rules_state = ""

    # --- state ---

    def _clef(self, args: list[str], stdin: str) -> str:
        argv = [
            str(self.clef_binary),
            "--configdir",
            str(self.dir / "clef"),
            "--keystore",
            str(self.dir / "keystore"),
            "--suppress-bootwarn",
            "--lightkdf",
            *args,
        ]
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            raise CheckError(f"clef {args[0]} failed in the throw-away state: {proc.stderr.strip()[-300:]}")
        return proc.stdout + proc.stderr

    def create(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        pw = self.password
        self._clef(["init"], f"{pw}\n{pw}\n")
        out = self._clef(["newaccount"], f"{pw}\n{pw}\n")
        self.address = next(x.split()[-1] for x in out.splitlines() if x.startswith("Generated account"))
        self._clef(["setpw", self.address], f"{pw}\n{pw}\n{pw}\n")
        rules = self.dir / "rules.js"
        rules.write_text(self.rules_text)
        self._clef(["attest", hashlib.sha256(self.rules_text.encode()).hexdigest()], f"{pw}\n")

    # --- process ---

    def start(self, timeout: float = 60) -> None:
        if not self.address:
            self.create()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        argv = [
            str(self.clef_binary),
            "--stdio-ui",
            "--suppress-bootwarn",
            "--configdir",
            str(self.dir / "clef"),
            "--keystore",
            str(self.dir / "keystore"),
            "--chainid",
            str(self.chain_id),
            "--http",
            "--http.addr",
            "127.0.0.1",
            "--http.port",
            str(self.port),
            "--ipcdisable",
            "--nousb",
            "--pcscdpath",
            "",
            "--auditlog",
            str(self.dir / "audit.log"),
            "--4bytedb-custom",
            str(self.dir / "4byte.json"),
            "--lightkdf",
            "--rules",
            str(self.dir / "rules.js"),
        ]
        self._ready.clear()
        self._rules_state = ""
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=self.dir
        )
        threading.Thread(target=self._ui, args=(self.proc,), daemon=True).start()
        threading.Thread(target=self._stderr, args=(self.proc,), daemon=True).start()
        if not self._ready.wait(timeout) or self.proc.poll() is not None:
            self.stop()
            raise CheckError(f"the throw-away Clef did not start: {' | '.join(self.log[-5:])}")
        deadline = time.monotonic() + 5  # the rules' verdict is on stderr, read by another thread
        while not self._rules_state and time.monotonic() < deadline:
            time.sleep(0.02)
        if self._rules_state != "enabled":
            self.stop()
            raise CheckError(
                f"the throw-away Clef did not enable the rules ({self._rules_state or 'no word'})"
            )

    def _ui(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None and proc.stdin is not None
        for raw in proc.stdout:
            with contextlib.suppress(ValueError):
                msg = json.loads(raw)
                method, msg_id = msg.get("method"), msg.get("id")
                params = (msg.get("params") or [{}])[0]
                answer: Any = None
                if method == "ui_onInputRequired":
                    answer = {"text": self.password}
                elif method == "ui_approveTx":
                    answer = {"approved": False, "transaction": params.get("transaction")}
                elif method in ("ui_approveSignData", "ui_approveNewAccount"):
                    answer = {"approved": False}
                elif method == "ui_approveListing":
                    answer = {"accounts": None}
                elif method == "ui_onSignerStartup":
                    self._ready.set()
                if msg_id is not None and answer is not None:
                    line = json.dumps({"jsonrpc": "2.0", "id": msg_id, "result": answer}).encode() + b"\n"
                    with contextlib.suppress(OSError):
                        proc.stdin.write(line)
                        proc.stdin.flush()
        self._ready.set()

    def _stderr(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            with self._lock:
                self.log.append(line)
            if "Rule engine configured" in line:
                self._rules_state = "enabled"
            elif "Rule hash not attested" in line:
                self._rules_state = "not attested"
            elif "Failed to open master" in line:
                self._rules_state = "master seed not opened"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> HostSigner:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- requests ---

    def call(
        self,
        method: str,
        params: list[Any],
        user_agent: str | None = None,
        origin: str | None = None,
        timeout: float = 60,
    ) -> tuple[Any, str | None, str]:
        """(result, error message or None, the rules' reason or '') for one JSON-RPC call to Clef."""
        with self._lock:
            mark = len(self.log)
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()
        headers = {"Content-Type": "application/json"}
        if user_agent is not None:
            headers["User-Agent"] = user_agent
        if origin is not None:
            headers["Origin"] = origin
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("POST", "/", body=body, headers=headers)
            reply = json.loads(conn.getresponse().read())
        except (OSError, ValueError) as e:
            raise CheckError(f"the throw-away Clef did not answer: {e}") from None
        finally:
            conn.close()
        error = reply["error"].get("message", "error") if "error" in reply else None
        deadline = time.monotonic() + (2.0 if error in (None, "request denied") else 0.0)
        reason = ""
        while True:
            with self._lock:
                fresh = self.log[mark:]
            for line in fresh:
                m = DECISION.search(line)
                if m:
                    reason = m.group(2)
                elif "error occurred during execution" in line and not reason:
                    reason = "the rules failed: " + line.split("error=", 1)[-1]
            if reason or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        return reply.get("result"), error, reason

    def sign_transaction(
        self, tx: dict[str, Any], user_agent: str | None = None, origin: str | None = None
    ) -> Verdict:
        """An eth_signTransaction-style object, translated as the agent does, `from` this signer."""
        tx = {**tx, "from": self.address}
        try:
            call = ethapi.translate_transaction("eth_signTransaction", [tx], self.chain_id)
        except RpcError as e:
            return Verdict("", False, f"the agent refuses it before Clef: {e.message}")
        result, error, reason = self.call(call.method, call.params, user_agent, origin)
        return Verdict("", error is None, reason or str(error), result)

    def sign_typed_data(self, data: Any, user_agent: str | None = None, origin: str | None = None) -> Verdict:
        try:
            call = ethapi.translate_typed_data("eth_signTypedData_v4", [self.address, data], self.chain_id)
        except RpcError as e:
            return Verdict("", False, f"the agent refuses it before Clef: {e.message}")
        result, error, reason = self.call(call.method, call.params, user_agent, origin)
        return Verdict("", error is None, reason or str(error), result)

    def sign_message(self, text: str, user_agent: str | None = None, origin: str | None = None) -> Verdict:
        call = ethapi.translate_sign("personal_sign", ["0x" + text.encode().hex(), self.address])
        result, error, reason = self.call(call.method, call.params, user_agent, origin)
        return Verdict("", error is None, reason or str(error), result)

    # --- the rules' storage (the vault key comes from the throw-away master seed) ---

    def _storage_key(self) -> tuple[Path, bytes]:
        seed = decrypt_seed(json.loads((self.dir / "clef" / "masterseed.json").read_text()), self.password)
        vault = self.dir / "clef" / keccak256(b"vault" + seed)[:10].hex()
        return vault / "jsstorage.json", keccak256(b"jsstorage" + seed)

    def storage_get(self, key: str) -> str:
        path, k = self._storage_key()
        return storage_read(path, k).get(key, "")

    def storage_put(self, key: str, value: str) -> None:
        path, k = self._storage_key()
        storage_write(path, k, {**storage_read(path, k), key: value})

    def set_device_time(self, ms: int) -> None:
        """Shift the rules' clock: the device time reads `ms` now (records keep their times)."""
        self.storage_put("armory.clock", json.dumps({"d": ms, "w": int(time.time() * 1000)}))


# --- Clef's encrypted seed and storage (formats from go-ethereum's keystore and signer/storage) ---


def decrypt_seed(masterseed: dict[str, Any], password: str) -> bytes:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    crypto = masterseed["params"]
    kdf = crypto["kdfparams"]
    n, r, p = int(kdf["n"]), int(kdf["r"]), int(kdf["p"])
    key = hashlib.scrypt(
        password.encode(),
        salt=bytes.fromhex(kdf["salt"]),
        n=n,
        r=r,
        p=p,
        maxmem=256 * r * n * p + (1 << 20),
        dklen=int(kdf["dklen"]),
    )
    ciphertext = bytes.fromhex(crypto["ciphertext"])
    if keccak256(key[16:32] + ciphertext).hex() != crypto["mac"]:
        raise CheckError("wrong master password for the throw-away state")
    dec = Cipher(algorithms.AES(key[:16]), modes.CTR(bytes.fromhex(crypto["cipherparams"]["iv"]))).decryptor()
    return dec.update(ciphertext) + dec.finalize()


def storage_read(path: Path, key: bytes) -> dict[str, str]:
    import base64

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if not path.exists():
        return {}
    out = {}
    for name, entry in json.loads(path.read_text() or "{}").items():
        plain = AESGCM(key).decrypt(
            base64.b64decode(entry["iv"]), base64.b64decode(entry["c"]), name.encode()
        )
        out[name] = plain.decode()
    return out


def storage_write(path: Path, key: bytes, values: dict[str, str]) -> None:
    import base64
    import os

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    data = {}
    for name, value in values.items():
        iv = os.urandom(12)
        c = AESGCM(key).encrypt(iv, value.encode(), name.encode())
        data[name] = {"iv": base64.b64encode(iv).decode(), "c": base64.b64encode(c).decode()}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.chmod(0o600)
    tmp.replace(path)


# --- samples ---


def _checksum(addr: str) -> str:
    return to_checksum_address(addr)


def builtin_samples(p: policy_mod.Policy, chain_id: int | None = None) -> list[tuple[str, str, Any]]:
    """(name, kind 'tx'|'typed', sample) for the table provision shows before its confirmation; on
    ``chain_id`` (the device's Clef chain) or else the policy's first."""
    chain = chain_id or p.chain_ids[0]
    to = _checksum(p.recipients[0]) if p.recipients else STRANGER
    fee = min(p.max_fee_per_gas_wei, 10**9)
    base = {
        "gas": hex(21000),
        "maxFeePerGas": hex(fee),
        "maxPriorityFeePerGas": hex(min(fee, 10**8)),
        "nonce": "0x0",
        "chainId": hex(chain),
    }
    token = _checksum(p.erc20[0].token) if p.erc20 else "0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48"
    word = "00" * 12
    transfer = "0x" + selector("transfer(address,uint256)").hex() + word + STRANGER[2:].lower() + f"{1:064x}"
    approve = "0x" + selector("approve(address,uint256)").hex() + word + STRANGER[2:].lower() + "ff" * 32
    call = {**base, "gas": hex(min(p.max_gas, 60000)), "value": "0x0"}
    permit = {
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "chainId", "type": "uint256"},
                {"name": "verifyingContract", "type": "address"},
            ],
            "Permit": [
                {"name": "owner", "type": "address"},
                {"name": "spender", "type": "address"},
                {"name": "value", "type": "uint256"},
                {"name": "nonce", "type": "uint256"},
                {"name": "deadline", "type": "uint256"},
            ],
        },
        "primaryType": "Permit",
        "domain": {"name": "Token", "chainId": chain, "verifyingContract": token},
        "message": {
            "owner": STRANGER,
            "spender": STRANGER,
            "value": str(2**256 - 1),
            "nonce": 0,
            "deadline": 2**40,
        },
    }
    return [
        ("allowed transfer", "tx", {**base, "to": to, "value": hex(max(p.max_value_wei, 1))}),
        ("above the value cap", "tx", {**base, "to": to, "value": hex(p.max_value_wei + 1)}),
        (
            "fee bomb (30M gas at 655360 gwei)",
            "tx",
            {**base, "to": to, "value": "0x1", "gas": hex(30_000_000), "maxFeePerGas": hex(655_360 * 10**9)},
        ),
        ("ERC-20 transfer to a stranger", "tx", {**call, "to": token, "data": transfer}),
        ("unlimited ERC-20 approve", "tx", {**call, "to": token, "data": approve}),
        ("Permit (typed data)", "typed", permit),
        (
            "contract creation",
            "tx",
            {**call, "to": None, "gas": hex(min(p.max_gas, 60000)), "data": "0x" + "60006000f3" * 13},
        ),
    ]


def run_samples(
    signer: HostSigner,
    samples: list[tuple[str, str, Any]],
    at_ms: int | None = None,
    user_agent: str | None = None,
    origin: str | None = None,
) -> list[Verdict]:
    out = []
    for name, kind, sample in samples:
        at = sample.get("at") if isinstance(sample, dict) and kind == "tx" and "at" in sample else None
        when = parse_time(at) if at is not None else at_ms
        if when is not None:
            signer.set_device_time(when)
        if kind == "tx":
            body = {k: v for k, v in sample.items() if k != "at"}
            v = signer.sign_transaction(body, user_agent, origin)
        elif kind == "typed":
            v = signer.sign_typed_data(sample, user_agent, origin)
        else:
            v = signer.sign_message(str(sample), user_agent, origin)
        out.append(Verdict(name, v.approved, v.reason, v.result))
    return out


def table(verdicts: list[Verdict]) -> str:
    width = max([len(v.sample) for v in verdicts] + [6])
    lines = [f"{'sample':<{width}}  verdict  reason"]
    for v in verdicts:
        lines.append(f"{v.sample:<{width}}  {'Approve' if v.approved else 'Reject ':<7}  {v.reason}")
    return "\n".join(lines)


def load_samples(
    tx_file: Path | None, typed_file: Path | None, message: str | None
) -> list[tuple[str, str, Any]]:
    """Samples from the command line: a tx file (one object or a list), a typed-data file, a message."""
    out: list[tuple[str, str, Any]] = []
    for path, kind in ((tx_file, "tx"), (typed_file, "typed")):
        if path is None:
            continue
        try:
            data = json.loads(path.read_text())
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e.strerror}") from None
        except ValueError as e:
            raise ConfigError(f"{path} is not JSON: {e}") from None
        items = data if isinstance(data, list) and kind == "tx" else [data]
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise ConfigError(f"{path}: each sample must be a JSON object")
            out.append((f"{path.name}[{i}]" if len(items) > 1 else path.name, kind, item))
    if message is not None:
        out.append(("message", "text", message))
    return out


def check(
    clef_binary: Path,
    pol: policy_mod.Policy,
    policy_name: str,
    samples: list[tuple[str, str, Any]],
    at_ms: int | None = None,
    user_agent: str | None = None,
    chain_id: int | None = None,
) -> list[Verdict]:
    """Render the rules, run them in a throw-away Clef (``--chainid`` the device's, else the policy's first
    chain), and return each sample's verdict."""
    text = rules_mod.render(pol, policy_name)
    with HostSigner(clef_binary, text, chain_id or pol.chain_ids[0]) as signer:
        return run_samples(signer, samples, at_ms, user_agent)


@contextlib.contextmanager
def host_signer(
    clef_binary: Path, pol: policy_mod.Policy, workdir: Path | None = None
) -> Iterator[HostSigner]:
    signer = HostSigner(clef_binary, rules_mod.render(pol), pol.chain_ids[0], workdir)
    try:
        signer.start()
        yield signer
    finally:
        signer.close()


def host_clef(settings: Any, log: Any = print) -> Path:
    """The laptop's own Clef (same pinned version as the device's), built once and cached."""
    from clef_armory import clef

    return clef.acquire("source", version=settings.clef_version, arch=clef.host_arch(),
                        cache_dir=settings.cache_path, log=log).path  # fmt: skip


def sample_table(clef_binary: Path, pol: policy_mod.Policy, policy_name: str) -> str:
    """The built-in samples' verdicts, as `provision` shows them before asking to attest."""
    verdicts = check(clef_binary, pol, policy_name, builtin_samples(pol))
    return f"{policy_name} in a throw-away Clef on this machine:\n" + table(verdicts)
