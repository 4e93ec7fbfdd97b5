"""Storage backends behind one interface (``BlobStore``); pick one with ``open_store``."""

from __future__ import annotations

from pathlib import Path

import anyio

from streamer.config import StorageSettings
from streamer.errors import StorageUnavailable
from streamer.storage.base import Blob, BlobStore, ObjectInfo
from streamer.storage.local import LocalStore, content_version
from streamer.storage.memory import MemoryStore

__all__ = [
    "Blob",
    "BlobStore",
    "LocalStore",
    "MemoryStore",
    "ObjectInfo",
    "content_version",
    "open_store",
]


async def open_store(settings: StorageSettings, root: Path) -> BlobStore:
    """Open the backend ``settings.backend`` names, for the world at ``root``.

    ``local`` runs ``LocalStore.open`` (creates ``root``, removes leftover temps) with a
    thread limiter of ``settings.io_threads``. ``memory`` ignores ``root``.

    :raises StorageUnavailable: the backend cannot be opened (``s3`` is not in this build).
    """
    if settings.backend == "local":
        return await LocalStore.open(
            root, fsync=settings.fsync, limiter=anyio.CapacityLimiter(settings.io_threads)
        )
    if settings.backend == "memory":
        return MemoryStore()
    raise StorageUnavailable(f"{settings.backend} backend not available in this build")
