"""Keccak-256 (the pre-standard padding Ethereum uses) and EIP-55 checksums, standard library only.

hashlib's sha3_256 is FIPS 202 SHA-3, which pads differently and gives other digests; the
device has no third-party packages, so the permutation is written out here. It is only used
for short inputs (addresses, method signatures), where pure Python is fast enough.
"""

from __future__ import annotations

import re
from functools import cache, lru_cache

_MASK = (1 << 64) - 1
_RATE = 136  # bytes: 1600-bit state minus 2 * 256-bit capacity
_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")


def _round_constants() -> tuple[int, ...]:
    """The 24 iota constants, from the spec's degree-8 LFSR (x^8 + x^6 + x^5 + x^4 + 1)."""

    def bit(t: int) -> int:
        r = 1
        for _ in range(t % 255):
            r <<= 1
            if r & 0x100:
                r ^= 0x171
        return r & 1

    return tuple(sum(bit(j + 7 * i) << ((1 << j) - 1) for j in range(7)) for i in range(24))


def _rotations() -> tuple[int, ...]:
    """rho offsets, indexed x + 5*y, from the spec's (x, y) -> (y, 2x + 3y) walk."""
    rot = [0] * 25
    x, y = 1, 0
    for t in range(24):
        rot[x + 5 * y] = ((t + 1) * (t + 2) // 2) % 64
        x, y = y, (2 * x + 3 * y) % 5
    return tuple(rot)


_RC = _round_constants()
_ROT = _rotations()


# pi: lane x + 5*y moves to y + 5*((2x + 3y) % 5); precomputed with its rho rotation.
_PI = tuple((x + 5 * y, y + 5 * ((2 * x + 3 * y) % 5), _ROT[x + 5 * y]) for x in range(5) for y in range(5))


def _permute(a: list[int]) -> None:
    """keccak-f[1600] in place on 25 lanes (index x + 5*y)."""
    b = [0] * 25
    for rc in _RC:
        c = [a[x] ^ a[x + 5] ^ a[x + 10] ^ a[x + 15] ^ a[x + 20] for x in range(5)]
        d = [c[(x - 1) % 5] ^ (((c[(x + 1) % 5] << 1) | (c[(x + 1) % 5] >> 63)) & _MASK) for x in range(5)]
        for src, dst, n in _PI:
            v = a[src] ^ d[src % 5]
            b[dst] = ((v << n) | (v >> (64 - n))) & _MASK if n else v
        for y in range(0, 25, 5):
            b0, b1, b2, b3, b4 = b[y], b[y + 1], b[y + 2], b[y + 3], b[y + 4]
            a[y] = b0 ^ (~b1 & b2)
            a[y + 1] = b1 ^ (~b2 & b3)
            a[y + 2] = b2 ^ (~b3 & b4)
            a[y + 3] = b3 ^ (~b4 & b0)
            a[y + 4] = b4 ^ (~b0 & b1)
        a[0] ^= rc


def keccak256(data: bytes) -> bytes:
    """Ethereum's keccak256 (Keccak[c=512] with 0x01 padding; not hashlib.sha3_256)."""
    padded = bytearray(data)
    padded.append(0x01)
    padded.extend(b"\x00" * (-len(padded) % _RATE))
    padded[-1] |= 0x80
    state = [0] * 25
    for off in range(0, len(padded), _RATE):
        block = padded[off : off + _RATE]
        for i in range(_RATE // 8):
            state[i] ^= int.from_bytes(block[8 * i : 8 * i + 8], "little")
        _permute(state)
    return b"".join(lane.to_bytes(8, "little") for lane in state[:4])


def is_address(text: str) -> bool:
    return bool(_ADDRESS.match(text))


def to_checksum_address(address: str) -> str:
    """EIP-55 form of a 0x-prefixed 20-byte hex address (any case in, mixed case out)."""
    if not is_address(address):
        raise ValueError(f"not a 20-byte hex address: {address!r}")
    return _checksum(address[2:].lower())


@lru_cache(maxsize=256)  # the same few addresses (own accounts, usual recipients) recur
def _checksum(lower: str) -> str:
    digest = keccak256(lower.encode("ascii")).hex()
    return "0x" + "".join(
        ch.upper() if ch.isalpha() and int(digest[i], 16) >= 8 else ch for i, ch in enumerate(lower)
    )


def has_valid_checksum(address: str) -> bool:
    """All-lower and all-upper carry no checksum (valid); mixed case must be exact EIP-55."""
    body = address[2:]
    if body == body.lower() or body == body.upper():
        return is_address(address)
    return is_address(address) and to_checksum_address(address) == address


@cache
def selector(signature: str) -> bytes:
    """First four bytes of keccak256(signature): the ABI method id."""
    return keccak256(signature.encode("ascii"))[:4]
