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
    thread limiter of ``settings.io_threads``. ``memory`` ignores ``root``. ``s3`` ignores
    ``root`` too: the world lives at ``s3_prefix`` in ``s3_bucket`` (``S3Store.open`` checks
    the bucket and the credentials, which come from the standard ``AWS_*`` variables).

    :raises StorageUnavailable: the backend cannot be opened (for ``s3``: no bucket
        configured, endpoint unreachable, bucket missing, credentials refused).
    :raises ConfigError: a malformed ``s3_prefix``.
    """
    if settings.backend == "local":
        return await LocalStore.open(
            root, fsync=settings.fsync, limiter=anyio.CapacityLimiter(settings.io_threads)
        )
    if settings.backend == "memory":
        return MemoryStore()
    if settings.backend == "s3":
        if not settings.s3_bucket:
            raise StorageUnavailable("s3 backend not available: storage.s3_bucket is not set")
        # Imported here: aiobotocore costs ~0.6 s to import, and only s3 worlds need it.
        from streamer.storage.s3 import S3Store

        return await S3Store.open(
            endpoint=settings.s3_endpoint,
            bucket=settings.s3_bucket,
            prefix=settings.s3_prefix,
            region=settings.s3_region,
        )
    raise StorageUnavailable(f"{settings.backend} backend not available in this build")
