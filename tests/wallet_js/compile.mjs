// Compile Counter.sol with solc-js (no native solc can be downloaded here); prints {abi, bytecode, runtime}.
import { readFileSync } from "node:fs";
import solc from "solc";

const source = readFileSync(new URL("./Counter.sol", import.meta.url), "utf8");
const input = {
  language: "Solidity",
  sources: { "Counter.sol": { content: source } },
  settings: {
    evmVersion: "cancun",  // what both anvil and geth --dev run
    optimizer: { enabled: true, runs: 200 },
    outputSelection: { "*": { "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"] } },
  },
};
const output = JSON.parse(solc.compile(JSON.stringify(input)));
const errors = (output.errors || []).filter((e) => e.severity === "error");
if (errors.length) {
  process.stderr.write(errors.map((e) => e.formattedMessage).join("\n"));
  process.exit(1);
}
const c = output.contracts["Counter.sol"].Counter;
process.stdout.write(JSON.stringify({ abi: c.abi, bytecode: "0x" + c.evm.bytecode.object,
                                      runtime: "0x" + c.evm.deployedBytecode.object }) + "\n");
