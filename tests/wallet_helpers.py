"""Real parts for the wallet endpoint's tests: npm tools cached by lockfile, anvil, geth --dev, the wallet.

`npm_tools` runs `npm ci` for tests/wallet_js once per lockfile into the shared cache (moved in only
when complete). `Node` runs anvil or geth --dev on free loopback ports. `WalletThread` runs the
wallet (wallet.server.start) on its own event loop in a thread, so a test can read its records.
`policy_rules` renders a signing policy into rules.js as provisioning does.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from clef_armory.config import WalletSettings
from provision import agentconfig, rules
from provision import policy as signing_policy
from tests.agent_helpers import REPO, free_port, require_tool

JS_DIR = REPO / "tests" / "wallet_js"


def npm_tools(cache_dir: Path) -> Path:
    """node_modules for tests/wallet_js (anvil, cast, solc, ethers, viem), keyed by package-lock.json."""
    key = hashlib.sha256((JS_DIR / "package.json").read_bytes() + (JS_DIR / "package-lock.json").read_bytes())
    dest = cache_dir / "npm" / f"wallet-{key.hexdigest()[:16]}"
    if (dest / "node_modules" / ".complete").exists():
        return dest / "node_modules"
    npm = require_tool("npm")
    (cache_dir / "npm").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".wallet-", dir=cache_dir / "npm") as tmp:
        for name in ("package.json", "package-lock.json"):
            shutil.copy(JS_DIR / name, Path(tmp) / name)
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=tmp, check=True, timeout=900,
                       capture_output=True)
        (Path(tmp) / "node_modules" / ".complete").touch()
        with contextlib.suppress(OSError):  # another session may have won the race: theirs is as good
            os.rename(tmp, dest)
            os.mkdir(tmp)  # for TemporaryDirectory's cleanup
    return dest / "node_modules"


def policy_rules(policy: dict[str, Any], name: str) -> tuple[str, list[str]]:
    """rules.js and the agent's eth.method_signatures for a policy (the dict a policy.yaml holds),
    made as provisioning makes them: parsed, rendered through the overlay template."""
    parsed = signing_policy.parse(policy, where=name)
    return rules.render(parsed, name), agentconfig.method_signatures(parsed)


def rpc(url: str, method: str, params: Sequence[Any] = (), timeout: float = 30) -> Any:
    """One JSON-RPC call with urllib (no library between the test and the node); raises on error."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)}).encode()
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})  # noqa: S310 - http test URL
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
        reply = json.loads(resp.read())
    if "error" in reply:
        raise RuntimeError(f"{method}: {reply['error']}")
    return reply["result"]


def wait_receipt(url: str, tx_hash: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            receipt = rpc(url, "eth_getTransactionReceipt", [tx_hash])
        except RuntimeError as e:  # a fresh geth --dev: "transaction indexing is in progress" for a while
            if "indexing is in progress" not in str(e):
                raise
            receipt = None
        if receipt is not None:
            return dict(receipt)
        time.sleep(0.1)
    raise TimeoutError(f"no receipt for {tx_hash}")


class Node:
    """anvil or geth --dev on free loopback ports; `url` is its HTTP JSON-RPC."""

    def __init__(self, argv: list[str], port: int, log: Path) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{argv[0]} exited: {log.read_text(errors='replace')[-2000:]}")
            with contextlib.suppress(OSError, RuntimeError, ValueError):
                self.chain_id = int(rpc(self.url, "eth_chainId", timeout=2), 16)
                break
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"{argv[0]} did not answer on {self.url}")
            time.sleep(0.1)

    @classmethod
    def anvil(cls, tools: Path, chain_id: int, log: Path, hardfork: str = "cancun") -> Node:
        port = free_port()
        return cls([str(tools / ".bin" / "anvil"), "--port", str(port), "--host", "127.0.0.1",
                    "--chain-id", str(chain_id), "--hardfork", hardfork], port, log)

    @classmethod
    def geth_dev(cls, geth: Path, datadir: Path, log: Path) -> Node:
        port = free_port()
        return cls([str(geth), "--dev", "--datadir", str(datadir), "--http", "--http.addr", "127.0.0.1",
                    "--http.port", str(port), "--http.api", "eth,net,web3,txpool",
                    "--authrpc.port", str(free_port()), "--ipcdisable", "--nodiscover", "--maxpeers", "0",
                    "--port", "0", "--verbosity", "2"], port, log)

    def pending_transactions(self) -> int:
        """Transactions waiting in the node's pool (txpool_status: pending + queued)."""
        status = rpc(self.url, "txpool_status")
        return int(status["pending"], 16) + int(status["queued"], 16)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class WalletThread:
    """The wallet endpoint on its own event loop in a thread (started and stopped by the test)."""

    def __init__(self, settings: WalletSettings) -> None:
        self.lines: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        from wallet import server

        self.running = asyncio.run_coroutine_threadsafe(server.start(settings, self.lines.append),
                                                        self.loop).result(60)
        self.url = self.running.url

    @property
    def records(self) -> list[Any]:
        return list(self.running.wallet.records)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.running.close(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@contextlib.contextmanager
def running_wallet(settings: WalletSettings) -> Iterator[WalletThread]:
    w = WalletThread(settings)
    try:
        yield w
    finally:
        w.stop()


def script_dir(tools: Path, where: Path) -> Path:
    """A copy of tests/wallet_js's scripts beside a link to the cached node_modules (ES modules
    resolve packages from the script's own directory upwards; NODE_PATH does not apply to them)."""
    where.mkdir(parents=True, exist_ok=True)
    for path in JS_DIR.iterdir():
        if path.suffix in (".mjs", ".sol"):
            shutil.copy(path, where / path.name)
    (where / "node_modules").symlink_to(tools, target_is_directory=True)
    return where


def run_node_script(scripts: Path, script: str, request: dict[str, Any] | None = None,
                    timeout: float = 180) -> Any:
    """Run a script of `script_dir` with node, `request` as JSON on stdin, its JSON report back."""
    node = require_tool("node")
    proc = subprocess.run([node, str(scripts / script)], input=json.dumps(request or {}), capture_output=True,
                          text=True, timeout=timeout, cwd=scripts, env={"PATH": os.environ.get("PATH", "")},
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{script} failed: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout)
