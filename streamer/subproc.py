"""Length-prefixed frames over a socket pair shared with a worker process.

The parent side is non-blocking and waits on the event loop (no thread hop per message);
the worker side blocks, since a worker has nothing else to do.
"""

from __future__ import annotations

import os
import struct
from typing import Final

import anyio

__all__ = [
    "FRAME_LEN",
    "read_exact",
    "read_exact_blocking",
    "write_all",
    "write_all_blocking",
]

#: Each frame starts with its payload length.
FRAME_LEN: Final = struct.Struct("<Q")


async def read_exact(fd: int, n: int) -> bytes:
    """``n`` bytes from non-blocking ``fd``, waiting on the loop. :raises EOFError: closed."""
    buf = bytearray()
    while len(buf) < n:
        try:
            part = os.read(fd, n - len(buf))
        except BlockingIOError:
            await anyio.wait_readable(fd)
            continue
        if not part:
            raise EOFError
        buf += part
    return bytes(buf)


async def write_all(fd: int, data: bytes) -> None:
    """All of ``data`` to non-blocking ``fd``, waiting on the loop when it is full."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            await anyio.wait_writable(fd)


def read_exact_blocking(fd: int, n: int) -> bytes:
    """``n`` bytes from blocking ``fd``. :raises EOFError: the other end closed."""
    buf = bytearray()
    while len(buf) < n:
        part = os.read(fd, n - len(buf))
        if not part:
            raise EOFError
        buf += part
    return bytes(buf)


def write_all_blocking(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
