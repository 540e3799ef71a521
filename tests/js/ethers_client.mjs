// ethers.js v6 as a dapp would use it, pointed at the agent (tests/test_ethapi_clients.py).
// Reads {url, address, chainId, token} as JSON on stdin; prints one JSON report on stdout.
// Every signature is verified here with ethers' own recovery, and again in Python.
import {
  Interface,
  JsonRpcProvider,
  Transaction,
  verifyMessage,
  verifyTypedData,
} from "ethers";

const input = JSON.parse(await new Promise((resolve) => {
  let text = "";
  process.stdin.on("data", (chunk) => { text += chunk; });
  process.stdin.on("end", () => resolve(text));
}));

const report = {};
const provider = new JsonRpcProvider(input.url);
try {
  report.chainId = (await provider.getNetwork()).chainId.toString();
  report.accounts = (await provider.listAccounts()).map((s) => s.address);
  const signer = await provider.getSigner(input.address);
  report.signer = await signer.getAddress();

  const message = "clef-armory says hello to ethers";
  report.message = message;
  report.messageSignature = await signer.signMessage(message);
  report.messageRecovered = verifyMessage(message, report.messageSignature);

  const domain = { name: "Ether Mail", version: "1", chainId: input.chainId,
                   verifyingContract: "0xCcCCccccCCCCcCCCCCCcCcCccCcCCCcCcccccccC" };
  const types = {
    Person: [{ name: "name", type: "string" }, { name: "wallet", type: "address" }],
    Mail: [{ name: "from", type: "Person" }, { name: "to", type: "Person" },
           { name: "contents", type: "string" }, { name: "amount", type: "uint256" }],
  };
  const value = {
    from: { name: "Cow", wallet: "0xCD2a3d9F938E13CD947Ec05AbC7FE734Df8DD826" },
    to: { name: "Bob", wallet: "0xbBbBBBBbbBBBbbbBbbBbbbbBBbBbbbbBbBbbBBbB" },
    contents: "Hello, Bob!",
    amount: 1234567890123456789012345n,
  };
  report.typedSignature = await signer.signTypedData(domain, types, value);
  report.typedRecovered = verifyTypedData(domain, types, value, report.typedSignature);

  // Legacy transfer of ether; ethers sends `to` lower-cased, the agent checksums it for Clef.
  const legacy = { to: input.token.toLowerCase(), value: 1000n, nonce: 7, gasLimit: 21000n,
                   gasPrice: 1000000000n, chainId: input.chainId, type: 0 };
  const raw = await signer.signTransaction(legacy);
  const parsed = Transaction.from(raw);
  report.legacy = { raw, from: parsed.from, to: parsed.to, value: parsed.value.toString(),
                    nonce: parsed.nonce, chainId: parsed.chainId.toString(), type: parsed.type };

  // EIP-1559 ERC-20 transfer: calldata with a known selector.
  const erc20 = new Interface(["function transfer(address to, uint256 amount)"]);
  const data = erc20.encodeFunctionData("transfer", [input.recipient, 5n * 10n ** 18n]);
  const dynamic = { to: input.token, data, value: 0n, nonce: 8, gasLimit: 60000n,
                    maxFeePerGas: 30000000000n, maxPriorityFeePerGas: 1000000000n,
                    chainId: input.chainId, type: 2 };
  const raw2 = await signer.signTransaction(dynamic);
  const parsed2 = Transaction.from(raw2);
  report.erc20 = { raw: raw2, from: parsed2.from, to: parsed2.to, data: parsed2.data,
                   type: parsed2.type, chainId: parsed2.chainId.toString() };

  // The rules reject value 42: ethers must see a user rejection (EIP-1193 4001).
  try {
    await signer.signTransaction({ ...legacy, value: 42n });
    report.rejected = { code: "signed" };
  } catch (e) {
    report.rejected = { code: e.code, rpcCode: e.error?.code ?? e.info?.error?.code };
  }

  // Broadcasting is impossible on the device: the agent says so (EIP-1193 4200).
  try {
    await provider.send("eth_sendTransaction", [{ from: input.address, to: input.token }]);
    report.send = { rpcCode: "accepted" };
  } catch (e) {
    report.send = { rpcCode: e.error?.code, message: e.error?.message };
  }
} catch (e) {
  report.fatal = String(e && e.stack ? e.stack : e);
} finally {
  provider.destroy();
}
process.stdout.write(JSON.stringify(report) + "\n");
