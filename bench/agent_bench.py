"""Benchmark: account_list through the agent vs straight to Clef's loopback HTTP, side by side.

One run, real Clef, loopback only. Prints p50/p99 latency and requests/s at 1 and 8
concurrent clients, the ratios agent/direct, and the agent's resident memory after
10,000 requests. Targets (issue 3): added p50 <= 1 ms, throughput >= 0.8x direct, RSS <= 40 MiB.

    .venv/bin/python bench/agent_bench.py [--requests 2000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from clef_armory import clef, config  # noqa: E402
from tests.agent_helpers import (  # noqa: E402
    AgentProcess,
    make_clef_state,
    write_agent_config,
)

BODY = b""  # set in main() from --method


def run_clients(host: str, port: int, clients: int, total: int) -> tuple[list[float], float]:
    """(per-request latencies in seconds, requests per second) for `total` requests."""
    per_client = total // clients
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    barrier = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        conn = http.client.HTTPConnection(host, port, timeout=30)
        headers = {"Content-Type": "application/json", "Host": f"{host}:{port}"}
        barrier.wait()
        for _ in range(per_client):
            t0 = time.perf_counter()
            conn.request("POST", "/", body=BODY, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            latencies[i].append(time.perf_counter() - t0)
            if resp.status != 200 or b'"result"' not in data:
                errors.append(f"{resp.status} {data[:100]!r}")
                return
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join(300)
    elapsed = time.perf_counter() - start
    if errors:
        raise SystemExit(f"benchmark request failed: {errors[0]}")
    flat = [x for lat in latencies for x in lat]
    return flat, len(flat) / elapsed


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="alternating agent/direct rounds")
    parser.add_argument("--method", default="account_list", help="the JSON-RPC method measured")
    args = parser.parse_args()
    global BODY
    BODY = json.dumps({"jsonrpc": "2.0", "id": 1, "method": args.method, "params": []}).encode()

    settings = config.load()
    binary = clef.acquire(
        "source", version=settings.clef_version, arch=clef.host_arch(), cache_dir=settings.cache_path
    ).path
    with tempfile.TemporaryDirectory(prefix="agent-bench-") as tmp:
        root = Path(tmp)
        print("setting up Clef state (lightkdf) ...", flush=True)
        state = make_clef_state(binary, root / "state")
        cfg = write_agent_config(
            root / "agent.json", binary, state.state_dir,
            policy={"rate": 1e6, "burst": 1000000, "max_connections": 64},
        )  # fmt: skip
        agent = AgentProcess(root / "agent.json").start()
        try:
            if agent.unlock_cli(state.master_password).returncode != 0:
                raise SystemExit("unlock failed:\n" + agent.log_text()[-2000:])
            assert agent.proc is not None
            clef_port = int(cfg["clef"]["http_port"])
            through_agent = 0
            print(f"rss after unlock: {rss_mib(agent.proc.pid):.1f} MiB", flush=True)
            print(f"{'clients':>7} {'path':>6} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8}")
            summary = []
            for clients in (1, 8):
                results: dict[str, tuple[list[float], list[float]]] = {
                    "direct": ([], []),
                    "agent": ([], []),
                }
                for _ in range(args.rounds):
                    for name, port in (("direct", clef_port), ("agent", agent.port)):
                        lat, rps = run_clients("127.0.0.1", port, clients, args.requests)
                        results[name][0].extend(lat)
                        results[name][1].append(rps)
                        if name == "agent":
                            through_agent += len(lat)
                row = {}
                for name, (lat, rps_list) in results.items():
                    p50, p99, rps = pct(lat, 0.5), pct(lat, 0.99), statistics.median(rps_list)
                    row[name] = (p50, p99, rps)
                    print(f"{clients:>7} {name:>6} {p50 * 1e3:>8.3f} {p99 * 1e3:>8.3f} {rps:>8.0f}")
                summary.append((clients, row))
            while through_agent < 10_000:
                lat, _ = run_clients("127.0.0.1", agent.port, 8, min(2000, 10_000 - through_agent))
                through_agent += len(lat)
            rss = rss_mib(agent.proc.pid)
            print()
            for clients, row in summary:
                (d50, d99, drps), (a50, a99, arps) = row["direct"], row["agent"]
                print(
                    f"{clients} client(s): added p50 {(a50 - d50) * 1e3:.3f} ms, "
                    f"p50 ratio {a50 / d50:.2f}x, p99 ratio {a99 / d99:.2f}x, "
                    f"throughput {arps / drps:.2f}x direct"
                )
            print(f"agent RSS after {through_agent} requests: {rss:.1f} MiB")
        finally:
            agent.stop()  # flushes the audit log
        rpc_lines = sum(1 for line in agent.audit_path.open() if '"kind":"rpc"' in line)
        print(f"audit lines for requests: {rpc_lines} (requests sent: {through_agent})")


if __name__ == "__main__":
    main()
