"""Benchmark: account_signTransaction through the agent, standard vs light keystore, side by side.

One run, the host's real Clef, loopback only. One Clef state holds two accounts: one made
with `clef newaccount` (standard scrypt, N=2^18, a chosen password) and one with
`clef --lightkdf newaccount` (N=2^12, a generated 12-word password), as provisioning makes
them; the master seed is standard scrypt in both cases. Signatures alternate between the two
accounts through one agent. Prints p50/p99 per kind, the ratio, Clef's peak RSS over 20
signatures of each kind after unlock (VmHWM, reset via /proc/PID/clear_refs), and the time
of `newaccount` + `setpw` per kind (what provisioning spends per account).
Targets (issue 15): light p50 <= 1/10 of standard; signing peak <= 64 MiB.

    .venv/bin/python bench/sign_bench.py [--signatures 20]
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from clef_armory import clef, config  # noqa: E402
from provision import words  # noqa: E402
from tests.agent_helpers import AgentProcess, write_agent_config  # noqa: E402

MASTER = "bench-master-password"
CHOSEN = "bench-chosen-account-password"
RULES = """\
function ApproveListing(req) { return "Approve" }
function ApproveTx(req) { return "Approve" }
function OnSignerStartup(info) {}
function OnApprovedTx(resp) {}
"""


def run_clef(binary: Path, state: Path, args: list[str], stdin: str, light: bool = False) -> str:
    argv = [str(binary), "--configdir", str(state / "clef"), "--keystore", str(state / "keystore"),
            "--suppress-bootwarn", *(["--lightkdf"] if light else []), *args]
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"clef {args[0]} failed: {proc.stderr.strip()[-300:]}")
    return proc.stdout + proc.stderr


def new_account(binary: Path, state: Path, password: str, light: bool) -> tuple[str, float]:
    """newaccount (+ --lightkdf when light) then setpw, timed as provisioning does them."""
    t0 = time.perf_counter()
    out = run_clef(binary, state, ["newaccount"], f"{password}\n", light=light)
    address = next(line.split()[-1] for line in out.splitlines() if line.startswith("Generated account"))
    run_clef(binary, state, ["setpw", address], f"{password}\n{password}\n{MASTER}\n")
    return address, time.perf_counter() - t0


def kdf_n(state: Path, address: str) -> int:
    key = next(f for f in (state / "keystore").iterdir() if f.name.endswith(address.lower()[2:]))
    return int(json.loads(key.read_text())["crypto"]["kdfparams"]["n"])


def sign(port: int, address: str, nonce: int) -> float:
    tx = {"from": address, "to": "0x" + "11" * 20, "value": "0x1", "gas": "0x5208",
          "maxFeePerGas": hex(30 * 10**9), "maxPriorityFeePerGas": hex(10**9), "nonce": hex(nonce),
          "chainId": "0x1", "data": "0x"}
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "account_signTransaction", "params": [tx]})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    t0 = time.perf_counter()
    conn.request("POST", "/", body=body, headers={"Content-Type": "application/json",
                                                  "Host": f"127.0.0.1:{port}"})
    data = conn.getresponse().read()
    took = time.perf_counter() - t0
    conn.close()
    if b'"result"' not in data:
        raise SystemExit(f"signing failed: {data[:200]!r}")
    return took


def clef_pid(agent_pid: int) -> int:
    for child in Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split():
        if Path(f"/proc/{child}/comm").read_text().strip() == "clef":
            return int(child)
    raise SystemExit("no clef child of the agent")


def status_mib(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def settle(pid: int, limit: float) -> float:
    """Wait (at most ``limit`` s) until Clef's RSS is under 64 MiB; returns the seconds waited."""
    t0 = time.monotonic()
    while status_mib(pid, "VmRSS") > 64 and time.monotonic() - t0 < limit:
        time.sleep(1)
    return time.monotonic() - t0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--signatures", type=int, default=20, help="signatures per kind (and per peak)")
    parser.add_argument("--settle", type=float, default=120.0,
                        help="seconds to wait after unlock for Clef's RSS to fall (Go's scavenger)")
    args = parser.parse_args()
    settings = config.load()
    binary = clef.acquire("source", version=settings.clef_version, arch=clef.host_arch(),
                          cache_dir=settings.cache_path).path
    with tempfile.TemporaryDirectory(prefix="sign-bench-") as tmp:
        state = Path(tmp) / "state"
        state.mkdir(mode=0o700)
        print("setting up Clef state (standard master seed, one standard and one light account) ...",
              flush=True)
        run_clef(binary, state, ["init"], f"{MASTER}\n{MASTER}\n")
        standard, t_standard = new_account(binary, state, CHOSEN, light=False)
        light, t_light = new_account(binary, state, words.generate().value, light=True)
        assert kdf_n(state, standard) == 262144 and kdf_n(state, light) == 4096
        (state / "rules.js").write_text(RULES)
        run_clef(binary, state, ["attest", hashlib.sha256(RULES.encode()).hexdigest()], f"{MASTER}\n")
        write_agent_config(Path(tmp) / "agent.json", binary, state)
        agent = AgentProcess(Path(tmp) / "agent.json").start()
        try:
            if agent.unlock_cli(MASTER).returncode != 0:
                raise SystemExit("unlock failed:\n" + agent.log_text()[-2000:])
            assert agent.proc is not None
            pid = clef_pid(agent.proc.pid)
            print(f"clef pid {pid}: VmHWM after unlock {status_mib(pid, 'VmHWM'):.0f} MiB "
                  f"(the master seed's standard scrypt), VmRSS {status_mib(pid, 'VmRSS'):.0f} MiB")
            # Go keeps the master seed's 256 MiB scrypt buffer mapped until its scavenger returns it.
            waited = settle(pid, args.settle)
            print(f"VmRSS {status_mib(pid, 'VmRSS'):.0f} MiB after {waited:.0f} s idle "
                  f"(waits at most {args.settle:.0f} s for it to fall under 64 MiB)", flush=True)
            times: dict[str, list[float]] = {"standard": [], "light": []}
            nonce = 0
            for _ in range(args.signatures):  # alternating: both see the same machine load
                for name, address in (("standard", standard), ("light", light)):
                    times[name].append(sign(agent.port, address, nonce))
                    nonce += 1
            peaks = {}
            for name, address in (("light", light), ("standard", standard)):
                settle(pid, args.settle)  # the rounds before used standard scrypt
                Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the high-water mark
                for _ in range(args.signatures):
                    sign(agent.port, address, nonce)
                    nonce += 1
                peaks[name] = status_mib(pid, "VmHWM")
                print(f"{name}: VmHWM {peaks[name]:.0f} MiB over {args.signatures} signatures", flush=True)
        finally:
            agent.stop()
    print(f"{'keystore':>9} {'p50 ms':>9} {'p99 ms':>9} {'peak MiB':>9} {'newaccount+setpw s':>19}")
    for name, made in (("standard", t_standard), ("light", t_light)):
        lat = times[name]
        print(f"{name:>9} {pct(lat, 0.5) * 1e3:>9.1f} {pct(lat, 0.99) * 1e3:>9.1f} {peaks[name]:>9.0f} "
              f"{made:>19.2f}")
    ratio = pct(times["light"], 0.5) / pct(times["standard"], 0.5)
    print(f"light/standard p50: {ratio:.3f} (target <= 0.1); "
          f"light signing peak {peaks['light']:.0f} MiB (target <= 64)")


if __name__ == "__main__":
    main()
