"""Synchronous file-system primitives, rooted at one directory.

``LocalStore``, the journal and the snapshot code do all their file I/O through a
``FileSystem`` so that tests can swap in ``faultfs.SimulatedFileSystem``: it records every
write, fsync, rename and unlink, simulates a power loss (dropping whatever was not fsynced,
data and directory entries alike) and injects EIO/ENOSPC at any step.

All paths are relative POSIX paths below the root (``""`` is the root itself where a
directory is meant); implementations refuse anything that escapes it with
``streamer.errors.InvalidKey`` (absolute, ``..``, empty segment, backslash, NUL, a symlink
leading out). Methods block: call them from a worker thread, batched (one hop per batch).
Other errors are raised as ``OSError`` with an ``errno``; the storage layer translates them.

Both implementations here (``OsFileSystem`` and ``faultfs.SimulatedFileSystem``) give the
same results and the same errno for the same call sequence; ``tests/test_faultfs.py``
checks that on scripted and random programs.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, cast

from streamer.errors import InvalidKey


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

    def open_write(self, path: str) -> int:
        """Open an existing file for writing in place from offset 0, without truncating it
        (``O_WRONLY``); return a handle. ``FileNotFoundError`` if missing."""
        ...

    def write(self, handle: int, data: bytes | memoryview) -> None:
        """Write all of ``data`` at the handle's position."""
        ...

    def fsync(self, handle: int) -> None: ...

    def fdatasync(self, handle: int) -> None:
        """Make the data durable, and the size, but not timestamps (``fdatasync``): over
        preallocated blocks that is a data flush with no file-system journal commit."""
        ...

    def start_writeback(self, handle: int) -> None:
        """Hint: start writing the file's dirty pages to the device now, without waiting.

        Durability still comes only from ``fsync``; this lets a batch put every file's
        data in flight before it waits for the first. Never raises: a failure here
        surfaces at the ``fsync`` that follows."""
        ...

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


# --- path rules shared by every FileSystem and every BlobStore ---------------------------

#: Temp files are ``.<name>.tmp-<12 hex>`` next to their target. Keys may never take this
#: shape, so a temp can be neither listed nor mistaken for an object.
TEMP_RE = re.compile(r"^\..+\.tmp-[0-9a-f]{12}$")
#: Root directory holding the cross-process lock files of ``LocalStore``; never a key.
LOCK_DIR = ".locks"
#: Root-level names that are lock files, not objects: never keys, never listed. ``.lock`` is
#: the world's single-opener lock (``streamer/worlddir.py``).
RESERVED_ROOT_NAMES = frozenset({LOCK_DIR, ".lock"})
#: Longest key segment in UTF-8 bytes: the temp name adds 18 bytes and NAME_MAX is 255.
MAX_SEGMENT_BYTES = 200


def split_path(path: str, *, allow_root: bool = False) -> tuple[str, ...]:
    """Validate a root-relative POSIX path and return its segments (``()`` for the root).

    :raises InvalidKey: absolute, empty (unless ``allow_root``), ``.``/``..`` or empty
        segments, a backslash or a NUL byte.
    """
    if not isinstance(path, str):
        raise InvalidKey(f"path must be a str, not {type(path).__name__}", key=repr(path))
    if path == "":
        if allow_root:
            return ()
        raise InvalidKey("empty path", key=path)
    if path.startswith("/"):
        raise InvalidKey("absolute path", key=path)
    if "\\" in path or "\0" in path:
        raise InvalidKey("backslash or NUL in path", key=path)
    parts = tuple(path.split("/"))
    for part in parts:
        if part in ("", ".", ".."):
            raise InvalidKey(f"empty, '.' or '..' segment {part!r}", key=path)
    return parts


def check_key(key: str) -> tuple[str, ...]:
    """Validate a BlobStore key (a path plus the store's reserved names); return its segments.

    :raises InvalidKey: see ``split_path``; also a temp-file-shaped segment, a segment longer
        than ``MAX_SEGMENT_BYTES`` bytes, or a key in ``RESERVED_ROOT_NAMES`` (or below one).
    """
    parts = split_path(key)
    if parts[0] in RESERVED_ROOT_NAMES:
        raise InvalidKey(f"{parts[0]} is reserved for lock files", key=key)
    for part in parts:
        if len(part.encode("utf-8", "surrogatepass")) > MAX_SEGMENT_BYTES:
            raise InvalidKey(f"segment longer than {MAX_SEGMENT_BYTES} bytes", key=key)
        if TEMP_RE.match(part):
            raise InvalidKey("segment has the shape of a temp file name", key=key)
    return parts


def is_temp_name(name: str) -> bool:
    return TEMP_RE.match(name) is not None


def temp_path(path: str) -> str:
    """A fresh temp name next to ``path`` (``TEMP_RE``): hidden from listings, and removed by
    ``LocalStore.open`` if a crash leaves it behind."""
    d, _, name = path.rpartition("/")
    tmp = f".{name}.tmp-{secrets.token_hex(6)}"
    return f"{d}/{tmp}" if d else tmp


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range`` (Linux; Python has no binding), or None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return cast("Callable[[int, int, int, int], int]", fn)


# ctypes' CDLL calls release the GIL, as os.fsync does.
_sync_file_range = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of dirty pages, do not wait


def _err(code: int, path: str) -> OSError:
    # OSError(code, ...) instantiates the matching subclass (FileNotFoundError, ...).
    return OSError(code, os.strerror(code), path)


class OsFileSystem:
    """``FileSystem`` on the real disk below ``root``; handles are real file descriptors.

    Every path is checked before use: malformed paths raise ``InvalidKey``, and so does a
    path that leaves the root through a symlink. Directory components are ``lstat``-ed once
    and remembered; the last component is opened with ``O_NOFOLLOW`` (a symlink there is
    resolved and checked only when one is found) or is not followed by the call at all
    (create, replace, link, unlink, rmdir). ``makedirs("")`` creates the root itself.

    The remembered directories assume nobody swaps a checked directory for an escaping
    symlink behind our back: confinement guards against malformed keys and stray links, not
    against a hostile writer inside the root, who could do anything anyway.
    """

    _MAX_CHECKED_DIRS = 4096

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        # Resolved lazily, in a worker thread: realpath touches the disk.
        self._real_root: str | None = None
        self._checked_dirs: set[str] = set()

    def __repr__(self) -> str:
        return f"OsFileSystem({str(self.root)!r})"

    def _root(self) -> str:
        if self._real_root is None:
            self._real_root = os.path.realpath(self.root)
        return self._real_root

    @staticmethod
    def _join(root: str, rel: str) -> str:
        return f"{root}/{rel}" if root != "/" else f"/{rel}"

    def _check(self, root: str, rel: str, path: str) -> bool:
        """``lstat`` one component; ``False`` if missing. A symlink must resolve inside."""
        full = self._join(root, rel)
        try:
            st = os.lstat(full)
        except OSError:
            return False  # the real call reports the proper errno
        if stat.S_ISLNK(st.st_mode):
            target = os.path.realpath(full)
            if not (root == "/" or target == root or target.startswith(root + "/")):
                raise InvalidKey(f"path escapes the root {root} through a symlink", key=path)
        return True

    def _abs(self, path: str, *, allow_root: bool = False, final: bool = True) -> str:
        """Absolute path for ``path``; ``final=False`` when the call will not follow a
        symlink in the last component (or opens it with ``O_NOFOLLOW``)."""
        parts = split_path(path, allow_root=allow_root)
        root = self._root()
        if not parts:
            return root
        rel = ""
        for part in parts[:-1]:
            rel = f"{rel}/{part}" if rel else part
            if rel in self._checked_dirs:
                continue
            if not self._check(root, rel, path):
                break  # missing: nothing below it exists to be checked
            if len(self._checked_dirs) >= self._MAX_CHECKED_DIRS:
                self._checked_dirs.clear()
            self._checked_dirs.add(rel)
        else:
            if final:
                self._check(root, path, path)
        return self._join(root, path)

    def _open(self, path: str, flags: int) -> int:
        full = self._abs(path, final=False)
        try:
            return os.open(full, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
        self._abs(path)  # the last component is a symlink: it must stay inside the root
        return os.open(full, flags | os.O_CLOEXEC, 0o644)

    def read(self, path: str) -> bytes:
        with open(self._open(path, os.O_RDONLY), "rb", buffering=0) as f:
            return f.readall()

    def pread(self, path: str, offset: int, length: int) -> bytes:
        fd = self._open(path, os.O_RDONLY)
        try:
            if offset < 0 or length < 0:
                raise _err(errno.EINVAL, path)
            if length == 0 and stat.S_ISDIR(os.fstat(fd).st_mode):
                raise _err(errno.EISDIR, path)  # pread() would have said so for length > 0
            out = bytearray()
            while len(out) < length:
                chunk = os.pread(fd, length - len(out), offset + len(out))
                if not chunk:
                    break
                out += chunk
            return bytes(out)
        finally:
            os.close(fd)

    def size(self, path: str) -> int:
        st = os.stat(self._abs(path))
        if stat.S_ISDIR(st.st_mode):
            raise _err(errno.EISDIR, path)
        return st.st_size

    def exists(self, path: str) -> bool:
        return os.path.exists(self._abs(path, allow_root=True))

    def isdir(self, path: str) -> bool:
        return os.path.isdir(self._abs(path, allow_root=True))

    def listdir(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(self._abs(path, allow_root=True)))
        except FileNotFoundError:
            return []

    def makedirs(self, path: str) -> None:
        target = self._abs(path, allow_root=True)
        # Walk up to the deepest existing ancestor, then create downwards so that each new
        # entry can be made durable in its parent right after it appears.
        missing: list[str] = []
        cur = target
        while True:
            try:
                st = os.stat(cur)
            except FileNotFoundError:
                missing.append(cur)
                parent = os.path.dirname(cur)
                if parent == cur:
                    raise
                cur = parent
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise _err(errno.ENOTDIR, path)
            break
        for d in reversed(missing):
            try:
                os.mkdir(d, 0o755)
            except FileExistsError:
                if not os.path.isdir(d):
                    raise _err(errno.ENOTDIR, path) from None
                continue  # a concurrent makedirs made it (and syncs its parent itself)
            _fsync_dir_abs(os.path.dirname(d))

    def create(self, path: str) -> int:
        # O_EXCL never follows a symlink in the last component: no check needed there.
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC
        return os.open(self._abs(path, final=False), flags, 0o644)

    def open_append(self, path: str) -> int:
        return self._open(path, os.O_CREAT | os.O_APPEND | os.O_WRONLY)

    def open_write(self, path: str) -> int:
        return self._open(path, os.O_WRONLY)

    def write(self, handle: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.write(handle, view)
            if n <= 0:
                raise _err(errno.EIO, f"<fd {handle}>")
            view = view[n:]

    def fsync(self, handle: int) -> None:
        os.fsync(handle)

    def fdatasync(self, handle: int) -> None:
        os.fdatasync(handle)

    def start_writeback(self, handle: int) -> None:
        if _sync_file_range is not None:
            # Errors are ignored: the fsync after it reports them (the kernel keeps a
            # writeback error for the next fsync of every descriptor open at the time).
            _sync_file_range(handle, 0, 0, _SYNC_FILE_RANGE_WRITE)

    def close(self, handle: int) -> None:
        os.close(handle)

    def truncate(self, path: str, length: int) -> None:
        fd = self._open(path, os.O_WRONLY)
        try:
            if length < 0:
                raise _err(errno.EINVAL, path)
            os.ftruncate(fd, length)
            os.fsync(fd)
        finally:
            os.close(fd)

    # These act on the last component itself, never on what a symlink there points to.

    def replace(self, src: str, dst: str) -> None:
        os.replace(self._abs(src, final=False), self._abs(dst, final=False))

    def link(self, src: str, dst: str) -> None:
        os.link(self._abs(src, final=False), self._abs(dst, final=False), follow_symlinks=False)

    def unlink(self, path: str) -> None:
        os.unlink(self._abs(path, final=False))

    def rmdir(self, path: str) -> None:
        os.rmdir(self._abs(path, final=False))

    def fsync_dir(self, path: str) -> None:
        # Opened with O_NOFOLLOW (no lstat per call, this is on every write's path); a
        # symlink in the last component is checked and followed only when one is found.
        full = self._abs(path, allow_root=True, final=False)
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
        try:
            fd = os.open(full, flags | os.O_NOFOLLOW)
        except OSError as exc:
            # A symlink there gives ELOOP, or ENOTDIR since O_DIRECTORY is checked first.
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            self._abs(path, allow_root=True)  # a symlink must stay inside the root
            fd = os.open(full, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir_abs(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
