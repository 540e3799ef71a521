"""Nonces per account: sends from one account run one at a time, and never reuse a nonce.

The node's pending count can lag behind a transaction it has just accepted (load-balanced
providers, slow pools), so the book remembers the next nonce after each broadcast and takes the
larger of the two. If the node has forgotten the last transaction we sent (a restarted dev
chain, an evicted pool entry), the node's count wins again, so one lost send leaves no gap.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass


@dataclass
class _Account:
    lock: asyncio.Lock
    next_nonce: int | None = None
    last_hash: str | None = None


class NonceBook:
    def __init__(self) -> None:
        self._accounts: dict[str, _Account] = {}

    def _account(self, sender: str) -> _Account:
        key = sender.lower()
        if key not in self._accounts:
            self._accounts[key] = _Account(asyncio.Lock())
        return self._accounts[key]

    @contextlib.asynccontextmanager
    async def turn(self, sender: str) -> AsyncIterator[None]:
        """Hold the account from filling to broadcast: the next send waits for this one's nonce."""
        async with self._account(sender).lock:
            yield

    async def next_nonce(self, sender: str, pending: int,
                         node_knows: Callable[[str], Awaitable[bool]]) -> int:
        """The nonce to use (call inside `turn`): the node's pending count or ours, whichever is higher."""
        acct = self._account(sender)
        if acct.next_nonce is None or acct.next_nonce <= pending:
            return pending
        if acct.last_hash is not None and not await node_knows(acct.last_hash):
            acct.next_nonce, acct.last_hash = None, None  # the node lost it: trust its count again
            return pending
        return acct.next_nonce

    def sent(self, sender: str, nonce: int, tx_hash: str) -> None:
        """A transaction with `nonce` was accepted by the node."""
        acct = self._account(sender)
        if acct.next_nonce is None or nonce + 1 >= acct.next_nonce:
            acct.next_nonce, acct.last_hash = nonce + 1, tx_hash
