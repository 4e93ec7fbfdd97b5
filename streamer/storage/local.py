"""``LocalStore``: a ``BlobStore`` on a local directory (through a ``FileSystem``).

Layout: key ``a/b/c`` is the file ``<root>/a/b/c``. Temp files are ``.<name>.tmp-<12 hex>``
next to their target; they are never listed and are removed by ``LocalStore.open``. The
root names ``.locks`` (this module's lock files) and ``.lock`` (the world's opener lock) are
not keys and are never listed. A key cannot also be a directory of other keys (``a`` and
``a/b``): the file system refuses, and the write raises ``StorageUnavailable``.

Writes (``put_atomic``, ``put_if_match``, ``copy``, ``delete``) each run as ONE worker-thread
call through the store's ``CapacityLimiter``:

    create temp → write → fsync(temp) → link old → temp-backup → replace(temp, key)
    → fsync(dir) → unlink backup → acknowledge

The backup link is what lets a failed directory fsync be rolled back: the old object is put
back under its name, so a write that raised ``StorageUnavailable`` never leaves the new
content visible (after a power loss either version may survive; neither was acknowledged).
An fsync error is never retried on the same data: the temp is unlinked and the write fails;
the caller rewrites from memory. ``put_if_match(key, data, None)`` installs with ``link``,
which fails with ``EEXIST`` if the key appeared meanwhile.

Versions are the xxh3_64 hex digest of the content: the same in every process without any
side table, and a real compare for ``put_if_match``. Writing identical bytes yields the same
version (like an S3 ETag), which is harmless for compare-and-swap because the content is
identical too. ``head`` and the CAS compare read and hash the current file.

Compare-and-swap is atomic:

- within this process by a per-key ``anyio.Lock`` held across the worker-thread call (every
  writer of a key takes it, so an unconditional put cannot slip between compare and swap);
- across processes sharing a root by ``fcntl.flock`` on ``<root>/.locks/<nn>.lock``, one of
  256 stripes picked by the key's hash, taken inside the worker-thread call on a freshly
  opened descriptor (so two threads of one process also exclude each other). Only when the
  file system is an ``OsFileSystem``: a ``SimulatedFileSystem`` lives in one process.

``await LocalStore.open(root, ...)`` is the normal entry point: it creates the root durably,
removes leftover temp files (under the stripe lock of their key, so a live writer in another
process is never robbed of its temp) and fsyncs every directory once, so state a crashed
process left visible-but-unsynced is durable before anyone builds on it. Constructing
``LocalStore(...)`` directly skips that scan (it does no I/O at all).

Objects are never modified in place, which is why ``copy`` may hard-link. A file that some
caller appends to through ``fs`` (journal segments, ``incidents.log``) must not be copied
with ``copy``: the copy would share later appends.

All ``OSError`` is translated here: reads map ``ENOENT``/``ENOTDIR``/``EISDIR`` to
``NotFound``; everything else becomes ``StorageUnavailable`` naming key, step and errno.
``run_sync`` is the exception: it runs the caller's function and lets its errors through,
since that caller is itself the boundary for its own file work.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager, contextmanager
from pathlib import Path
from typing import TypeVar, TypeVarTuple

import anyio
import anyio.to_thread
import xxhash

from streamer.errors import (
    InvalidKey,
    NotFound,
    PreconditionFailed,
    StorageError,
    StorageUnavailable,
)
from streamer.storage.base import Blob, BlobStore, ObjectInfo
from streamer.storage.fs import (
    LOCK_DIR,
    RESERVED_ROOT_NAMES,
    FileSystem,
    OsFileSystem,
    check_key,
    is_temp_name,
    temp_path,
)

log = logging.getLogger(__name__)

__all__ = ["LOCK_STRIPES", "LocalStore", "content_version"]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

#: Number of cross-process lock files; keys hash onto them.
LOCK_STRIPES = 256

_READ_MISSING = (errno.ENOENT, errno.ENOTDIR, errno.EISDIR)
#: Temps a batch write keeps open at once (their writeback in flight together).
_TEMPS_IN_FLIGHT = 64


def _stripe(key: str) -> int:
    return xxhash.xxh3_64_intdigest(key.encode("utf-8", "surrogatepass")) % LOCK_STRIPES


def _close_quietly(fs: FileSystem, handle: int) -> None:
    try:
        fs.close(handle)
    except OSError:
        pass


def _item_error(exc: OSError | InvalidKey, key: str) -> StorageError:
    """A batch item's error, as ``put_atomic`` would raise it for that key alone (an
    ``InvalidKey`` from the file system, e.g. a symlink on the path, stays as it is)."""
    return exc if isinstance(exc, InvalidKey) else _unavailable(exc, key, "put_atomic")


def content_version(data: bytes) -> str:
    """The version token of an object: xxh3_64 of its bytes, 16 hex digits."""
    return xxhash.xxh3_64_hexdigest(data)


def _split(key: str) -> tuple[str, str]:
    d, _, name = key.rpartition("/")
    return d, name


def _key_of_temp(d: str, tmp_name: str) -> str:
    name = tmp_name[1 : tmp_name.rindex(".tmp-")]
    return f"{d}/{name}" if d else name


def _unavailable(exc: OSError, key: str, step: str) -> StorageUnavailable:
    code = exc.errno if exc.errno is not None else 0
    name = errno.errorcode.get(code, str(code))
    return StorageUnavailable(f"{step} failed: {name} ({exc.strerror})", key=key)


def _read_error(exc: OSError, key: str, step: str) -> NotFound | StorageUnavailable:
    if exc.errno in _READ_MISSING:
        return NotFound("no such object", key=key)
    return _unavailable(exc, key, step)


class _KeyLock:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        # A free lock is taken without a trip through the event loop (a batch takes one
        # per key); cancellation is still checked.
        self.lock = anyio.Lock(fast_acquire=True)
        self.users = 0


class LocalStore(BlobStore):
    """Objects as files below ``root``. See the module docstring for the protocol.

    :param root: the store's directory (used for the default ``OsFileSystem`` and for lock
        files; informational when ``fs`` is given).
    :param fs: file system to work through; default ``OsFileSystem(root)``.
    :param fsync: ``False`` skips every file and directory fsync (throwaway load tests only).
    :param limiter: bounds the worker threads doing this store's blocking I/O; default is
        anyio's process-wide thread limiter.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        fs: FileSystem | None = None,
        fsync: bool = True,
        limiter: anyio.CapacityLimiter | None = None,
    ) -> None:
        self.root = Path(root)
        self.fs: FileSystem = fs if fs is not None else OsFileSystem(self.root)
        self.fsync = fsync
        self._limiter = limiter
        self._lock_dir: str | None = None
        if isinstance(self.fs, OsFileSystem):
            self._lock_dir = os.path.join(self.fs.root, LOCK_DIR)
        self._lock_dir_made = False
        # key → [lock, number of tasks holding or waiting]; entries vanish at zero so the
        # table stays as small as the set of keys being written right now.
        self._key_locks: dict[str, _KeyLock] = {}
        self._closed = False
        #: Temp files removed by ``open`` (0 when constructed directly).
        self.removed_temps = 0

    @classmethod
    async def open(
        cls,
        root: str | os.PathLike[str],
        *,
        fs: FileSystem | None = None,
        fsync: bool = True,
        limiter: anyio.CapacityLimiter | None = None,
    ) -> LocalStore:
        """Create the store, its root (durably) and recover: remove leftover temp files and
        fsync every directory, all in one worker-thread call.

        :raises StorageUnavailable: the root cannot be created or scanned.
        """
        store = cls(root, fs=fs, fsync=fsync, limiter=limiter)
        try:
            store.removed_temps = await store.run_sync(store._recover_blocking)
        except OSError as exc:
            raise _unavailable(exc, str(root), "open") from exc
        return store

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r}, fs={self.fs!r}, fsync={self.fsync})"

    async def aclose(self) -> None:
        self._closed = True

    async def run_sync(self, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        """Run blocking ``fn(*args)`` in a worker thread under this store's limiter.

        For callers batching their own ``self.fs`` work into one hop (journal, snapshots,
        incidents). Not cancellable once started (the call always completes, so a
        multi-step file operation is never abandoned half-way); exceptions pass through
        untranslated.
        """
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    # -- locking -------------------------------------------------------------------------

    @asynccontextmanager
    async def _key_lock(self, key: str) -> AsyncIterator[None]:
        entry = self._key_locks.get(key)
        if entry is None:
            entry = self._key_locks[key] = _KeyLock()
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._key_locks[key]

    @contextmanager
    def _flock(self, key: str) -> Iterator[None]:
        """Cross-process exclusion for ``key`` (blocking; worker thread only)."""
        with self._flock_stripe(_stripe(key)):
            yield

    @contextmanager
    def _flocks(self, keys: Sequence[str]) -> Iterator[None]:
        """``_flock`` of every key at once: each stripe once (a second flock of a stripe this
        thread holds would wait for itself), in stripe order (no deadlock between batches)."""
        with ExitStack() as stack:
            for stripe in sorted({_stripe(key) for key in keys}):
                stack.enter_context(self._flock_stripe(stripe))
            yield

    @contextmanager
    def _flock_stripe(self, stripe: int) -> Iterator[None]:
        if self._lock_dir is None:
            yield
            return
        if not self._lock_dir_made:
            self.fs.makedirs("")  # the root durably, in case open() was skipped
            os.makedirs(self._lock_dir, exist_ok=True)
            self._lock_dir_made = True
        path = os.path.join(self._lock_dir, f"{stripe:02x}.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the only descriptor of this open file releases the flock

    def _check_open(self, key: str) -> None:
        if self._closed:
            raise StorageUnavailable("store is closed", key=key)

    # -- durability hooks (tests override them to prove the checker catches their absence)

    def _sync_file(self, handle: int) -> None:
        self.fs.fsync(handle)

    def _sync_dir(self, path: str) -> None:
        self.fs.fsync_dir(path)

    # -- blocking helpers (worker thread) --------------------------------------------------

    def _discard(self, path: str | None) -> None:
        """Best-effort unlink of a temp; ``open`` removes whatever this fails to."""
        if path is None:
            return
        try:
            self.fs.unlink(path)
        except (OSError, InvalidKey):
            pass

    def _recover_blocking(self) -> int:
        fs = self.fs
        fs.makedirs("")
        removed = 0
        stack = [""]
        while stack:
            d = stack.pop()
            for name in fs.listdir(d):
                path = f"{d}/{name}" if d else name
                if not d and name in RESERVED_ROOT_NAMES:
                    continue
                if fs.isdir(path):
                    stack.append(path)
                elif is_temp_name(name):
                    with self._flock(_key_of_temp(d, name)):
                        try:
                            fs.unlink(path)
                            removed += 1
                        except FileNotFoundError:
                            pass  # its writer finished (and removed it) while we waited
            if self.fsync:
                self._sync_dir(d)
        return removed

    def _create_temp(self, key: str) -> tuple[str, int]:
        """Create an empty temp next to ``key`` (and its directory if missing)."""
        fs = self.fs
        tmp = temp_path(key)
        try:
            return tmp, fs.create(tmp)
        except (FileNotFoundError, NotADirectoryError):
            fs.makedirs(_split(key)[0])
            return tmp, fs.create(tmp)

    def _write_temp(self, key: str, data: bytes) -> str:
        """Create, fill and fsync a temp next to ``key``; return its path. On any error the
        temp is gone (best effort) and the ``OSError`` propagates."""
        tmp, handle = self._create_temp(key)
        self._finish_temp(tmp, handle, data, sync=self.fsync)
        return tmp

    def _finish_temp(self, tmp: str, handle: int, data: bytes | None, *, sync: bool) -> None:
        """Write ``data`` (unless None: already written) to an open temp, fsync it if
        ``sync`` and close it. On any error the temp is gone (best effort) and the
        ``OSError`` propagates."""
        fs = self.fs
        try:
            try:
                if data is not None:
                    fs.write(handle, data)
                if sync:
                    self._sync_file(handle)
            finally:
                fs.close(handle)
        except OSError:
            # Never fsync this data again: after a writeback error the kernel may already
            # have dropped it. The caller rewrites from memory.
            self._discard(tmp)
            raise

    def _install(self, key: str, tmp: str, *, create_only: bool) -> None:
        """Move a durable temp into place under ``key`` and make the name durable."""
        fs = self.fs
        backup: str | None = None
        if create_only:
            try:
                fs.link(tmp, key)
            except FileExistsError:
                self._discard(tmp)
                raise PreconditionFailed("object already exists", key=key) from None
            except OSError:
                self._discard(tmp)
                raise
            self._discard(tmp)
        else:
            backup = self._replace_keeping_backup(key, tmp)
        error = self._commit_dir(_split(key)[0], [(key, backup)])
        if error is not None:
            raise error

    def _commit_dir(
        self, d: str, installed: Sequence[tuple[str, str | None]]
    ) -> OSError | InvalidKey | None:
        """Make the renames of ``installed`` (``(key, backup)``, all in directory ``d``)
        durable with one fsync of ``d``; then their backups go. If that fsync fails, each
        key is rolled back to its backup and the error is returned."""
        if self.fsync:
            try:
                self._sync_dir(d)
            except (OSError, InvalidKey) as exc:
                for key, backup in installed:
                    self._rollback(key, backup)
                return exc
        for _, backup in installed:
            # Not synced: a backup whose unlink is lost is a temp, removed at open.
            self._discard(backup)
        return None

    def _replace_keeping_backup(self, key: str, tmp: str) -> str | None:
        """Rename ``tmp`` over ``key``; with fsync on, first hard-link the old object to a
        temp name (returned; None if there was none) so a failed directory fsync can put it
        back. On error nothing is left behind and ``key`` is unchanged."""
        fs = self.fs
        backup: str | None = None
        if self.fsync:
            backup = temp_path(key)
            try:
                fs.link(key, backup)
            except FileNotFoundError:
                backup = None
            except (OSError, InvalidKey):
                self._discard(tmp)
                raise
        try:
            fs.replace(tmp, key)
        except (OSError, InvalidKey):
            self._discard(tmp)
            self._discard(backup)
            raise
        return backup

    def _rollback(self, key: str, backup: str | None) -> None:
        """After a failed directory fsync, put the old object (or its absence) back.

        If that fails too, the caller still raises the fsync's error (the write is not
        durable), but the new object stays visible in this process until the next write of
        the key; the operator hears about it here, since the error does not say so.
        """
        try:
            if backup is not None:
                self.fs.replace(backup, key)
            else:
                self.fs.unlink(key)
        except (OSError, InvalidKey) as exc:
            log.error(
                "%s: the write failed (directory fsync), and putting the previous version back "
                "failed too (%s): the new, possibly not durable version stays visible",
                key,
                exc,
            )

    def _current_version(self, key: str) -> str | None:
        try:
            return content_version(self.fs.read(key))
        except FileNotFoundError:
            return None
        # ENOTDIR/EISDIR: the key collides with a directory or a file on its path. That is
        # an error for the write, not an absent object that a create-only put may fill.

    def _put_blocking(self, key: str, data: bytes, cas: bool, if_match: str | None) -> str:
        step = "put_if_match" if cas else "put_atomic"
        try:
            with self._flock(key):
                if cas:
                    current = self._current_version(key)
                    if current != if_match:
                        what = "object exists" if if_match is None else f"version is {current}"
                        raise PreconditionFailed(f"{what}, expected {if_match}", key=key)
                tmp = self._write_temp(key, data)
                self._install(key, tmp, create_only=cas and if_match is None)
        except OSError as exc:
            raise _unavailable(exc, key, step) from exc
        return content_version(data)

    def _write_temps(
        self,
        items: Sequence[tuple[str, bytes]],
        indexes: range,
        out: list[str | StorageError],
        written: list[tuple[int, str]],
    ) -> None:
        """Write the temps of ``items[indexes]``, then fsync each: every file's writeback
        starts before the first fsync waits, so the device works on all of them at once
        (one fsync after another leaves it idle between files). An item's error goes to
        ``out`` at its index and removes its temp; the other items go on."""
        fs = self.fs
        opened: list[tuple[int, str, int]] = []
        try:
            for i in indexes:
                key, data = items[i]
                try:
                    tmp, handle = self._create_temp(key)
                except (OSError, InvalidKey) as exc:
                    out[i] = _item_error(exc, key)
                    continue
                opened.append((i, tmp, handle))
                try:
                    fs.write(handle, data)
                except OSError as exc:
                    opened.pop()
                    _close_quietly(fs, handle)
                    self._discard(tmp)
                    out[i] = _item_error(exc, key)
                    continue
                if self.fsync:
                    fs.start_writeback(handle)
            while opened:
                i, tmp, handle = opened.pop(0)
                try:
                    self._finish_temp(tmp, handle, None, sync=self.fsync)
                except OSError as exc:
                    out[i] = _item_error(exc, items[i][0])
                    continue
                written.append((i, tmp))
        finally:
            for _, tmp, handle in opened:  # only after an unexpected error: nothing renamed
                _close_quietly(fs, handle)
                self._discard(tmp)

    def _put_many_blocking(self, items: Sequence[tuple[str, bytes]]) -> list[str | StorageError]:
        """``_put_blocking`` of each item, with one directory fsync per directory: every
        temp is written and fsynced, then renamed into place, then each directory that
        received a rename is fsynced once. An item's error fails that item alone, except a
        failed directory fsync, which rolls back every item renamed into that directory."""
        out: list[str | StorageError] = [content_version(data) for _, data in items]
        written: list[tuple[int, str]] = []  # (index, temp) of every item written
        locks = ExitStack()
        try:
            locks.enter_context(self._flocks([key for key, _ in items]))
        except OSError as exc:  # nothing was written
            return [_unavailable(exc, key, "put_atomic") for key, _ in items]
        # Releasing is closing the lock files: it cannot fail in a way that keeps a lock.
        with locks:
            for start in range(0, len(items), _TEMPS_IN_FLIGHT):
                end = min(len(items), start + _TEMPS_IN_FLIGHT)
                self._write_temps(items, range(start, end), out, written)
            by_dir: dict[str, list[tuple[int, str | None]]] = {}
            for i, tmp in written:
                key = items[i][0]
                try:
                    backup = self._replace_keeping_backup(key, tmp)
                except (OSError, InvalidKey) as exc:  # the temp (and any backup) is gone
                    out[i] = _item_error(exc, key)
                    continue
                by_dir.setdefault(_split(key)[0], []).append((i, backup))
            for d, installed in by_dir.items():
                error = self._commit_dir(d, [(items[i][0], backup) for i, backup in installed])
                if error is not None:
                    for i, _ in installed:
                        out[i] = _item_error(error, items[i][0])
        return out

    def _copy_blocking(self, src: str, dst: str) -> str:
        fs = self.fs
        try:
            with self._flock(dst):
                tmp = temp_path(dst)
                try:
                    fs.link(src, tmp)
                except (FileNotFoundError, NotADirectoryError):
                    if not fs.exists(src):
                        raise NotFound("copy source vanished", key=src) from None
                    fs.makedirs(_split(dst)[0])
                    fs.link(src, tmp)
                # Hash what was linked, not src: a concurrent put_atomic(src) may replace src
                # between the two, and the version must describe dst's content.
                try:
                    version = content_version(fs.read(tmp))
                except OSError as exc:
                    self._discard(tmp)
                    raise _read_error(exc, src, "copy") from exc
                self._install(dst, tmp, create_only=False)
                # If dst already was a link to src's inode, rename() did nothing (POSIX) and
                # left the temp name behind.
                self._discard(tmp)
        except OSError as exc:
            raise _unavailable(exc, dst, "copy") from exc
        return version

    def _delete_blocking(self, key: str) -> None:
        fs = self.fs
        d = _split(key)[0]
        try:
            with self._flock(key):
                if fs.isdir(key):
                    return  # a directory is not an object; renaming it away would be a disaster
                if not self.fsync:
                    try:
                        fs.unlink(key)
                    except FileNotFoundError:
                        pass
                    return
                # Rename aside rather than unlink, so a failed directory fsync can be undone.
                backup = temp_path(key)
                try:
                    fs.replace(key, backup)
                except (FileNotFoundError, NotADirectoryError):
                    # Already gone; still sync, since a delete that died before its directory
                    # fsync leaves the name absent in the cache but present on disk.
                    try:
                        self._sync_dir(d)
                    except (FileNotFoundError, NotADirectoryError):
                        pass
                    return
                try:
                    self._sync_dir(d)
                except OSError:
                    try:
                        fs.replace(backup, key)
                    except OSError:
                        pass
                    raise
                self._discard(backup)
        except OSError as exc:
            raise _unavailable(exc, key, "delete") from exc

    def _get_blocking(self, key: str) -> Blob:
        try:
            data = self.fs.read(key)
        except OSError as exc:
            raise _read_error(exc, key, "get") from exc
        return Blob(data=data, version=content_version(data))

    def _get_many_blocking(self, keys: Sequence[str]) -> list[Blob | None]:
        out: list[Blob | None] = []
        for key in keys:
            try:
                data = self.fs.read(key)
            except OSError as exc:
                if exc.errno in _READ_MISSING:
                    out.append(None)
                    continue
                raise _unavailable(exc, key, "get_many") from exc
            out.append(Blob(data=data, version=content_version(data)))
        return out

    def _range_blocking(self, key: str, offset: int, length: int) -> bytes:
        try:
            return self.fs.pread(key, offset, length)
        except OSError as exc:
            raise _read_error(exc, key, "get_range") from exc

    def _head_blocking(self, key: str) -> ObjectInfo:
        try:
            data = self.fs.read(key)
        except OSError as exc:
            raise _read_error(exc, key, "head") from exc
        return ObjectInfo(key=key, size=len(data), version=content_version(data))

    def _list_blocking(self, prefix: str) -> list[str]:
        fs = self.fs
        start = prefix.rpartition("/")[0]
        if start:
            try:
                check_key(start)
            except InvalidKey:
                return []  # no valid key lies below a malformed or reserved directory
        out: list[str] = []
        stack = [start]
        try:
            if start and not fs.isdir(start):
                return []
            while stack:
                d = stack.pop()
                for name in fs.listdir(d):
                    path = f"{d}/{name}" if d else name
                    if (not d and name in RESERVED_ROOT_NAMES) or is_temp_name(name):
                        continue
                    if fs.isdir(path):
                        sub = path + "/"
                        if sub.startswith(prefix) or prefix.startswith(sub):
                            stack.append(path)
                    elif path.startswith(prefix):
                        out.append(path)
        except OSError as exc:
            raise _unavailable(exc, prefix, "list") from exc
        out.sort()
        return out

    # -- BlobStore -----------------------------------------------------------------------

    async def get(self, key: str) -> Blob:
        check_key(key)
        self._check_open(key)
        return await self.run_sync(self._get_blocking, key)

    async def get_range(self, key: str, offset: int, length: int) -> bytes:
        check_key(key)
        if offset < 0 or length < 0:
            raise ValueError(f"negative offset or length ({offset}, {length}) for {key}")
        self._check_open(key)
        return await self.run_sync(self._range_blocking, key, offset, length)

    async def get_many(self, keys: Sequence[str]) -> list[Blob | None]:
        keys = list(keys)
        for key in keys:
            check_key(key)
        if not keys:
            return []
        self._check_open(keys[0])
        return await self.run_sync(self._get_many_blocking, keys)

    async def head(self, key: str) -> ObjectInfo:
        check_key(key)
        self._check_open(key)
        return await self.run_sync(self._head_blocking, key)

    async def put_atomic(self, key: str, data: bytes) -> str:
        check_key(key)
        self._check_open(key)
        data = bytes(data)
        async with self._key_lock(key):
            return await self.run_sync(self._put_blocking, key, data, False, None)

    async def put_many_atomic(self, items: Sequence[tuple[str, bytes]]) -> list[str | StorageError]:
        """``put_atomic`` of several keys in one worker-thread hop and one directory fsync per
        directory (instead of one hop and one directory fsync per key).

        Each item succeeds or fails on its own: the result at its index is the new version
        or the error (as ``put_atomic`` would raise it: ``StorageUnavailable``, or
        ``InvalidKey`` for a path the file system refuses, such as one through a symlink).
        A crash leaves each key with its old or its new content, independently of the other
        keys; only items whose result is a version are durable.

        :raises ValueError: a key appears twice.
        :raises InvalidKey: a key is malformed as a key (nothing is written).
        :raises StorageUnavailable: the store is closed (nothing is written; an empty batch
            returns ``[]`` either way, as ``get_many`` does).
        """
        keys = [key for key, _ in items]
        if len(set(keys)) != len(keys):
            raise ValueError("put_many_atomic: a key appears more than once")
        for key in keys:
            check_key(key)
        if not keys:
            return []
        self._check_open(keys[0])
        payload = [(key, bytes(data)) for key, data in items]
        async with AsyncExitStack() as stack:
            for key in sorted(keys):  # one order for every caller: no deadlock
                await stack.enter_async_context(self._key_lock(key))
            return await self.run_sync(self._put_many_blocking, payload)

    async def put_if_match(self, key: str, data: bytes, if_match: str | None) -> str:
        check_key(key)
        self._check_open(key)
        data = bytes(data)
        async with self._key_lock(key):
            return await self.run_sync(self._put_blocking, key, data, True, if_match)

    async def delete(self, key: str) -> None:
        check_key(key)
        self._check_open(key)
        async with self._key_lock(key):
            await self.run_sync(self._delete_blocking, key)

    async def list(self, prefix: str = "") -> list[str]:
        self._check_open(prefix)
        return await self.run_sync(self._list_blocking, prefix)

    async def copy(self, src: str, dst: str) -> str:
        check_key(src)
        check_key(dst)
        self._check_open(dst)
        async with self._key_lock(dst):
            return await self.run_sync(self._copy_blocking, src, dst)
