"""Device-side half of provisioning: `sudo python3 -m armory_agent.device_admin SUBCOMMAND`.

The laptop runs this over SSH. The command line holds only the subcommand; the
device layout, any file contents and every secret arrive as one JSON line on
stdin (write-slot's data stream follows it), and secrets go on to Clef's stdin.
Every request names the laptop's contract version (armory_agent/contract.py):
a laptop on another version may make only the frozen calls ./do update needs.
Nothing here writes a secret to disk, to the environment, to a log or to a
command line. The answer is one JSON object
on stdout; failures are ``{"error": "<one line>"}`` with exit status 2.

Every step is safe to repeat and ignores SIGHUP/SIGPIPE, so a dropped SSH
connection cannot stop it half-way (only a power cut can, and then the next
run's "state" sees it and finishes the job).

Standard library only: it runs under Debian's python3 on the device.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import hashlib
import json
import os
import pwd
import re
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from armory_agent import CLEF_GOMEMLIMIT, contract, slots, sysinfo

_VAULT_RE = re.compile(r"^[0-9a-f]{20}$")
_ADDRESS_RE = re.compile(r"^(0x)?[0-9a-fA-F]{40}$")
_GENERATED_RE = re.compile(r"Generated account (0x[0-9a-fA-F]{40})")
_KEYSTORE_MAX = 64 * 1024
_CHUNK = 1 << 20


class AdminError(Exception):
    """One line for the laptop to show."""


# ---------------------------------------------------------------- helpers


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _owner_ids(layout: dict[str, Any]) -> tuple[int, int]:
    try:
        user = pwd.getpwnam(layout["clef_user"])
    except KeyError:
        raise AdminError(f"Clef's user {layout['clef_user']!r} does not exist on the device") from None
    return user.pw_uid, user.pw_gid


def _chown(path: Path, uid: int, gid: int) -> None:
    if os.geteuid() == 0:
        os.chown(path, uid, gid, follow_symlinks=False)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ensure_dir(path: Path, uid: int, gid: int, mode: int = 0o700) -> None:
    path.mkdir(mode=mode, parents=True, exist_ok=True)
    _chown(path, uid, gid)
    os.chmod(path, mode)


def _write_temp(directory: Path, data: bytes, mode: int, uid: int, gid: int, prefix: str) -> Path:
    """A new file in ``directory`` with ``data``, flushed to disk, right owner and mode."""
    fd, name = tempfile.mkstemp(prefix=prefix, dir=directory)
    try:
        os.fchmod(fd, mode)
        if os.geteuid() == 0:
            os.fchown(fd, uid, gid)
        os.write(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(name)
        raise
    os.close(fd)
    return Path(name)


def _install_atomically(path: Path, data: bytes, mode: int, uid: int, gid: int) -> None:
    """Temporary file in the same directory, fsync, rename over the target, fsync the directory."""
    tmp = _write_temp(path.parent, data, mode, uid, gid, prefix=f".{path.name}.")
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _clef(layout: dict[str, Any], args: list[str], stdin: str, keystore: str | None = None,
          light_kdf: bool = False) -> str:
    """Run Clef as its service user with global flags first and the secrets on stdin.

    ``light_kdf`` is for `newaccount` with a generated (high-entropy) password only;
    `init` never gets it on a device: the master seed is guarded by a human password.
    ``layout["lightkdf"]`` is the test-only switch that makes everything cheap.
    """
    argv = [*layout["as_clef_user"], layout["clef"], "--keystore", keystore or layout["keystore"],
            "--configdir", layout["configdir"], "--suppress-bootwarn"]
    if light_kdf or layout["lightkdf"]:
        argv.append("--lightkdf")
    argv += args
    try:
        proc = subprocess.run(argv, input=stdin.encode(), capture_output=True, timeout=900,
                              cwd=layout["state_dir"], env=_clean_env(), check=False)
    except FileNotFoundError:
        raise AdminError(f"cannot run Clef at {layout['clef']}") from None
    except subprocess.TimeoutExpired:
        raise AdminError(f"clef {args[0]} did not finish within 15 minutes") from None
    out = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    if proc.returncode != 0:
        fatal = [line for line in out.splitlines() if line.startswith("Fatal:")]
        reason = fatal[-1].removeprefix("Fatal:").strip() if fatal else f"exit status {proc.returncode}"
        if "decrypt the master seed" in reason:
            reason = "the master password is wrong"
        raise AdminError(f"clef {args[0]} failed: {reason}")
    return out


def _clean_env() -> dict[str, str]:
    """A minimal environment for child processes (nothing of ours leaks through it)."""
    return {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
            "HOME": "/nonexistent", "GOMEMLIMIT": CLEF_GOMEMLIMIT}


def _address_of(key_file: Path) -> str | None:
    try:
        data = json.loads(key_file.read_bytes()[:_KEYSTORE_MAX])
    except (OSError, ValueError):
        return None
    address = data.get("address") if isinstance(data, dict) else None
    if isinstance(address, str) and _ADDRESS_RE.match(address):
        return "0x" + address.lower().removeprefix("0x")
    return None


def _vault_dirs(layout: dict[str, Any]) -> list[Path]:
    configdir = Path(layout["configdir"])
    if not configdir.is_dir():
        return []
    return sorted(p for p in configdir.iterdir() if p.is_dir() and _VAULT_RE.match(p.name))


def _credential_addresses(layout: dict[str, Any]) -> set[str]:
    found: set[str] = set()
    for vault in _vault_dirs(layout):
        raw = _read_or_none(vault / "credentials.json")
        if raw:
            try:
                found |= {k.lower() for k in json.loads(raw)}
            except ValueError:
                continue
    return found


def _accounts(layout: dict[str, Any]) -> list[dict[str, Any]]:
    keystore = Path(layout["keystore"])
    if not keystore.is_dir():
        return []
    with_pw = _credential_addresses(layout)
    accounts = []
    for f in sorted(keystore.iterdir()):
        address = _address_of(f) if f.is_file() else None
        if address:
            accounts.append({"address": address, "file": f.name, "credential": address in with_pw})
    return accounts


# ---------------------------------------------------------------- subcommands


def cmd_state(req: dict[str, Any]) -> dict[str, Any]:
    """What is already set up (no secrets needed)."""
    layout = req["layout"]
    rules = _read_or_none(Path(layout["rules"]))
    record = _read_or_none(Path(layout["rules_record"]))
    config = _read_or_none(Path(layout["agent_config"]))
    staging = Path(layout["staging_dir"])
    return {
        "masterseed": Path(layout["configdir"], "masterseed.json").exists(),
        "accounts": _accounts(layout),
        "rules_sha256": _sha256(rules) if rules is not None else None,
        "rules_record": record.decode().strip() if record is not None else None,
        "agent_config_sha256": _sha256(config) if config is not None else None,
        "staging_leftovers": len(list(staging.iterdir())) if staging.is_dir() else 0,
    }


def cmd_init(req: dict[str, Any]) -> dict[str, Any]:
    """`clef init` unless a master seed exists (never overwrite one)."""
    layout = req["layout"]
    uid, gid = _owner_ids(layout)
    _ensure_dir(Path(layout["state_dir"]), uid, gid)
    if Path(layout["configdir"], "masterseed.json").exists():
        return {"changed": False}
    master = req["secrets"]["master"]
    _clef(layout, ["init"], f"{master}\n{master}\n")
    return {"changed": True}


def cmd_add_account(req: dict[str, Any]) -> dict[str, Any]:
    """Make one account ready to sign: key made (or imported) in staging, password stored, then moved in.

    ``light_kdf``: the password was generated (128 bits), so the new key file uses
    Clef's --lightkdf scrypt; an imported file keeps its own parameters.

    Only after `clef setpw` succeeded does the key file join the keystore, with a
    rename on the same filesystem: the keystore never holds an account whose
    password the rules cannot use.
    """
    layout = req["layout"]
    secrets = req["secrets"]
    uid, gid = _owner_ids(layout)
    keystore, staging = Path(layout["keystore"]), Path(layout["staging_dir"])
    _ensure_dir(keystore, uid, gid)
    _clear_staging(staging)
    _ensure_dir(staging, uid, gid)
    try:
        imported = req.get("import_keystore")
        if imported is not None:
            address = _address_of_text(imported)
            stamp = time.strftime("%Y-%m-%dT%H-%M-%S", time.gmtime())
            staged = staging / f"UTC--{stamp}.000000000Z--{address.removeprefix('0x')}"
            tmp = _write_temp(staging, imported.encode(), 0o600, uid, gid, prefix=".import.")
            os.replace(tmp, staged)
        else:
            account = secrets["account"]
            _clef(layout, ["newaccount"], f"{account}\n", keystore=str(staging),
                  light_kdf=req.get("light_kdf") is True)
            files = [f for f in staging.iterdir() if f.is_file() and _address_of(f)]
            if len(files) != 1:
                raise AdminError(f"clef newaccount left {len(files)} key files in staging, expected 1")
            staged = files[0]
            address = _address_of(staged) or ""
        existing = {a["address"]: a for a in _accounts(layout)}
        if address in existing and existing[address]["credential"]:
            return {"address": address, "changed": False}
        _setpw(layout, address, secrets)
        if address not in existing:
            os.replace(staged, keystore / staged.name)
            _fsync_dir(keystore)
    finally:
        _clear_staging(staging)
    return {"address": address, "changed": True}


def _address_of_text(text: str) -> str:
    try:
        data = json.loads(text)
    except ValueError:
        raise AdminError("the keystore to import is not JSON") from None
    address = data.get("address") if isinstance(data, dict) else None
    crypto = data.get("crypto") or data.get("Crypto") if isinstance(data, dict) else None
    if not isinstance(address, str) or not _ADDRESS_RE.match(address) or not isinstance(crypto, dict):
        raise AdminError("the file to import is not an encrypted keystore (v3) with an address")
    return "0x" + address.lower().removeprefix("0x")


def _clear_staging(staging: Path) -> None:
    if staging.is_dir():
        for f in staging.iterdir():
            f.unlink()


def _setpw(layout: dict[str, Any], address: str, secrets: dict[str, str]) -> None:
    """`clef setpw`: the account password twice, then the master password, all on stdin."""
    account = secrets["account"]
    _clef(layout, ["setpw", address], f"{account}\n{account}\n{secrets['master']}\n")


def cmd_setpw(req: dict[str, Any]) -> dict[str, Any]:
    """Store the account password for an account already in the keystore."""
    layout, secrets = req["layout"], req["secrets"]
    address = req["address"]
    _setpw(layout, address, secrets)
    return {"address": address, "changed": True}


def cmd_install_rules(req: dict[str, Any]) -> dict[str, Any]:
    """rules.js: temporary file, `clef attest` its hash, rename into place, then the public record.

    The temporary file is complete and on disk before the attestation; the rename
    follows at once, so the installed file and the attested hash differ only for
    the instant between two syscalls, and Clef (which reads rules only at start)
    is restarted by the laptop only afterwards.
    """
    layout = req["layout"]
    uid, gid = _owner_ids(layout)
    data = req["rules"].encode()
    digest = _sha256(data)
    rules, record = Path(layout["rules"]), Path(layout["rules_record"])
    current, recorded = _read_or_none(rules), _read_or_none(record)
    recorded_digest = recorded.decode().strip() if recorded else None
    if current is not None and _sha256(current) == digest and recorded_digest == digest:
        return {"sha256": digest, "changed": False}
    _ensure_dir(rules.parent, uid, gid)
    tmp = _write_temp(rules.parent, data, 0o600, uid, gid, prefix=f".{rules.name}.")
    try:
        _clef(layout, ["attest", digest], f"{req['secrets']['master']}\n")
    except BaseException:
        tmp.unlink()
        raise
    os.replace(tmp, rules)
    _fsync_dir(rules.parent)
    _install_atomically(record, f"{digest}\n".encode(), 0o644, uid, gid)
    return {"sha256": digest, "changed": True}


def cmd_reset_windows(req: dict[str, Any]) -> dict[str, Any]:
    """Forget the rules' spending record and clock mark: only with the master password.

    Clef proves the password by re-attesting the hash already attested (no change to the vault's
    config); only then is the rules' storage (jsstorage.json, encrypted under the master seed)
    removed. Clef reads it on every request, so the windows are empty from the next request on.
    """
    layout = req["layout"]
    recorded = _read_or_none(Path(layout["rules_record"]))
    if recorded is None:
        raise AdminError("no rules are attested on the device: nothing to reset")
    _clef(layout, ["attest", recorded.decode().strip()], f"{req['secrets']['master']}\n")
    removed = []
    for vault in _vault_dirs(layout):
        store = vault / "jsstorage.json"
        if store.exists():
            store.unlink()
            _fsync_dir(vault)
            removed.append(str(store))
    return {"changed": bool(removed), "removed": removed}


def cmd_install_config(req: dict[str, Any]) -> dict[str, Any]:
    """The agent config, atomically (root-owned, group Clef's user's group)."""
    layout = req["layout"]
    path = Path(layout["agent_config"])
    data = req["content"].encode()
    if _read_or_none(path) == data:
        return {"changed": False}
    try:
        gid = grp.getgrnam(layout["agent_config_group"]).gr_gid
    except KeyError:
        raise AdminError(f"group {layout['agent_config_group']!r} does not exist on the device") from None
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    _install_atomically(path, data, layout["agent_config_mode"], os.geteuid(), gid)
    return {"changed": True}


def cmd_restart_agent(req: dict[str, Any]) -> dict[str, Any]:
    layout = req["layout"]
    proc = subprocess.run(layout["agent_restart"], capture_output=True, timeout=120, check=False,
                          env=_clean_env(), stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).decode(errors="replace").strip().splitlines()
        raise AdminError(f"restarting the agent failed: {tail[-1] if tail else proc.returncode}")
    return {"changed": True}


def cmd_agent(req: dict[str, Any]) -> dict[str, Any]:
    """`python3 -m armory_agent unlock|status` as Clef's user; the master password on its stdin."""
    layout = req["layout"]
    action = req["action"]
    if action not in ("unlock", "status", "lock"):
        raise AdminError(f"unknown agent action {action!r}")
    argv = [*layout["as_clef_user"], *layout["agent_command"], action, "--config", layout["agent_config"]]
    stdin = f"{req['secrets']['master']}\n" if action == "unlock" else ""
    proc = subprocess.run(argv, input=stdin.encode(), capture_output=True, timeout=300, check=False,
                          env=_agent_env(layout))
    out = proc.stdout.decode(errors="replace").strip()
    err = proc.stderr.decode(errors="replace").strip()
    result: dict[str, Any] = {"status": proc.returncode, "stdout": out, "stderr": err.splitlines()[-1:] }
    if action == "status" and proc.returncode == 0:
        try:
            result["json"] = json.loads(out)
        except ValueError:
            result["json"] = None
    return result


def _agent_env(layout: dict[str, Any]) -> dict[str, str]:
    env = _clean_env()
    if layout.get("agent_pythonpath"):
        env["PYTHONPATH"] = layout["agent_pythonpath"]
    return env


# ---------------------------------------------------------------- facts for the checks


def _stat_entry(path: Path) -> dict[str, Any]:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return {"path": str(path), "exists": False}
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    kind = "dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else "other"
    return {"path": str(path), "exists": True, "mode": stat.S_IMODE(st.st_mode), "owner": owner,
            "type": kind}


def _permissions(layout: dict[str, Any]) -> dict[str, Any]:
    keystore, configdir = Path(layout["keystore"]), Path(layout["configdir"])
    key_files = [_stat_entry(f) for f in sorted(keystore.iterdir())] if keystore.is_dir() else []
    vaults = []
    for vault in _vault_dirs(layout):
        vaults.append({"dir": _stat_entry(vault), "files": [_stat_entry(f) for f in sorted(vault.iterdir())]})
    return {
        "keystore": _stat_entry(keystore),
        "key_files": key_files,
        "configdir": _stat_entry(configdir),
        "masterseed": _stat_entry(configdir / "masterseed.json"),
        "vaults": vaults,
        "rules": _stat_entry(Path(layout["rules"])),
    }


# Kernel and virtual filesystems: nothing of ours is stored there, and some files block when read
# (/proc/kmsg), so they are never searched, wherever they are mounted (e.g. inside a chroot).
_PSEUDO_FS = {"proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs",
              "securityfs", "pstore", "bpf", "configfs", "fusectl", "mqueue", "hugetlbfs",
              "binfmt_misc", "autofs", "efivarfs", "rpc_pipefs", "nsfs"}


def _pseudo_mounts() -> set[str]:
    found = set()
    for line in (_read_sys("/proc/self/mounts") or "").splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] in _PSEUDO_FS:
            found.add(fields[1].replace("\\040", " "))
    return found


def _walk(layout: dict[str, Any]) -> Iterator[Path]:
    skip = tuple(layout["search_skip"])
    pseudo = _pseudo_mounts()
    for root in layout["search_roots"]:
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames[:] = [d for d in dirnames
                           if not os.path.join(dirpath, d).startswith(skip)
                           and os.path.join(dirpath, d) not in pseudo]
            for name in filenames:
                path = Path(dirpath, name)
                try:
                    if stat.S_ISREG(path.lstat().st_mode):
                        yield path
                except OSError:
                    continue


def _looks_like_keystore(head: bytes) -> bool:
    if not head.lstrip().startswith(b"{") or b"ciphertext" not in head:
        return False
    try:
        data = json.loads(head)
    except ValueError:
        return False
    if not isinstance(data, dict):
        return False
    crypto = data.get("crypto") or data.get("Crypto")
    return isinstance(crypto, dict) and "ciphertext" in crypto and "kdf" in crypto


def _scan(layout: dict[str, Any], secrets: list[str]) -> dict[str, Any]:
    """One walk over the filesystems: keystore-format files outside the keystore, and secret hits."""
    keystore = os.path.realpath(layout["keystore"])
    needles = [s.encode() for s in secrets if s]
    overlap = max((len(n) for n in needles), default=1) - 1
    stray: list[str] = []
    hits: dict[int, list[str]] = {i: [] for i in range(len(needles))}
    files = 0
    for path in _walk(layout):
        files += 1
        try:
            with open(path, "rb") as f:
                head = f.read(_KEYSTORE_MAX + 1)
                if len(head) <= _KEYSTORE_MAX and os.path.realpath(path.parent) != keystore \
                        and _looks_like_keystore(head):
                    stray.append(str(path))
                if not needles:
                    continue
                tail = b""
                chunk = head
                while chunk:
                    window = tail + chunk
                    for i, n in enumerate(needles):
                        if n in window and str(path) not in hits[i]:
                            hits[i].append(str(path))
                    tail = window[-overlap:] if overlap else b""
                    chunk = f.read(_CHUNK)
        except OSError:
            continue
    journal: dict[str, Any] = {"searched": False, "hits": [0] * len(needles)}
    if needles and layout["journal_command"]:
        journal = _search_journal(layout, needles, overlap)
    return {"files_searched": files, "stray_keystores": stray,
            "secret_files": [hits[i] for i in range(len(needles))], "journal": journal}


def _search_journal(layout: dict[str, Any], needles: list[bytes], overlap: int) -> dict[str, Any]:
    try:
        proc = subprocess.Popen(layout["journal_command"], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=_clean_env())
    except FileNotFoundError:
        return {"searched": False, "error": "journal command not found", "hits": [0] * len(needles)}
    counts = [0] * len(needles)
    tail = b""
    assert proc.stdout is not None
    while chunk := proc.stdout.read(_CHUNK):
        window = tail + chunk
        for i, n in enumerate(needles):
            counts[i] += window.count(n)
        tail = window[-overlap:] if overlap else b""
    proc.wait(timeout=60)
    return {"searched": proc.returncode == 0, "hits": counts}


def _hex_address(text: str) -> str:
    raw = bytes.fromhex(text)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)


def _socket_owners() -> dict[str, str]:
    owners: dict[str, str] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            comm = (proc / "comm").read_text().strip()
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    owners.setdefault(target[8:-1], comm)
        except OSError:
            continue
    return owners


def _listeners() -> list[dict[str, Any]]:
    """Listening TCP and bound UDP sockets of this network namespace, with their process names."""
    owners = _socket_owners()
    found = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = Path("/proc/net", proto).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            if proto.startswith("tcp") and state != "0A":
                continue
            if proto.startswith("udp") and remote.split(":")[1] != "0000" and state != "07":
                continue
            host_hex, port_hex = local.split(":")
            found.append({"proto": proto[:3], "host": _hex_address(host_hex), "port": int(port_hex, 16),
                          "process": owners.get(inode, "?")})
    return found


def _run_text(argv: list[str]) -> dict[str, Any]:
    if not argv:
        return {"ok": False, "error": "not configured"}
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=60, check=False, env=_clean_env(),
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        return {"ok": False, "error": f"{argv[0]} not found"}
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()
        return {"ok": False, "error": tail[-1] if tail else f"exit status {proc.returncode}"}
    return {"ok": True, "text": proc.stdout.decode(errors="replace")}


def _read_sys(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _core_limits() -> list[dict[str, Any]]:
    """RLIMIT_CORE of the Clef and agent processes (0 means no core dumps from them)."""
    found = []
    own_netns = os.readlink("/proc/self/ns/net")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.readlink(proc / "ns" / "net") != own_netns:
                continue  # another namespace's processes are not this device's services
            comm = (proc / "comm").read_text().strip()
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            if comm != "clef" and b"armory_agent" not in b" ".join(cmdline[:4]):
                continue
            if b"armory_agent.device_admin" in cmdline:
                continue
            for line in (proc / "limits").read_text().splitlines():
                if line.startswith("Max core file size"):
                    soft, hard = line.split()[4:6]
                    found.append({"pid": int(proc.name), "process": comm, "soft": soft, "hard": hard})
        except OSError:
            continue
    return found


def cmd_facts(req: dict[str, Any]) -> dict[str, Any]:
    """Everything the key-handling checks judge; the laptop decides pass/fail."""
    layout = req["layout"]
    secrets = [s for s in req.get("secrets", {}).get("search", [])]
    rules = _read_or_none(Path(layout["rules"]))
    record = _read_or_none(Path(layout["rules_record"]))
    swaps = (_read_sys("/proc/swaps") or "").splitlines()[1:]
    return {
        "permissions": _permissions(layout),
        "scan": _scan(layout, secrets),
        "listeners": _listeners(),
        "nft": _run_text(list(layout["nft_command"])),
        "sysctl": {
            "ip_forward": _read_sys("/proc/sys/net/ipv4/ip_forward"),
            "ipv6_forwarding": _read_sys("/proc/sys/net/ipv6/conf/all/forwarding"),
            "core_pattern": _read_sys("/proc/sys/kernel/core_pattern"),
            "suid_dumpable": _read_sys("/proc/sys/fs/suid_dumpable"),
            "ptrace_scope": _read_sys("/proc/sys/kernel/yama/ptrace_scope"),
        },
        "swaps": swaps,
        "core_limits": _core_limits(),
        "sshd": _run_text(list(layout["sshd_effective_config"])),
        "rules_sha256": _sha256(rules) if rules is not None else None,
        "rules_record": record.decode().strip() if record is not None else None,
        "agent_status": cmd_agent({**req, "action": "status"}) if layout["agent_command"] else None,
    }


def cmd_system(req: dict[str, Any]) -> dict[str, Any]:
    """Which system runs here: Debian point release, and the image's record (security updates...)."""
    return sysinfo.read()


@contextlib.contextmanager
def _admin_lock(layout: dict[str, Any]) -> Iterator[None]:
    """One device_admin at a time: a re-run waits for a step still finishing after a dropped link."""
    state_dir = Path(layout["state_dir"])
    if not state_dir.is_dir():
        yield
        return
    fd = os.open(state_dir / ".admin.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


COMMANDS = {
    "state": cmd_state,
    "init": cmd_init,
    "add-account": cmd_add_account,
    "setpw": cmd_setpw,
    "install-rules": cmd_install_rules,
    "install-config": cmd_install_config,
    "reset-windows": cmd_reset_windows,
    "restart-agent": cmd_restart_agent,
    "agent": cmd_agent,
    "facts": cmd_facts,
    "system": cmd_system,
}


def _frozen_call(command: str, req: dict[str, Any]) -> dict[str, Any]:
    """The calls ./do update needs: the same in every contract version (armory_agent/contract.py)."""
    if command == "hello":
        return slots.hello().to_json()
    if command == "slots":
        return slots.slots().to_json()
    if command == "write-slot":
        return slots.write_slot(contract.WriteSlot.from_json(req.get("params")), sys.stdin.buffer).to_json()
    if command == "activate-slot":
        return slots.activate(contract.ActivateSlot.from_json(req.get("params"))).to_json()
    return slots.reboot().to_json()


def _check_contract(command: str, req: dict[str, Any]) -> None:
    """A laptop on another contract may only make the frozen calls (it is told to update first)."""
    laptop = req.get("contract", contract.NO_HELLO)
    if command not in contract.FROZEN and laptop != contract.VERSION:
        raise AdminError(contract.mismatch(contract.VERSION, laptop if isinstance(laptop, int) else 0))


def main(argv: list[str]) -> int:
    # A dropped SSH connection must not stop a step half-way.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    os.umask(0o077)
    known = [*COMMANDS, *contract.FROZEN]
    if len(argv) != 1 or argv[0] not in known:
        print(json.dumps({"error": f"usage: device_admin {{{','.join(known)}}} < request.json",
                          "contract": contract.VERSION}))
        return 2
    try:
        # One JSON line; write-slot's data stream follows it on stdin.
        req = json.loads(sys.stdin.buffer.readline() or b"{}")
        if not isinstance(req, dict):
            raise AdminError("the request on stdin is not a JSON object")
        _check_contract(argv[0], req)
        if argv[0] in contract.FROZEN:
            result = _frozen_call(argv[0], req)
        else:
            if not isinstance(req.get("layout"), dict):
                raise AdminError("the request on stdin has no layout")
            with _admin_lock(req["layout"]):
                result = COMMANDS[argv[0]](req)
    except (AdminError, slots.SlotError) as e:
        result, status = {"error": str(e)}, 2
    except (OSError, ValueError, KeyError, subprocess.SubprocessError) as e:
        result, status = {"error": f"{type(e).__name__}: {e}"}, 2
    else:
        status = 0
    try:
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    except OSError:
        pass  # the laptop went away; the work is done and the next run's "state" will show it
    return status


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
