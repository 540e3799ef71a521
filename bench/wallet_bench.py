"""Benchmark: `cast send` through `./do wallet` vs straight to the node, same node, same run.

The host's real Clef behind the real agent (light keystore, rules rendered from a signing policy as
provisioning renders them: the recipient, a value cap, the default fee caps), anvil as the node,
the wallet in this process. Sends alternate: `cast send --unlocked` from anvil's own unlocked
account straight to anvil (the node signs: what the wallet imitates; the issue's `--private-key`
would put a key on the command line, which the project never does), and `cast send --unlocked`
from the armory's account through the wallet. Both use `--async` (no receipt polling in the timing).

Prints p50/p99 of each, their ratio, the armory's time as the wallet saw it (its round trip to the
agent) and as Clef's audit log shows it, what a forwarded read costs (cast makes several per send),
and the wallet's own overhead per send: the wallet's handling time of eth_sendTransaction minus its
armory round trip. Target (issue 13): overhead p50 <= 10 ms.

    .venv/bin/python bench/wallet_bench.py [--sends 30]
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from clef_armory import clef, config  # noqa: E402
from clef_armory.config import WalletSettings  # noqa: E402
from tests.agent_helpers import free_port, make_clef_state, running_agent, write_agent_config  # noqa: E402
from tests.wallet_helpers import Node, WalletThread, npm_tools, policy_rules, rpc  # noqa: E402

CHAIN_ID = 1337
RECIPIENT = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"
POLICY = {"version": 2, "chain_ids": [CHAIN_ID], "recipients": [RECIPIENT], "max_value_eth": "0.01"}
_AUDIT = re.compile(r"^time=(\S+) .*msg=SignTransaction api=signer type=(request|response)")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cast_send(cast: Path, url: str, sender: str) -> float:
    t0 = time.perf_counter()
    argv = [str(cast), "send", "--async", "--unlocked", "--from", sender, "--rpc-url", url, RECIPIENT,
            "--value", "1"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    elapsed = (time.perf_counter() - t0) * 1000
    if proc.returncode != 0:
        raise SystemExit(f"cast send failed: {proc.stderr.strip()[-300:]}")
    return elapsed


def read_ms(url: str, count: int) -> list[float]:
    """eth_blockNumber round trips over one kept-alive connection (what a forwarded read costs)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_blockNumber", "params": []})
    out = []
    try:
        for _ in range(count):
            t0 = time.perf_counter()
            conn.request("POST", "/", body, {"Content-Type": "application/json", "Host": f"{host}:{port}"})
            conn.getresponse().read()
            out.append((time.perf_counter() - t0) * 1000)
    finally:
        conn.close()
    return out


def clef_sign_ms(audit_log: Path) -> list[float]:
    """SignTransaction request -> response in Clef's own audit log (millisecond timestamps)."""
    out, started = [], None
    for line in audit_log.read_text().splitlines():
        m = _AUDIT.match(line)
        if not m:
            continue
        when = datetime.datetime.fromisoformat(m.group(1).replace("Z", "+00:00"))
        if m.group(2) == "request":
            started = when
        elif started is not None:
            out.append((when - started).total_seconds() * 1000)
            started = None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sends", type=int, default=30, help="sends of each kind")
    args = parser.parse_args()
    settings = config.load()
    binary = clef.acquire("source", version=settings.clef_version, arch=clef.host_arch(),
                          cache_dir=settings.cache_path).path
    tools = npm_tools(settings.cache_path)
    cast = tools / ".bin" / "cast"
    with tempfile.TemporaryDirectory(prefix="wallet-bench-") as tmp:
        root = Path(tmp)
        rules, signatures = policy_rules(POLICY, "wallet-bench-policy.yaml")
        state = make_clef_state(binary, root / "state", rules_text=rules)
        cfg_path = root / "agent.json"
        cfg = write_agent_config(cfg_path, binary, state.state_dir)
        cfg["clef"]["chain_id"] = CHAIN_ID
        cfg["eth"] = {"method_signatures": signatures}
        cfg_path.write_text(json.dumps(cfg))
        node = Node.anvil(tools, CHAIN_ID, root / "anvil.log")
        try:
            with running_agent(cfg_path) as agent:
                if agent.unlock_cli(state.master_password).returncode != 0:
                    raise SystemExit("could not unlock the agent")
                rpc(node.url, "anvil_setBalance", [state.address, hex(10**21)])
                local = rpc(node.url, "eth_accounts")[0]  # anvil's own unlocked account
                wallet = WalletThread(WalletSettings(rpc=node.url, listen=f"127.0.0.1:{free_port()}",
                                                     armory=f"http://{agent.address}:{agent.port}"))
                try:
                    for _ in range(3):  # warm up both paths (connections, caches)
                        cast_send(cast, node.url, local)
                        cast_send(cast, wallet.url, state.address)
                    skip = len(wallet.records)
                    direct, through = [], []
                    for _ in range(args.sends):
                        direct.append(cast_send(cast, node.url, local))
                        through.append(cast_send(cast, wallet.url, state.address))
                    records = wallet.records[skip:]
                    reads_direct, reads_through = read_ms(node.url, 200), read_ms(wallet.url, 200)
                finally:
                    wallet.stop()
                clef_ms = clef_sign_ms(state.state_dir / "clef-audit.log")[-args.sends:]
        finally:
            node.stop()
    sent = [r for r in records if r.tx_hash]
    if len(sent) != args.sends:
        raise SystemExit(f"only {len(sent)} of {args.sends} sends went through the wallet")
    armory = [r.armory_ms for r in sent]
    overhead = [r.total_ms - r.armory_ms for r in sent]
    print(f"{args.sends} sends of each kind, anvil, Clef {settings.clef_version} (light keystore)")
    print(f"  cast send straight to the node (node signs):  p50 {pct(direct, .5):7.1f} ms  "
          f"p99 {pct(direct, .99):7.1f} ms")
    print(f"  cast send through ./do wallet (armory signs): p50 {pct(through, .5):7.1f} ms  "
          f"p99 {pct(through, .99):7.1f} ms")
    print(f"  ratio (p50): {pct(through, .5) / pct(direct, .5):.2f}x; "
          f"difference {statistics.median(through) - statistics.median(direct):.1f} ms")
    print(f"  armory round trip (agent + Clef) p50 {pct(armory, .5):.1f} ms; "
          f"Clef's audit log, request to response, p50 {pct(clef_ms, .5):.1f} ms")
    print(f"  a forwarded read (eth_blockNumber): p50 {pct(reads_through, .5):.2f} ms through the wallet, "
          f"{pct(reads_direct, .5):.2f} ms straight to the node")
    verdict = "meets" if pct(overhead, .5) <= 10 else "MISSES"
    print(f"  wallet's own overhead per send (handling minus armory round trip): "
          f"p50 {pct(overhead, .5):.1f} ms, p99 {pct(overhead, .99):.1f} ms ({verdict} the 10 ms p50 target)")


if __name__ == "__main__":
    main()
