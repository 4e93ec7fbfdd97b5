"""``MemoryStore``: the ``BlobStore`` contract held in a dict, for tests and tools.

Keys are validated exactly as ``LocalStore`` validates them, and versions are the same
content hash (``local.content_version``), so a test that passes on one passes on the other.
Every method checkpoints once, so tasks interleave at the same points they would around a
real store's I/O; compare-and-swap needs no lock because nothing awaits between compare and
swap. Like a file system, it refuses a key that is also a directory of other keys (``a``
next to ``a/b``) with ``StorageUnavailable``; unlike ``LocalStore``, which keeps emptied
directories, it forgets a directory as soon as its last key is deleted.
"""

from __future__ import annotations

from collections.abc import Sequence

import anyio.lowlevel

from streamer.errors import NotFound, PreconditionFailed, StorageUnavailable
from streamer.storage.base import Blob, BlobStore, ObjectInfo
from streamer.storage.fs import check_key
from streamer.storage.local import content_version

__all__ = ["MemoryStore"]


class MemoryStore(BlobStore):
    def __init__(self) -> None:
        self._objects: dict[str, Blob] = {}
        # directory prefix ("a", "a/b") -> number of keys below it
        self._dirs: dict[str, int] = {}
        self._closed = False

    def __repr__(self) -> str:
        return f"MemoryStore({len(self._objects)} objects)"

    async def aclose(self) -> None:
        self._closed = True

    async def _enter(self, key: str) -> None:
        await anyio.lowlevel.checkpoint()
        if self._closed:
            raise StorageUnavailable("store is closed", key=key)

    def _get(self, key: str) -> Blob:
        blob = self._objects.get(key)
        if blob is None:
            raise NotFound("no such object", key=key)
        return blob

    async def get(self, key: str) -> Blob:
        check_key(key)
        await self._enter(key)
        return self._get(key)

    async def get_range(self, key: str, offset: int, length: int) -> bytes:
        check_key(key)
        if offset < 0 or length < 0:
            raise ValueError(f"negative offset or length ({offset}, {length}) for {key}")
        await self._enter(key)
        return self._get(key).data[offset : offset + length]

    async def get_many(self, keys: Sequence[str]) -> list[Blob | None]:
        keys = list(keys)
        for key in keys:
            check_key(key)
        if not keys:
            return []
        await self._enter(keys[0])
        return [self._objects.get(key) for key in keys]

    async def head(self, key: str) -> ObjectInfo:
        check_key(key)
        await self._enter(key)
        blob = self._get(key)
        return ObjectInfo(key=key, size=len(blob.data), version=blob.version)

    def _check_path(self, key: str) -> None:
        """Refuse what a file system would: a key that is a directory, or lies below a key."""
        if key in self._dirs:
            raise StorageUnavailable("is a directory of other keys", key=key)
        parent = key.rpartition("/")[0]
        while parent:
            if parent in self._objects:
                raise StorageUnavailable(f"{parent} is an object, not a directory", key=key)
            parent = parent.rpartition("/")[0]

    def _set(self, key: str, blob: Blob) -> str:
        if key not in self._objects:
            parent = key.rpartition("/")[0]
            while parent:
                self._dirs[parent] = self._dirs.get(parent, 0) + 1
                parent = parent.rpartition("/")[0]
        self._objects[key] = blob
        return blob.version

    def _put(self, key: str, data: bytes) -> str:
        return self._set(key, Blob(data=bytes(data), version=content_version(data)))

    async def put_atomic(self, key: str, data: bytes) -> str:
        check_key(key)
        await self._enter(key)
        self._check_path(key)
        return self._put(key, data)

    async def put_if_match(self, key: str, data: bytes, if_match: str | None) -> str:
        check_key(key)
        await self._enter(key)
        self._check_path(key)
        current = self._objects.get(key)
        current_version = None if current is None else current.version
        if current_version != if_match:
            what = "object exists" if if_match is None else f"version is {current_version}"
            raise PreconditionFailed(f"{what}, expected {if_match}", key=key)
        return self._put(key, data)

    async def delete(self, key: str) -> None:
        check_key(key)
        await self._enter(key)
        if self._objects.pop(key, None) is not None:
            parent = key.rpartition("/")[0]
            while parent:
                self._dirs[parent] -= 1
                if not self._dirs[parent]:
                    del self._dirs[parent]
                parent = parent.rpartition("/")[0]

    async def list(self, prefix: str = "") -> list[str]:
        await self._enter(prefix)
        return sorted(k for k in self._objects if k.startswith(prefix))

    async def copy(self, src: str, dst: str) -> str:
        check_key(src)
        check_key(dst)
        await self._enter(dst)
        blob = self._get(src)
        self._check_path(dst)
        return self._set(dst, blob)  # Blob is frozen and bytes immutable: sharing is a copy
