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
    """Wait (at most ``limit`` s) until Clef has returned the master seed's 256 MiB scrypt buffer
    (RSS under 128 MiB); returns the seconds waited."""
    t0 = time.monotonic()
    while status_mib(pid, "VmRSS") > 128 and time.monotonic() - t0 < limit:
        time.sleep(1)
    return time.monotonic() - t0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def start_agent(tmp: Path, binary: Path, state: Path) -> tuple[AgentProcess, int]:
    write_agent_config(tmp / "agent.json", binary, state)
    agent = AgentProcess(tmp / "agent.json").start()
    if agent.unlock_cli(MASTER).returncode != 0:
        agent.stop()
        raise SystemExit("unlock failed:\n" + agent.log_text()[-2000:])
    assert agent.proc is not None
    return agent, clef_pid(agent.proc.pid)


def peak(pid: int, port: int, address: str, count: int, nonce: int) -> tuple[float, float]:
    """(VmRSS when the high-water mark was reset, VmHWM after ``count`` signatures)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    before = status_mib(pid, "VmRSS")
    for i in range(count):
        sign(port, address, nonce + i)
    return before, status_mib(pid, "VmHWM")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--signatures", type=int, default=20, help="signatures per kind (and per peak)")
    parser.add_argument("--settle", type=float, default=30.0,
                        help="seconds to wait after unlock for Clef's RSS to fall (Go's scavenger)")
    args = parser.parse_args()
    settings = config.load()
    binary = clef.acquire("source", version=settings.clef_version, arch=clef.host_arch(),
                          cache_dir=settings.cache_path).path
    n = args.signatures
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
        agent, pid = start_agent(Path(tmp), binary, state)
        try:
            print(f"clef pid {pid}: VmHWM after unlock {status_mib(pid, 'VmHWM'):.0f} MiB "
                  f"(the master seed's standard scrypt), VmRSS {status_mib(pid, 'VmRSS'):.0f} MiB")
            # With GOMEMLIMIT Go returns the master seed's 256 MiB scrypt buffer once it collects it.
            waited = settle(pid, args.settle)
            print(f"VmRSS {status_mib(pid, 'VmRSS'):.0f} MiB after {waited:.0f} s idle "
                  f"(waits at most {args.settle:.0f} s for it to fall under 128 MiB)", flush=True)
            peaks = {"light": peak(pid, agent.port, light, n, 0)}  # before any standard signature
            times: dict[str, list[float]] = {"standard": [], "light": []}
            nonce = n
            for _ in range(n):  # alternating: both see the same machine load
                for name, address in (("standard", standard), ("light", light)):
                    times[name].append(sign(agent.port, address, nonce))
                    nonce += 1
            peaks["standard"] = peak(pid, agent.port, standard, n, nonce)
        finally:
            agent.stop()

        # The signing cost alone: a Clef whose start needed no standard scrypt (test-only light seed).
        alone = Path(tmp) / "alone"
        alone.mkdir(mode=0o700)
        (alone / "state").mkdir(mode=0o700)
        run_clef(binary, alone / "state", ["init"], f"{MASTER}\n{MASTER}\n", light=True)
        light2, _ = new_account(binary, alone / "state", words.generate().value, light=True)
        (alone / "state" / "rules.js").write_text(RULES)
        run_clef(binary, alone / "state", ["attest", hashlib.sha256(RULES.encode()).hexdigest()],
                 f"{MASTER}\n")
        agent, pid = start_agent(alone, binary, alone / "state")
        try:
            peaks["light, light seed"] = peak(pid, agent.port, light2, n, 0)
        finally:
            agent.stop()

    print()
    print(f"{'keystore':>18} {'p50 ms':>8} {'p99 ms':>8} {'RSS before':>11} {'VmHWM':>6} "
          f"{'newaccount+setpw':>17}")
    for name, made in (("standard", f"{t_standard:.2f} s"), ("light", f"{t_light:.2f} s"),
                       ("light, light seed", "-")):
        lat = times.get(name)
        p50 = f"{pct(lat, 0.5) * 1e3:.1f}" if lat else "-"
        p99 = f"{pct(lat, 0.99) * 1e3:.1f}" if lat else "-"
        before, hwm = peaks[name]
        print(f"{name:>18} {p50:>8} {p99:>8} {before:>8.0f} MiB {hwm:>6.0f} {made:>17}")
    ratio = pct(times["light"], 0.5) / pct(times["standard"], 0.5)
    print(f"light/standard p50: {ratio:.3f} (target <= 0.1); VmHWM over {n} light signatures: "
          f"{peaks['light'][1]:.0f} MiB after a standard-seed unlock, "
          f"{peaks['light, light seed'][1]:.0f} MiB without it (target <= 64)")


if __name__ == "__main__":
    main()
