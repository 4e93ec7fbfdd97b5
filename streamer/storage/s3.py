"""``S3Store``: a ``BlobStore`` on any S3-compatible object store (AWS S3, MinIO, Ceph, SeaweedFS).

Layout: key ``a/b`` is the object ``<prefix>a/b`` in one bucket; ``prefix`` is ``""`` or ends
with ``/`` (``"worlds/w1"`` is read as ``"worlds/w1/"``). The client is aiobotocore (async
botocore): path-style addressing when an endpoint is given, SigV4, standard retry mode.
Credentials come from botocore's usual chain (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, profiles, instance roles) unless passed
explicitly.

**Versions** are the same content hash every backend uses (``content_version``: xxh3_64 of
the bytes), so a version means the same thing on local disk, in memory and on S3, and the
shared contract suite holds unchanged. Each object carries it as user metadata
(``x-amz-meta-xxh3``); ``get`` recomputes it from the bytes it read. The ETag is not exposed:
it is the token the *server* compares. Objects written by other tools (no metadata) still
work: ``head`` then hashes their content with one GET.

**Compare-and-swap** is enforced by the server, never emulated:

- ``put_if_match(key, data, None)``: ``PutObject`` with ``If-None-Match: *``.
- ``put_if_match(key, data, v)``: ``PutObject`` with ``If-Match: <etag of v>``. The etag of
  ``v`` comes from a per-key cache filled by this store's own gets, heads and puts (the usual
  read-modify-write costs one request); on a miss, or when the cached etag is refused, a
  ``HeadObject`` finds the current etag and version first. If the current version is not
  ``v`` the swap fails at once; otherwise the conditional PUT decides, so a writer that
  slipped in between HEAD and PUT changes the etag and the PUT gets 412.
- ``412`` (and ``404`` for ``If-Match`` on a missing key, as AWS answers) become
  ``PreconditionFailed``; ``409 ConditionalRequestConflict`` (AWS: concurrent conditional
  writes) is retried briefly. botocore retries transient failures itself; when a retried
  conditional PUT gets 412, the first attempt may have landed with its response lost, so the
  store checks whether the object now holds exactly our bytes and, if so, reports success.

**Atomicity and durability**: a single ``PutObject`` replaces the whole object atomically and
is durable when acknowledged. On a network store a write that raised ``StorageUnavailable``
has an *unknown* outcome (the request may have landed before the connection broke): the
previous object or the new one is readable, never a mix. Callers re-read, as they do after
``PreconditionFailed``.

**Divergences from ``LocalStore``** (S3 is not a file system):

- A key may also be a "directory" of other keys (``a`` next to ``a/b``): S3 allows both, and
  emulating the file-system refusal would cost requests on every write and still race.
- ``copy`` is a server-side ``CopyObject`` guarded by ``x-amz-copy-source-if-match`` on the
  source etag it just read, so the returned version is exactly what was copied; copying onto
  itself is a no-op that returns the version. ``CopyObject`` is limited to 5 GiB sources.
- ``list`` is a ``ListObjectsV2`` scan (paginated) by plain string prefix; names that are not
  valid keys (directory markers ending in ``/``, temp-shaped names) are never listed.
- ``get_many`` runs concurrent GETs, at most ``max_concurrency`` at a time.

Every botocore/aiohttp exception is translated here (design §4, style "errors at the
boundary"): missing object → ``NotFound``; 412 → ``PreconditionFailed``; missing bucket,
access denied, bad credentials, unreachable endpoint, timeouts, 5xx → ``StorageUnavailable``
naming the key (and the ``s3://bucket/object`` it maps to).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import AsyncExitStack, contextmanager
from typing import TYPE_CHECKING

import aiohttp
import anyio
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from botocore.loaders import Loader
from cachetools import LRUCache

from streamer.errors import (
    ConfigError,
    InvalidKey,
    NotFound,
    PreconditionFailed,
    StorageUnavailable,
    StreamerError,
)
from streamer.storage.base import Blob, BlobStore, ObjectInfo
from streamer.storage.fs import check_key, split_path
from streamer.storage.local import content_version

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import (
        CopyObjectRequestTypeDef,
        GetObjectRequestTypeDef,
        PutObjectRequestTypeDef,
    )

__all__ = ["VERSION_METADATA", "S3Store", "normalize_prefix"]

#: User-metadata name holding the object's content version (sent as ``x-amz-meta-xxh3``).
VERSION_METADATA = "xxh3"
_VERSION_RE = re.compile(r"^[0-9a-f]{16}$")
_CONTENT_TYPE = "application/octet-stream"

_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_DENIED_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "403",
        "Forbidden",
    }
)
#: How often one CAS / copy re-reads and tries again before giving up.
_ATTEMPTS = 3


class _Loader:
    #: botocore's data loader caches the parsed S3 service model (~0.1-0.2 s to build);
    #: every store's session shares the first one instead of parsing it again.
    shared: Loader | None = None


def _session() -> AioSession:
    session = get_session()
    if _Loader.shared is None:
        _Loader.shared = session.get_component("data_loader")
    else:
        session.register_component("data_loader", _Loader.shared)
    return session


def normalize_prefix(prefix: str) -> str:
    """``""`` or a valid key path ending in ``/``.

    :raises ConfigError: the prefix is absolute or has empty, ``.`` or ``..`` segments.
    """
    if prefix == "":
        return ""
    stripped = prefix[:-1] if prefix.endswith("/") else prefix
    try:
        split_path(stripped)
    except InvalidKey as exc:
        raise ConfigError(f"invalid S3 prefix {prefix!r}: {exc}", key="storage.s3_prefix") from exc
    return stripped + "/"


def _is_key(name: str) -> bool:
    try:
        check_key(name)
    except InvalidKey:
        return False
    return True


def _unquote(etag: str) -> str:
    return etag.strip('"')


def _quote(etag: str) -> str:
    return f'"{_unquote(etag)}"'


def _error_info(exc: ClientError) -> tuple[str, int, str]:
    error = exc.response.get("Error", {})
    meta = exc.response.get("ResponseMetadata", {})
    return str(error.get("Code", "")), int(meta.get("HTTPStatusCode", 0)), error.get("Message", "")


def _retried(exc: ClientError) -> bool:
    return int(exc.response.get("ResponseMetadata", {}).get("RetryAttempts", 0)) > 0


def _is_not_found(exc: ClientError) -> bool:
    code, status, _ = _error_info(exc)
    return code in _NOT_FOUND_CODES or (status == 404 and code != "NoSuchBucket")


def _is_precondition(exc: ClientError) -> bool:
    code, status, _ = _error_info(exc)
    return code == "PreconditionFailed" or status == 412


def _is_conflict(exc: ClientError) -> bool:
    code, status, _ = _error_info(exc)
    return code == "ConditionalRequestConflict" or status == 409


class S3Store(BlobStore):
    """Objects in one S3 bucket below ``prefix``. See the module docstring for the protocol.

    Use ``await S3Store.open(...)``; the constructor takes a ready aiobotocore client (and the
    exit stack that closes it, if the store should own it).

    :param max_concurrency: requests one ``get_many`` keeps in flight.
    :param list_page_size: ``MaxKeys`` of each ``ListObjectsV2`` page.
    :param etag_cache_size: keys whose last known (version, etag) pair is remembered.
    """

    def __init__(
        self,
        client: S3Client,
        *,
        bucket: str,
        prefix: str = "",
        endpoint: str = "",
        exit_stack: AsyncExitStack | None = None,
        max_concurrency: int = 16,
        list_page_size: int = 1000,
        etag_cache_size: int = 4096,
    ) -> None:
        if max_concurrency < 1 or list_page_size < 1 or etag_cache_size < 1:
            raise ValueError("max_concurrency, list_page_size and etag_cache_size must be >= 1")
        self._client = client
        self.bucket = bucket
        self.prefix = normalize_prefix(prefix)
        self.endpoint = endpoint or "AWS S3"
        self._stack = exit_stack
        self._max_concurrency = max_concurrency
        self._page_size = list_page_size
        # key -> (version, etag) as last seen by this store: saves a HEAD per CAS.
        self._etags: LRUCache[str, tuple[str, str]] = LRUCache(maxsize=etag_cache_size)
        self._closed = False

    @classmethod
    async def open(
        cls,
        *,
        bucket: str,
        endpoint: str = "",
        prefix: str = "",
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        max_attempts: int = 3,
        max_concurrency: int = 16,
        list_page_size: int = 1000,
        check_bucket: bool = True,
    ) -> S3Store:
        """Create the client and (unless ``check_bucket=False``) check with ``HeadBucket``
        that the bucket exists and the credentials are accepted.

        ``endpoint=""`` means AWS S3 itself (virtual-hosted addressing); any other endpoint
        (SeaweedFS, MinIO, ...) is addressed path-style. Credentials not passed here come from
        the standard AWS environment variables / config files. ``max_attempts`` counts every
        try of one request (1 = no retries); botocore's standard mode backs off between them.

        :raises ConfigError: empty bucket name or malformed prefix.
        :raises StorageUnavailable: no credentials, endpoint unreachable, bucket missing,
            access denied.
        """
        if not bucket:
            raise ConfigError("the s3 backend needs a bucket name", key="storage.s3_bucket")
        prefix = normalize_prefix(prefix)
        config = AioConfig(
            region_name=region,
            signature_version="s3v4",
            s3={"addressing_style": "path" if endpoint else "auto"},
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=max(max_concurrency, 10),
        )
        stack = AsyncExitStack()
        try:
            client = await stack.enter_async_context(
                _session().create_client(
                    "s3",
                    endpoint_url=endpoint or None,
                    region_name=region,
                    aws_access_key_id=access_key_id,
                    aws_secret_access_key=secret_access_key,
                    aws_session_token=session_token,
                    config=config,
                )
            )
            store = cls(
                client,
                bucket=bucket,
                prefix=prefix,
                endpoint=endpoint,
                exit_stack=stack,
                max_concurrency=max_concurrency,
                list_page_size=list_page_size,
            )
            if check_bucket:
                await store._check_bucket()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await stack.aclose()
            raise
        return store

    def __repr__(self) -> str:
        return f"S3Store({self.endpoint!r}, bucket={self.bucket!r}, prefix={self.prefix!r})"

    @property
    def client(self) -> S3Client:
        """The underlying aiobotocore client (tests hook its events)."""
        return self._client

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._stack is not None:
            with anyio.CancelScope(shield=True):
                await self._stack.aclose()

    # -- helpers ---------------------------------------------------------------------------

    def _object(self, key: str) -> str:
        return self.prefix + key

    def _where(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{key} at {self.endpoint}"

    def _check_open(self, key: str) -> None:
        if self._closed:
            raise StorageUnavailable("store is closed", key=key)

    def _remember(self, key: str, version: str, etag: str) -> None:
        self._etags[key] = (version, _unquote(etag))

    def _forget(self, key: str) -> None:
        self._etags.pop(key, None)

    def _translate(self, exc: ClientError, key: str, op: str) -> StreamerError:
        code, status, message = _error_info(exc)
        where = self._where(key)
        if code == "NoSuchBucket":
            return StorageUnavailable(
                f"{op} failed: bucket {self.bucket!r} does not exist ({where})", key=key
            )
        if _is_not_found(exc):
            return NotFound("no such object", key=key)
        if _is_precondition(exc):
            return PreconditionFailed(f"{op}: the object's version changed (HTTP 412)", key=key)
        if code in _DENIED_CODES or status == 403:
            return StorageUnavailable(
                f"{op} failed: access denied ({code or status}: {message or 'forbidden'}) on "
                f"{where}; check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket policy",
                key=key,
            )
        return StorageUnavailable(
            f"{op} failed: HTTP {status} {code}: {message} ({where})", key=key
        )

    @contextmanager
    def _boundary(self, key: str, op: str) -> Iterator[None]:
        """Translate every outside exception raised in the block into ``streamer.errors``."""
        try:
            yield
        except ClientError as exc:
            raise self._translate(exc, key, op) from exc
        except NoCredentialsError as exc:
            raise StorageUnavailable(
                f"{op} failed: no S3 credentials found; set AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY ({self._where(key)})",
                key=key,
            ) from exc
        except (BotoCoreError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise StorageUnavailable(
                f"{op} failed: {type(exc).__name__}: {exc} ({self._where(key)})", key=key
            ) from exc

    async def _check_bucket(self) -> None:
        where = f"s3://{self.bucket}/{self.prefix}"
        try:
            with self._boundary(where, "open"):
                await self._client.head_bucket(Bucket=self.bucket)
        except NotFound:  # HeadBucket has no body: a bare 404 means the bucket is missing
            raise StorageUnavailable(
                f"bucket {self.bucket!r} does not exist at {self.endpoint}", key=where
            ) from None

    # -- raw operations (raise ClientError; callers wrap them in _boundary) ----------------

    async def _fetch(self, key: str, range_header: str | None = None) -> tuple[bytes, str, bool]:
        """GET the object (or a range); return (bytes, etag, server honoured the range)."""
        request: GetObjectRequestTypeDef = {"Bucket": self.bucket, "Key": self._object(key)}
        if range_header is not None:
            request["Range"] = range_header
        resp = await self._client.get_object(**request)
        async with resp["Body"] as body:
            data = await body.read()
        return data, resp["ETag"], "ContentRange" in resp

    async def _get(self, key: str) -> Blob:
        data, etag, _ = await self._fetch(key)
        version = content_version(data)
        self._remember(key, version, etag)
        return Blob(data=data, version=version)

    async def _head(self, key: str) -> tuple[ObjectInfo, str]:
        """Size, version and etag. Objects without our metadata are hashed (one GET)."""
        resp = await self._client.head_object(Bucket=self.bucket, Key=self._object(key))
        version = resp.get("Metadata", {}).get(VERSION_METADATA)
        if version is None or not _VERSION_RE.match(version):
            data, etag, _ = await self._fetch(key)
            version = content_version(data)
            self._remember(key, version, etag)
            return ObjectInfo(key=key, size=len(data), version=version), _unquote(etag)
        self._remember(key, version, resp["ETag"])
        return ObjectInfo(key=key, size=resp["ContentLength"], version=version), _unquote(
            resp["ETag"]
        )

    async def _holds(self, key: str, version: str) -> bool:
        """Does the object now hold content ``version``? (After a retried conditional PUT.)"""
        try:
            info, _ = await self._head(key)
        except ClientError as exc:
            if _is_not_found(exc):
                return False
            raise
        return info.version == version

    async def _put(
        self,
        key: str,
        data: bytes,
        version: str,
        *,
        if_match: str | None = None,
        if_none_match: str | None = None,
    ) -> str:
        request: PutObjectRequestTypeDef = {
            "Bucket": self.bucket,
            "Key": self._object(key),
            "Body": data,
            "ContentType": _CONTENT_TYPE,
            "Metadata": {VERSION_METADATA: version},
        }
        if if_match is not None:
            request["IfMatch"] = if_match
        if if_none_match is not None:
            request["IfNoneMatch"] = if_none_match
        resp = await self._client.put_object(**request)
        self._remember(key, version, resp["ETag"])
        return version

    async def _create(self, key: str, data: bytes, version: str) -> None:
        for attempt in range(_ATTEMPTS):
            try:
                await self._put(key, data, version, if_none_match="*")
                return
            except ClientError as exc:
                if _is_conflict(exc):
                    await anyio.sleep(0.05 * (attempt + 1))
                    continue
                if not _is_precondition(exc):
                    raise
                if _retried(exc) and await self._holds(key, version):
                    return  # our first attempt landed; its response was lost
                raise PreconditionFailed("object exists, expected it absent", key=key) from None
        raise PreconditionFailed("concurrent conditional writes kept conflicting", key=key)

    async def _swap(self, key: str, data: bytes, version: str, if_match: str) -> None:
        cached = self._etags.get(key)
        etag = cached[1] if cached is not None and cached[0] == if_match else None
        for attempt in range(_ATTEMPTS):
            if etag is None:
                try:
                    info, etag = await self._head(key)
                except ClientError as exc:
                    if _is_not_found(exc):
                        raise PreconditionFailed(
                            f"object is absent, expected version {if_match}", key=key
                        ) from None
                    raise
                if info.version != if_match:
                    raise PreconditionFailed(
                        f"version is {info.version}, expected {if_match}", key=key
                    )
            try:
                await self._put(key, data, version, if_match=_quote(etag))
                return
            except ClientError as exc:
                if _is_conflict(exc):
                    await anyio.sleep(0.05 * (attempt + 1))
                    continue
                if not (_is_precondition(exc) or _is_not_found(exc)):
                    raise
                if _retried(exc) and await self._holds(key, version):
                    return  # our first attempt landed; its response was lost
                # The etag we sent is no longer current: the cached one was stale, or a writer
                # came in after our HEAD. Look again; the next HEAD decides.
                self._forget(key)
                etag = None
        raise PreconditionFailed(f"object kept changing, expected version {if_match}", key=key)

    # -- BlobStore -------------------------------------------------------------------------

    async def get(self, key: str) -> Blob:
        check_key(key)
        self._check_open(key)
        with self._boundary(key, "get"):
            return await self._get(key)

    async def get_range(self, key: str, offset: int, length: int) -> bytes:
        check_key(key)
        if offset < 0 or length < 0:
            raise ValueError(f"negative offset or length ({offset}, {length}) for {key}")
        self._check_open(key)
        if length == 0:
            await self.head(key)  # NotFound for a missing key, as for any other length
            return b""
        with self._boundary(key, "get_range"):
            try:
                data, _, ranged = await self._fetch(key, f"bytes={offset}-{offset + length - 1}")
            except ClientError as exc:
                code, status, _ = _error_info(exc)
                if code == "InvalidRange" or status == 416:
                    return b""  # the object exists; the range starts at or after its end
                raise
        return data if ranged else data[offset : offset + length]

    async def get_many(self, keys: Sequence[str]) -> list[Blob | None]:
        keys = list(keys)
        for key in keys:
            check_key(key)
        if not keys:
            return []
        self._check_open(keys[0])
        found: dict[str, Blob | None] = {}
        failures: list[StreamerError] = []
        limit = anyio.Semaphore(self._max_concurrency)

        async def fetch(key: str, cancel: anyio.CancelScope) -> None:
            async with limit:
                try:
                    with self._boundary(key, "get_many"):
                        found[key] = await self._get(key)
                except NotFound:
                    found[key] = None
                except StreamerError as exc:
                    failures.append(exc)
                    cancel.cancel()

        async with anyio.create_task_group() as tg:
            for key in dict.fromkeys(keys):  # each distinct key once
                tg.start_soon(fetch, key, tg.cancel_scope)
        if failures:
            raise failures[0]
        return [found[key] for key in keys]

    async def head(self, key: str) -> ObjectInfo:
        check_key(key)
        self._check_open(key)
        with self._boundary(key, "head"):
            info, _ = await self._head(key)
        return info

    async def put_atomic(self, key: str, data: bytes) -> str:
        check_key(key)
        self._check_open(key)
        data = bytes(data)
        with self._boundary(key, "put_atomic"):
            return await self._put(key, data, content_version(data))

    async def put_if_match(self, key: str, data: bytes, if_match: str | None) -> str:
        check_key(key)
        self._check_open(key)
        data = bytes(data)
        version = content_version(data)
        with self._boundary(key, "put_if_match"):
            if if_match is None:
                await self._create(key, data, version)
            else:
                await self._swap(key, data, version, if_match)
        return version

    async def delete(self, key: str) -> None:
        check_key(key)
        self._check_open(key)
        self._forget(key)
        with self._boundary(key, "delete"):
            await self._client.delete_object(Bucket=self.bucket, Key=self._object(key))

    async def list(self, prefix: str = "") -> list[str]:
        self._check_open(prefix)
        start = len(self.prefix)
        out: list[str] = []
        with self._boundary(prefix, "list"):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket,
                Prefix=self.prefix + prefix,
                PaginationConfig={"PageSize": self._page_size},
            )
            async for page in pages:
                for entry in page.get("Contents", []):
                    name = entry["Key"][start:]
                    if _is_key(name):
                        out.append(name)
        out.sort()
        return out

    async def copy(self, src: str, dst: str) -> str:
        check_key(src)
        check_key(dst)
        self._check_open(dst)
        if src == dst:
            return (await self.head(src)).version
        for _ in range(_ATTEMPTS):
            with self._boundary(src, "copy"):
                info, etag = await self._head(src)
            request: CopyObjectRequestTypeDef = {
                "Bucket": self.bucket,
                "Key": self._object(dst),
                "CopySource": {"Bucket": self.bucket, "Key": self._object(src)},
                "CopySourceIfMatch": _quote(etag),
                "MetadataDirective": "REPLACE",
                "Metadata": {VERSION_METADATA: info.version},
                "ContentType": _CONTENT_TYPE,
            }
            try:
                with self._boundary(dst, "copy"):
                    resp = await self._client.copy_object(**request)
            except NotFound:
                raise NotFound("copy source vanished", key=src) from None
            except PreconditionFailed:
                continue  # the source changed between HEAD and COPY: read it again
            self._remember(dst, info.version, resp["CopyObjectResult"]["ETag"])
            return info.version
        raise StorageUnavailable(f"copy source changed {_ATTEMPTS} times during the copy", key=src)
