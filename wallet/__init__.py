"""`./do wallet`: a JSON-RPC endpoint on the laptop that fills, has the armory sign, and broadcasts.

The armory signs and never sends (it has no network). Everyday tools (cast, web3.py, ethers, viem)
expect a node with an unlocked account: this endpoint is that, with the key still on the device.
One module per concern: `guard` (who may call), `upstream` (JSON-RPC to the node and the armory),
`fill` (completing a transaction from the node), `nonces` (per-account order), `server` (the door).
"""
