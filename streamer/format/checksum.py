"""The one checksum of the on-disk formats: xxh3-64.

xxh3 is not cryptographic. It detects accidental damage (bit rot, torn writes, misplaced
files); it does not authenticate. Persisted checksums always go through this module so the
algorithm and its seeding stay in one place.
"""

from __future__ import annotations

import xxhash

__all__ = ["hex64", "xxh3"]

_U64 = (1 << 64) - 1


def xxh3(data: bytes, seed: int = 0) -> int:
    """xxh3-64 of ``data`` (any bytes-like, including a memoryview slice) as an unsigned int."""
    return xxhash.xxh3_64_intdigest(data, seed)


def hex64(v: int) -> str:
    """A 64-bit value as exactly 16 lowercase hex digits, the form every error message uses."""
    return f"{v & _U64:016x}"
