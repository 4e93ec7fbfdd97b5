"""The BlobStore interface: what every storage backend (local files, S3, memory) promises.

Keys are relative POSIX paths such as ``regions/r.0.-1.region``: no leading ``/``, no ``..``
segment, no empty segment, no backslash. A key that breaks these rules raises ``InvalidKey``.

Version tokens are opaque strings. ``put_if_match(key, data, if_match=v)`` replaces the object
only if its current version is ``v``; ``if_match=None`` creates it only if absent. This is the
fencing primitive: a writer that lost its lease cannot overwrite a newer version.

Every backend translates its own exceptions (``OSError``, client errors) into
``streamer.errors`` at this boundary. A failed put is never acknowledged, and the previous
version of the object stays readable.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from types import TracebackType

import msgspec


class Blob(msgspec.Struct, frozen=True):
    data: bytes
    version: str


class ObjectInfo(msgspec.Struct, frozen=True):
    key: str
    size: int
    version: str


class BlobStore(abc.ABC):
    """Async object store. Use as ``async with store:``; ``aclose()`` is idempotent."""

    @abc.abstractmethod
    async def get(self, key: str) -> Blob:
        """Return the whole object and its version.

        :raises NotFound: the key does not exist.
        :raises InvalidKey: the key is malformed or escapes the root.
        :raises StorageUnavailable: an I/O error prevented the read.
        """

    @abc.abstractmethod
    async def get_range(self, key: str, offset: int, length: int) -> bytes:
        """Return up to ``length`` bytes from ``offset`` (fewer only at end of object).

        :raises NotFound, InvalidKey, StorageUnavailable: as ``get``.
        :raises ValueError: negative offset or length.
        """

    @abc.abstractmethod
    async def get_many(self, keys: Sequence[str]) -> list[Blob | None]:
        """Return each key's object, ``None`` for a missing key, in one batch.

        Local backends do this in one worker-thread hop: page-cached reads must not be
        bounced through threads one by one.

        :raises InvalidKey, StorageUnavailable: as ``get``.
        """

    @abc.abstractmethod
    async def head(self, key: str) -> ObjectInfo:
        """Size and version without the data.

        :raises NotFound, InvalidKey, StorageUnavailable: as ``get``.
        """

    @abc.abstractmethod
    async def put_atomic(self, key: str, data: bytes) -> str:
        """Durably replace the object; return its new version.

        Readers see either the old or the new object, never a mix. Returns only after the
        data and its name are durable (local: fsync file, rename, fsync directory).

        :raises InvalidKey: the key is malformed.
        :raises StorageUnavailable: the write failed; the old object (if any) is intact and
            nothing is acknowledged. An fsync failure is never retried on the same data.
        """

    @abc.abstractmethod
    async def put_if_match(self, key: str, data: bytes, if_match: str | None) -> str:
        """Compare-and-swap: replace only if the current version equals ``if_match``.

        ``if_match=None`` means "create only if absent". Durable like ``put_atomic``.

        :raises PreconditionFailed: the current version differs (or the key exists, for None).
        :raises InvalidKey, StorageUnavailable: as ``put_atomic``.
        """

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Durably remove the object. Deleting a missing key is not an error (idempotent).

        :raises InvalidKey, StorageUnavailable.
        """

    @abc.abstractmethod
    async def list(self, prefix: str = "") -> list[str]:
        """All keys starting with ``prefix``, sorted. Temp files are never listed.

        :raises StorageUnavailable.
        """

    @abc.abstractmethod
    async def copy(self, src: str, dst: str) -> str:
        """Durably make ``dst`` an independent object with ``src``'s content; return its version.

        Local stores hard-link (objects are never modified in place, so sharing is safe).

        :raises NotFound: ``src`` does not exist.
        :raises InvalidKey, StorageUnavailable.
        """

    async def aclose(self) -> None:  # noqa: B027 - optional hook, most stores hold nothing
        """Release resources. Idempotent."""

    async def __aenter__(self) -> BlobStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
