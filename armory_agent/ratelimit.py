"""Per-peer token buckets: `rate` requests per second with bursts up to `burst` (over it: 429)."""

from __future__ import annotations

import time


class RateLimiter:
    def __init__(self, rate: float, burst: int, max_peers: int = 1024) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_peers = max_peers
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, peer: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.get(peer, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        if peer not in self._buckets and len(self._buckets) >= self.max_peers:
            self._prune(now)
        self._buckets[peer] = (tokens, now)
        return allowed

    def _prune(self, now: float) -> None:
        """Drop full buckets (peers idle long enough to have refilled): they hold no state."""
        full = [p for p, (t, last) in self._buckets.items() if t + (now - last) * self.rate >= self.burst]
        for p in full:
            del self._buckets[p]
        if len(self._buckets) >= self.max_peers:  # still full: forget the oldest
            oldest = sorted(self._buckets, key=lambda p: self._buckets[p][1])
            for p in oldest[: len(oldest) // 2]:
                del self._buckets[p]
