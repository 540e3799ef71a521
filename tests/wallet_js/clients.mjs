// ethers v6 and viem as apps use them, sending through the wallet endpoint (tests/test_wallet.py).
// Reads {url, from, to, chainId, ethers, viem} on stdin: how many ether sends each library makes,
// all at once. Prints {ethers: [hash...], viem: [hash...]} or {fatal}.
import { JsonRpcProvider } from "ethers";
import { createWalletClient, defineChain, http } from "viem";

const input = JSON.parse(await new Promise((resolve) => {
  let text = "";
  process.stdin.on("data", (chunk) => { text += chunk; });
  process.stdin.on("end", () => resolve(text));
}));

const chain = defineChain({
  id: input.chainId, name: "test", nativeCurrency: { name: "Ether", symbol: "ETH", decimals: 18 },
  rpcUrls: { default: { http: [input.url] } },
});
const provider = new JsonRpcProvider(input.url, undefined, { staticNetwork: true, batchMaxCount: 1 });
const report = { ethers: [], viem: [] };
try {
  const signer = await provider.getSigner(input.from);           // JsonRpcSigner
  const wallet = createWalletClient({ account: input.from, chain, transport: http(input.url) });
  const sends = [];
  for (let i = 0; i < (input.ethers || 0); i++) {
    sends.push(signer.sendTransaction({ to: input.to, value: 1000n + BigInt(i) })
      .then((tx) => { report.ethers.push(tx.hash); }));
  }
  for (let i = 0; i < (input.viem || 0); i++) {
    sends.push(wallet.sendTransaction({ to: input.to, value: 2000n + BigInt(i) })
      .then((hash) => { report.viem.push(hash); }));
  }
  await Promise.all(sends);
} catch (e) {
  report.fatal = String(e && e.stack ? e.stack : e);
} finally {
  provider.destroy();
}
process.stdout.write(JSON.stringify(report) + "\n");
