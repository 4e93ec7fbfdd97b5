"""An in-memory ``FileSystem`` that models the page cache versus the disk, for crash tests.

Model (pessimistic, as POSIX allows):

- A file inode has *current* data (what reads see) and *durable* data (what survives a power
  loss). ``fsync(handle)`` copies current to durable for that inode; ``truncate`` does too.
- A directory has *current* entries and *durable* entries (name → inode). ``fsync_dir(path)``
  copies that directory's current entries to durable. Creating, renaming, linking or
  unlinking a name is therefore lost in a crash until the directory holding it is synced;
  a rename touches two directories and each needs its own sync. ``makedirs`` syncs each
  parent that gained an entry, as the protocol says.
- ``durable_image()`` is what a reboot would find: walk durable entries from the root and
  take each inode's durable data (hard links stay shared). With ``torn=True`` an inode whose
  current data is not shorter than its durable data keeps part of its un-fsynced changes:
  of data written in place, any subset of its 4 KiB pages (writeback has no order); of data
  appended, a prefix of the extension (the size commits after the data).
- A failed ``fsync`` models Linux after writeback errors: the dirty pages are dropped as if
  clean, so a retried fsync on that inode reports success but persists nothing written
  before the failure (on disk those bytes keep their old content, or zeros past the old
  size). A writer that retries fsync is caught by a durability check. Bytes written after
  the failure, the same bytes written again included, are dirty and persist as usual.

``crash_after(k)`` lets k more mutating operations through; the next raises
``SimulatedCrash`` (a ``BaseException``, so no ``except Exception`` swallows it) without
taking effect, and every later call raises it too. Then ``durable_image()`` models a power
loss, ``restart()`` a process kill (the page cache survives). ``inject`` makes operations raise
``OSError``. Every mutating operation is recorded in ``ops``.

Thread-safe (one lock around each call), because ``LocalStore`` calls it from worker threads.
"""

from __future__ import annotations

import errno
import os
import random
import threading
from collections.abc import Iterator
from typing import NamedTuple

from streamer.storage.fs import split_path

__all__ = ["MUTATING_OPS", "Fault", "Op", "SimulatedCrash", "SimulatedFileSystem"]

#: Names recorded in ``SimulatedFileSystem.ops``; ``crash_after`` counts these.
MUTATING_OPS = frozenset(
    {
        "write",
        "fsync",
        "fsync_dir",
        "replace",
        "link",
        "unlink",
        "create",
        "truncate",
        "mkdir",
        "rmdir",
    }
)


class SimulatedCrash(BaseException):
    """The simulated machine lost power. Deliberately not an ``Exception``."""


class Op(NamedTuple):
    """One recorded mutating operation. ``arg`` is the destination (replace, link) or the byte
    count (write, truncate)."""

    name: str
    path: str
    arg: str | int | None = None


class Fault(NamedTuple):
    op: str
    err_no: int
    path_contains: str | None
    once: bool


class _File:
    __slots__ = ("data", "dirty", "durable", "lost")

    def __init__(self, data: bytes = b"") -> None:
        self.data = bytearray(data)
        self.durable = bytearray(data)
        # The range written since the last sync: a sync copies it (and any growth) alone,
        # not a whole preallocated 64 MiB segment.
        self.dirty: tuple[int, int] | None = None
        # Ranges whose writeback failed: clean in the page cache (reads see them, no sync
        # writes them) until written again; on disk they keep their durable bytes, or zeros
        # past the durable length once a later sync persists the size (Linux).
        self.lost: list[tuple[int, int]] = []

    def wrote(self, pos: int, end: int) -> None:
        lo, hi = self.dirty or (pos, end)
        self.dirty = (min(lo, pos), max(hi, end))
        if self.lost and pos < end:
            self.lost = _minus(self.lost, pos, end)

    def failed(self) -> None:
        """A sync failed: what it was to write is dropped, as the kernel drops such pages."""
        if self.dirty is not None:
            self.lost = _union(self.lost, *self.dirty)
        if len(self.data) > len(self.durable):
            self.lost = _union(self.lost, len(self.durable), len(self.data))
        self.dirty = None

    def on_disk(self) -> bytearray:
        """What a full writeback would leave now: the data, but lost ranges as on disk."""
        out = bytearray(self.data)
        for lo, hi in self.lost:
            hi = min(hi, len(out))
            keep = self.durable[lo:hi]
            out[lo:hi] = keep + bytes(max(0, hi - lo - len(keep)))
        return out

    def synced(self) -> None:
        # Data changes only through write() (tracked) and truncate() (which syncs), so the
        # bytes outside the dirty range and below the durable length are durable already:
        # copy that range and any growth, not the file (a spare grows 256 KiB a sync).
        old = len(self.durable)
        if self.lost:
            self.durable = self.on_disk()
        elif len(self.data) < old:
            self.durable = bytearray(self.data)
        else:
            if self.dirty is not None:
                lo, hi = self.dirty[0], min(self.dirty[1], old)
                if lo < hi:
                    self.durable[lo:hi] = self.data[lo:hi]
            self.durable += self.data[old:]
        self.dirty = None

    def truncated(self, length: int) -> None:
        if self.lost:
            self.lost = _minus(self.lost, length, max(length, len(self.data), len(self.durable)))


def _union(ranges: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted([*ranges, (lo, hi)]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _minus(ranges: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in ranges:
        if a < lo:
            out.append((a, min(b, lo)))
        if b > hi:
            out.append((max(a, hi), b))
    return out


class _Dir:
    __slots__ = ("durable", "entries")

    def __init__(self) -> None:
        self.entries: dict[str, _File | _Dir] = {}
        self.durable: dict[str, _File | _Dir] = {}


class _Handle:
    __slots__ = ("append", "node", "path", "pos")

    def __init__(self, node: _File, path: str, append: bool) -> None:
        self.node = node
        self.path = path
        self.append = append
        self.pos = 0


_PAGE = 4096


def _first_difference(a: bytes, b: bytes) -> int:
    """Offset of the first byte where ``a`` and ``b`` differ (``min(len)`` if one prefixes
    the other)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]: bisect in C-speed slices
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _err(code: int, path: str) -> OSError:
    return OSError(code, os.strerror(code), path)


def _name_ok(name: str, path: str) -> None:
    if len(name.encode("utf-8", "surrogatepass")) > 255:
        raise _err(errno.ENAMETOOLONG, path)


class SimulatedFileSystem:
    """In-memory ``FileSystem`` with crash simulation and fault injection (see module doc)."""

    def __init__(self) -> None:
        self._root = _Dir()
        self._handles: dict[int, _Handle] = {}
        self._next_handle = 1000
        self._lock = threading.RLock()
        self._faults: list[Fault] = []
        self._countdown: int | None = None
        self._frozen = False
        #: Every mutating operation that took effect, in order.
        self.ops: list[Op] = []
        #: The operation that was refused by the simulated crash, if any.
        self.crashed_op: Op | None = None

    # -- control -------------------------------------------------------------------------

    def crash_after(self, k: int) -> None:
        """Let ``k`` more mutating operations through; the next one raises ``SimulatedCrash``."""
        if k < 0:
            raise ValueError("k must be >= 0")
        with self._lock:
            self._countdown = k

    def restart(self) -> None:
        """A process crash without power loss: the kernel keeps its page cache, so current
        and durable state both stay; open handles are closed and a freeze is lifted."""
        with self._lock:
            self._handles.clear()
            self._countdown = None
            self._frozen = False

    @property
    def crashed(self) -> bool:
        return self._frozen

    def inject(
        self, op: str, err_no: int, *, path_contains: str | None = None, once: bool = True
    ) -> None:
        """Make calls of ``op`` (a method name, or ``mkdir`` inside ``makedirs``) whose path
        (or destination) contains ``path_contains`` raise ``OSError(err_no)``, once or always."""
        with self._lock:
            self._faults.append(Fault(op, err_no, path_contains, once))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def durable_image(
        self, *, torn: bool = False, rng: random.Random | None = None
    ) -> SimulatedFileSystem:
        """A fresh file system holding only what a power loss right now would leave."""
        rng = rng if rng is not None else random.Random(0)
        with self._lock:
            image = SimulatedFileSystem()
            files: dict[int, _File] = {}
            dirs: set[int] = set()

            def survive(node: _File) -> bytes:
                # Lost pages are clean: no writeback, so no tearing, persists them.
                cur, dur = bytes(node.on_disk() if node.lost else node.data), bytes(node.durable)
                if not torn or len(cur) < len(dur) or cur == dur:
                    return dur
                # Pages written in place persist each on its own, in any order; appended
                # data keeps a prefix of the extension (the size commits after the data).
                out = bytearray(dur)
                first = _first_difference(cur, dur)
                for page in range(first - first % _PAGE, len(dur), _PAGE):
                    if rng.random() < 0.5:
                        lo, hi = max(page, first), min(page + _PAGE, len(dur))
                        out[lo:hi] = cur[lo:hi]
                if len(cur) > len(dur):
                    out += cur[len(dur) : rng.randint(len(dur), len(cur))]
                return bytes(out)

            def copy_dir(src: _Dir, dst: _Dir) -> None:
                dirs.add(id(src))
                for name, node in sorted(src.durable.items()):
                    if isinstance(node, _File):
                        if id(node) not in files:
                            files[id(node)] = _File(survive(node))
                        dst.entries[name] = files[id(node)]
                    elif id(node) not in dirs:
                        # A directory renamed between two synced parents could be reachable
                        # twice; a real journal commits a rename as one, so keep the first.
                        sub = _Dir()
                        copy_dir(node, sub)
                        dst.entries[name] = sub
                dst.durable = dict(dst.entries)

            copy_dir(self._root, image._root)
            return image

    def tree(self) -> dict[str, bytes]:
        """Current contents: every file path → its data (directories implied)."""
        with self._lock:
            out: dict[str, bytes] = {}
            for path, node in self._iter(self._root, ""):
                if isinstance(node, _File):
                    out[path] = bytes(node.data)
            return out

    def dirs(self) -> list[str]:
        """Every directory path (not the root), sorted."""
        with self._lock:
            return sorted(p for p, n in self._iter(self._root, "") if isinstance(n, _Dir))

    def _iter(self, d: _Dir, prefix: str) -> Iterator[tuple[str, _File | _Dir]]:
        for name, node in sorted(d.entries.items()):
            path = f"{prefix}/{name}" if prefix else name
            yield path, node
            if isinstance(node, _Dir):
                yield from self._iter(node, path)

    # -- machinery -----------------------------------------------------------------------

    def _enter(self, op: str, *paths: str) -> None:
        """Called first by every public operation (under the lock)."""
        if self._frozen:
            raise SimulatedCrash(f"file system is frozen after a simulated crash ({op})")
        for i, fault in enumerate(self._faults):
            if fault.op != op:
                continue
            if fault.path_contains is not None and not any(fault.path_contains in p for p in paths):
                continue
            if fault.once:
                del self._faults[i]
            raise _err(fault.err_no, paths[0] if paths else "")

    def _commit(self, op: str, path: str, arg: str | int | None = None) -> None:
        """Called right before a mutation takes effect: the crash point."""
        record = Op(op, path, arg)
        if self._countdown is not None:
            if self._countdown == 0:
                self._frozen = True
                self.crashed_op = record
                raise SimulatedCrash(f"simulated crash before {record}")
            self._countdown -= 1
        self.ops.append(record)

    def _dir_at(self, parts: tuple[str, ...], path: str) -> _Dir:
        d = self._root
        for part in parts:
            node = d.entries.get(part)
            if node is None:
                raise _err(errno.ENOENT, path)
            if not isinstance(node, _Dir):
                raise _err(errno.ENOTDIR, path)
            d = node
        return d

    def _parent(self, path: str) -> tuple[_Dir, str]:
        parts = split_path(path)
        parent = self._dir_at(parts[:-1], path)
        _name_ok(parts[-1], path)
        return parent, parts[-1]

    def _node(self, path: str, *, allow_root: bool = True) -> _File | _Dir:
        parts = split_path(path, allow_root=allow_root)
        if not parts:
            return self._root
        parent, name = self._parent(path)
        node = parent.entries.get(name)
        if node is None:
            raise _err(errno.ENOENT, path)
        return node

    def _file(self, path: str) -> _File:
        node = self._node(path)
        if isinstance(node, _Dir):
            raise _err(errno.EISDIR, path)
        return node

    def _handle(self, handle: int) -> _Handle:
        if self._frozen:
            raise SimulatedCrash("file system is frozen after a simulated crash")
        h = self._handles.get(handle)
        if h is None:
            raise _err(errno.EBADF, f"<handle {handle}>")
        return h

    # -- FileSystem ----------------------------------------------------------------------

    def read(self, path: str) -> bytes:
        with self._lock:
            self._enter("read", path)
            return bytes(self._file(path).data)

    def pread(self, path: str, offset: int, length: int) -> bytes:
        with self._lock:
            self._enter("pread", path)
            node = self._file(path)
            if offset < 0 or length < 0:
                raise _err(errno.EINVAL, path)
            return bytes(node.data[offset : offset + length])

    def size(self, path: str) -> int:
        with self._lock:
            self._enter("size", path)
            return len(self._file(path).data)

    def exists(self, path: str) -> bool:
        with self._lock:
            self._enter("exists", path)
            try:
                self._node(path)
            except OSError:
                return False
            return True

    def isdir(self, path: str) -> bool:
        with self._lock:
            self._enter("isdir", path)
            try:
                return isinstance(self._node(path), _Dir)
            except OSError:
                return False

    def listdir(self, path: str) -> list[str]:
        with self._lock:
            self._enter("listdir", path)
            try:
                node = self._node(path)
            except FileNotFoundError:
                return []
            if not isinstance(node, _Dir):
                raise _err(errno.ENOTDIR, path)
            return sorted(node.entries)

    def makedirs(self, path: str) -> None:
        with self._lock:
            self._enter("makedirs", path)
            parts = split_path(path, allow_root=True)
            d = self._root
            for i, part in enumerate(parts):
                sub = "/".join(parts[: i + 1])
                parent_path = "/".join(parts[:i])
                node = d.entries.get(part)
                if node is None:
                    _name_ok(part, path)
                    self._enter("mkdir", sub)
                    self._commit("mkdir", sub)
                    node = d.entries[part] = _Dir()
                    self._fsync_dir_locked(parent_path)
                elif not isinstance(node, _Dir):
                    raise _err(errno.ENOTDIR, path)
                d = node

    def create(self, path: str) -> int:
        with self._lock:
            self._enter("create", path)
            parent, name = self._parent(path)
            if name in parent.entries:
                raise _err(errno.EEXIST, path)
            self._commit("create", path)
            node = parent.entries[name] = _File()
            return self._open(node, path, append=False)

    def open_append(self, path: str) -> int:
        with self._lock:
            self._enter("open_append", path)
            parent, name = self._parent(path)
            node = parent.entries.get(name)
            if node is None:
                self._commit("create", path)
                node = parent.entries[name] = _File()
            elif isinstance(node, _Dir):
                raise _err(errno.EISDIR, path)
            return self._open(node, path, append=True)

    def open_write(self, path: str) -> int:
        with self._lock:
            self._enter("open_write", path)
            return self._open(self._file(path), path, append=False)

    def _open(self, node: _File, path: str, *, append: bool) -> int:
        handle = self._next_handle
        self._next_handle += 1
        self._handles[handle] = _Handle(node, path, append)
        return handle

    def write(self, handle: int, data: bytes | memoryview) -> None:
        with self._lock:
            h = self._handle(handle)
            self._enter("write", h.path)
            self._commit("write", h.path, len(data))
            buf = h.node.data
            pos = len(buf) if h.append else h.pos
            if pos > len(buf) and data:  # an empty write past EOF does not extend the file
                buf.extend(bytes(pos - len(buf)))
            buf[pos : pos + len(data)] = data
            h.pos = pos + len(data)
            h.node.wrote(pos, h.pos)

    def fsync(self, handle: int) -> None:
        self._sync(handle, "fsync")

    def fdatasync(self, handle: int) -> None:
        # The model keeps no timestamps, so data and size are all a file has to sync.
        self._sync(handle, "fdatasync")

    def start_writeback(self, handle: int) -> None:
        # A hint with no effect on what a power loss keeps (only a sync does): not an
        # operation of the model, so crash enumerations do not count it.
        # Like the real one, it never raises (not even for a bad handle).
        del handle

    def _sync(self, handle: int, op: str) -> None:
        with self._lock:
            h = self._handle(handle)
            try:
                self._enter(op, h.path)
            except OSError:
                h.node.failed()
                raise
            self._commit(op, h.path)
            h.node.synced()

    def close(self, handle: int) -> None:
        with self._lock:
            h = self._handle(handle)
            self._enter("close", h.path)
            del self._handles[handle]

    def truncate(self, path: str, length: int) -> None:
        with self._lock:
            self._enter("truncate", path)
            node = self._file(path)
            if length < 0:
                raise _err(errno.EINVAL, path)
            self._commit("truncate", path, length)
            if length <= len(node.data):
                del node.data[length:]
            else:
                node.data.extend(bytes(length - len(node.data)))
            # Pages dropped after a writeback error stay dropped (synced() keeps their disk
            # bytes), but the new size is metadata, and it does persist.
            node.truncated(length)
            node.synced()

    def replace(self, src: str, dst: str) -> None:
        with self._lock:
            self._enter("replace", src, dst)
            # Both parents are looked up before the source entry, as rename(2) does.
            sparent, sname = self._parent(src)
            dparent, dname = self._parent(dst)
            node = sparent.entries.get(sname)
            if node is None:
                raise _err(errno.ENOENT, src)
            old = dparent.entries.get(dname)
            if old is node:
                return  # POSIX: two links to one inode, rename does nothing
            # Linux checks ancestry before types: moving a directory below itself is EINVAL,
            # replacing an ancestor of the source is ENOTEMPTY.
            if isinstance(node, _Dir) and self._contains(node, dparent):
                raise _err(errno.EINVAL, dst)
            if isinstance(old, _Dir) and self._contains(old, sparent):
                raise _err(errno.ENOTEMPTY, dst)
            if isinstance(node, _Dir):
                if old is not None and not isinstance(old, _Dir):
                    raise _err(errno.ENOTDIR, dst)
                if isinstance(old, _Dir) and old.entries:
                    raise _err(errno.ENOTEMPTY, dst)
            elif isinstance(old, _Dir):
                raise _err(errno.EISDIR, dst)
            self._commit("replace", src, dst)
            del sparent.entries[sname]
            dparent.entries[dname] = node

    def _contains(self, d: _Dir, target: _Dir) -> bool:
        if d is target:
            return True
        return any(isinstance(n, _Dir) and self._contains(n, target) for n in d.entries.values())

    def link(self, src: str, dst: str) -> None:
        with self._lock:
            self._enter("link", src, dst)
            node = self._node(src, allow_root=False)
            dparent, dname = self._parent(dst)
            if dname in dparent.entries:
                raise _err(errno.EEXIST, dst)
            if isinstance(node, _Dir):
                raise _err(errno.EPERM, src)
            self._commit("link", src, dst)
            dparent.entries[dname] = node

    def unlink(self, path: str) -> None:
        with self._lock:
            self._enter("unlink", path)
            parent, name = self._parent(path)
            node = parent.entries.get(name)
            if node is None:
                raise _err(errno.ENOENT, path)
            if isinstance(node, _Dir):
                raise _err(errno.EISDIR, path)
            self._commit("unlink", path)
            del parent.entries[name]

    def rmdir(self, path: str) -> None:
        with self._lock:
            self._enter("rmdir", path)
            parent, name = self._parent(path)
            node = parent.entries.get(name)
            if node is None:
                raise _err(errno.ENOENT, path)
            if not isinstance(node, _Dir):
                raise _err(errno.ENOTDIR, path)
            if node.entries:
                raise _err(errno.ENOTEMPTY, path)
            self._commit("rmdir", path)
            del parent.entries[name]

    def fsync_dir(self, path: str) -> None:
        with self._lock:
            self._fsync_dir_locked(path)

    def _fsync_dir_locked(self, path: str) -> None:
        self._enter("fsync_dir", path)
        node = self._node(path)
        if not isinstance(node, _Dir):
            raise _err(errno.ENOTDIR, path)
        self._commit("fsync_dir", path)
        node.durable = dict(node.entries)
