"""Synchronous file-system primitives, rooted at one directory.

``LocalStore``, the journal and the snapshot code do all their file I/O through a
``FileSystem`` so that tests can swap in ``faultfs.SimulatedFileSystem``: it records every
write, fsync, rename and unlink, simulates a power loss (dropping whatever was not fsynced,
data and directory entries alike) and injects EIO/ENOSPC at any step.

All paths are relative POSIX paths below the root; implementations refuse anything that
escapes it. Methods block: call them from a worker thread, batched (one hop per batch).
Errors are raised as ``OSError`` with an ``errno``; the storage layer translates them.
"""

from __future__ import annotations

from typing import Protocol


class FileSystem(Protocol):
    def read(self, path: str) -> bytes:
        """Whole file. ``FileNotFoundError`` if missing."""
        ...

    def pread(self, path: str, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset``."""
        ...

    def size(self, path: str) -> int: ...

    def exists(self, path: str) -> bool: ...

    def isdir(self, path: str) -> bool: ...

    def listdir(self, path: str) -> list[str]:
        """Entry names (not paths), sorted; ``[]`` if the directory does not exist."""
        ...

    def makedirs(self, path: str) -> None:
        """Create ``path`` and missing parents, fsyncing each parent that gained an entry."""
        ...

    def create(self, path: str) -> int:
        """Open a new file for writing (``O_CREAT|O_EXCL|O_WRONLY``); return a handle."""
        ...

    def open_append(self, path: str) -> int:
        """Open for appending, creating it if missing; return a handle."""
        ...

    def write(self, handle: int, data: bytes) -> None:
        """Write all of ``data`` at the handle's position."""
        ...

    def fsync(self, handle: int) -> None: ...

    def close(self, handle: int) -> None: ...

    def truncate(self, path: str, length: int) -> None:
        """Cut the file to ``length`` bytes and fsync it."""
        ...

    def replace(self, src: str, dst: str) -> None:
        """Atomic rename (``os.replace``); not durable until ``fsync_dir``."""
        ...

    def link(self, src: str, dst: str) -> None:
        """Hard link; not durable until ``fsync_dir`` of dst's directory."""
        ...

    def unlink(self, path: str) -> None: ...

    def rmdir(self, path: str) -> None: ...

    def fsync_dir(self, path: str) -> None:
        """Make the directory's entries (creates, renames, unlinks) durable. ``""`` is root."""
        ...
