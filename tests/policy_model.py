"""An independent Python model of what the rendered rules decide for a transaction (a test oracle).

It is written from docs/policy.md, not from rules.js, so the property test compares two
implementations: this model and the real Clef running the rendered rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from provision.policy import Policy

TRANSFER = "a9059cbb"
APPROVE = "095ea7b3"


def _int(v: Any) -> int:
    if v is None:
        return 0
    return int(v, 16) if isinstance(v, str) else int(v)


@dataclass
class Model:
    policy: Policy
    spent: list[int] = field(default_factory=list)  # costs signed inside the (never expiring) windows

    def verdict(self, tx: dict[str, Any]) -> bool:
        p = self.policy
        if _int(tx.get("chainId")) not in p.chain_ids:
            return False
        fee = _int(tx["maxFeePerGas"]) if "maxFeePerGas" in tx else _int(tx.get("gasPrice"))
        gas, value = _int(tx["gas"]), _int(tx.get("value"))
        if gas > p.max_gas or fee > p.max_fee_per_gas_wei or value > p.max_value_wei:
            return False
        data = (tx.get("data") or "0x")[2:].lower()
        to = (tx.get("to") or "").lower()
        if not to:
            ok = p.allow_create
        elif data:
            ok = self._call_ok(to, data, value)
        else:
            ok = to in p.recipients
        if not ok:
            return False
        cost = value + gas * fee
        for lim in p.limits:
            if lim.max_tx is not None and len(self.spent) + 1 > lim.max_tx:
                return False
            if lim.max_wei is not None and sum(self.spent) + cost > lim.max_wei:
                return False
        self.spent.append(cost)
        return True

    def _call_ok(self, to: str, data: str, value: int) -> bool:
        p = self.policy
        tokens = {e.token: e for e in p.erc20}
        sel = data[:8]
        if to in tokens and sel in (TRANSFER, APPROVE):
            e = tokens[to]
            if value != 0 or len(data) != 8 + 128 or data[8:32] != "0" * 24:
                return False
            who, amount = "0x" + data[32:72], int(data[72:], 16)
            if sel == TRANSFER:
                return who in e.transfer_to and amount <= e.max_units
            caps = {a.spender: a.max_units for a in e.approve}
            return who in caps and amount <= caps[who]
        for f in p.functions:
            if f.contract == to and f.selector == sel:
                words = [data[8 + 64 * i : 72 + 64 * i] for i in range(len(f.arg_types))]
                if len(data) != 8 + 64 * len(f.arg_types):
                    return False
                return all(
                    t != "address" or w[:24] == "0" * 24 for t, w in zip(f.arg_types, words, strict=True)
                )
        return False
