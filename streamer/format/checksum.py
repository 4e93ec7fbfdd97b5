"""The one checksum of the on-disk formats: xxh3-64.

xxh3 is not cryptographic. It detects accidental damage (bit rot, torn writes, misplaced
files); it does not authenticate. Persisted checksums always go through this module so the
algorithm and its seeding stay in one place.
"""

from __future__ import annotations

# ``xxh3(data, seed=0) -> int`` is the C function itself, not a wrapper: region decode calls
# it twice per chunk, and a Python-level wrapper would double that cost. It takes any
# buffer (bytes, bytearray, memoryview slices) and returns the unsigned 64-bit digest.
import xxhash
from xxhash import xxh3_64_intdigest as xxh3

__all__ = ["BytesLike", "hex64", "xxh3", "xxh3_hasher"]

# What the format functions accept as input (collections.abc.Buffer is Python 3.12+).
BytesLike = bytes | bytearray | memoryview

_U64 = (1 << 64) - 1


def hex64(v: int) -> str:
    """A 64-bit value as exactly 16 lowercase hex digits, the form every error message uses."""
    return f"{v & _U64:016x}"


def xxh3_hasher(seed: int = 0) -> xxhash.xxh3_64:
    """Incremental xxh3-64: ``update()`` piece by piece, then ``intdigest()``.

    Gives exactly ``xxh3(b"".join(pieces), seed)`` without building the joined copy.
    """
    return xxhash.xxh3_64(seed=seed)
