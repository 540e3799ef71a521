// ethers.js v6 in a "dapp qube" (tests/test_qubes_netns.py): lists accounts and signs a message
// through the qube's proxy on 127.0.0.1:8550. argv: message. Prints one JSON report.
import { JsonRpcProvider, verifyMessage } from "ethers";

const message = process.argv[2];
const provider = new JsonRpcProvider("http://127.0.0.1:8550");
const report = {};
try {
  report.chainId = (await provider.getNetwork()).chainId.toString();
  report.accounts = (await provider.listAccounts()).map((s) => s.address);
  const signer = await provider.getSigner(report.accounts[0]);
  report.signature = await signer.signMessage(message);
  report.recovered = verifyMessage(message, report.signature);
} catch (e) {
  report.error = String(e.shortMessage || e.message || e);
} finally {
  provider.destroy();
}
console.log(JSON.stringify(report));
