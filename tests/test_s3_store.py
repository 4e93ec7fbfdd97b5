"""S3-specific behaviour of ``S3Store`` against a real SeaweedFS (``tests/s3server.py``).

The shared contract lives in ``test_store_contract.py``; this module covers what only an
object store has: ETags behind the versions, writers outside this store, two clients racing,
large objects read by range, retries whose response was lost, a server that goes away, and
bad credentials or buckets.
"""

from __future__ import annotations

import hashlib
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from streamer.config import StorageSettings
from streamer.errors import (
    ConfigError,
    NotFound,
    PreconditionFailed,
    StorageUnavailable,
)
from streamer.storage import content_version, open_store
from streamer.storage.s3 import VERSION_METADATA, S3Store
from tests.s3server import (
    ACCESS_KEY,
    SECRET_KEY,
    SeaweedFS,
    free_ports,
    shared_server,
    weed_or_skip,
)

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

pytestmark = pytest.mark.s3

MiB = 1024 * 1024


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    with shared_server(tmp_path_factory) as server:
        yield server


def fresh_prefix() -> str:
    return f"s3test-{uuid.uuid4().hex[:12]}/"


@pytest.fixture
async def store(s3_server: SeaweedFS) -> AsyncIterator[S3Store]:
    s = await s3_server.open_store(prefix=fresh_prefix())
    yield s
    await s.aclose()


@pytest.fixture
async def raw(s3_server: SeaweedFS) -> AsyncIterator[S3Client]:
    """A plain S3 client: another tool writing to the same bucket (no streamer metadata)."""
    async with get_session().create_client(
        "s3",
        endpoint_url=s3_server.endpoint,
        region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=AioConfig(s3={"addressing_style": "path"}),
    ) as client:
        yield client


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# -- versions and ETags -----------------------------------------------------------------------


async def test_versions_are_content_hashes_and_the_etag_guards_the_swap(
    store: S3Store, raw: S3Client
) -> None:
    key = "regions/r.0.0.region"
    v1 = await store.put_atomic(key, b"first")
    assert v1 == content_version(b"first")
    head = await raw.head_object(Bucket=store.bucket, Key=store.prefix + key)
    assert head["ETag"] == f'"{md5(b"first")}"'  # SeaweedFS: MD5 of the bytes, like AWS
    assert head["Metadata"][VERSION_METADATA] == v1
    assert (await store.get(key)).version == v1
    info = await store.head(key)
    assert (info.size, info.version) == (5, v1)

    v2 = await store.put_if_match(key, b"second", v1)
    head = await raw.head_object(Bucket=store.bucket, Key=store.prefix + key)
    assert head["ETag"] == f'"{md5(b"second")}"'
    assert head["Metadata"][VERSION_METADATA] == v2 == content_version(b"second")

    # Identical bytes give the identical version, and a stale version stays fenced even when
    # the object's current content equals the data being written.
    assert await store.put_atomic(key, b"second") == v2
    with pytest.raises(PreconditionFailed):
        await store.put_if_match(key, b"second", v1)


async def test_a_foreign_writer_fences_the_old_version(store: S3Store, raw: S3Client) -> None:
    key = "lease/r.1.1"
    mine = await store.put_atomic(key, b"mine")
    await raw.put_object(Bucket=store.bucket, Key=store.prefix + key, Body=b"foreign")
    with pytest.raises(PreconditionFailed) as info:
        await store.put_if_match(key, b"late", mine)  # cached etag refused, HEAD confirms
    assert info.value.key == key
    # No streamer metadata on the foreign object: head hashes its content instead.
    head = await store.head(key)
    assert (head.size, head.version) == (7, content_version(b"foreign"))
    assert (await store.get(key)).data == b"foreign"
    assert await store.copy(key, "copied") == content_version(b"foreign")
    await store.put_if_match(key, b"next", content_version(b"foreign"))
    assert (await store.get(key)).data == b"next"


async def test_same_content_under_a_new_etag_still_swaps(store: S3Store, raw: S3Client) -> None:
    """The version is the content, not the ETag: a multipart re-upload of the same bytes
    changes the ETag but not the version, and the swap still succeeds (once) on it."""
    key = "k"
    data = b"same bytes"
    v = await store.put_atomic(key, data)  # the store now caches v -> md5 ETag
    full = store.prefix + key
    upload = await raw.create_multipart_upload(Bucket=store.bucket, Key=full)
    part = await raw.upload_part(
        Bucket=store.bucket, Key=full, UploadId=upload["UploadId"], PartNumber=1, Body=data
    )
    await raw.complete_multipart_upload(
        Bucket=store.bucket,
        Key=full,
        UploadId=upload["UploadId"],
        MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]},
    )
    head = await raw.head_object(Bucket=store.bucket, Key=full)
    assert head["ETag"] != f'"{md5(data)}"', "scenario needs a different ETag for same bytes"
    assert await store.put_if_match(key, b"new", v) == content_version(b"new")
    with pytest.raises(PreconditionFailed):
        await store.put_if_match(key, b"newer", v)


# -- two clients --------------------------------------------------------------------------------


async def test_conditional_puts_race_between_two_clients(s3_server: SeaweedFS) -> None:
    """Two stores with their own connections (two shard servers) contend for one lease."""
    prefix = fresh_prefix()
    a = await s3_server.open_store(prefix=prefix)
    b = await s3_server.open_store(prefix=prefix)
    try:
        for round_ in range(3):
            key = f"lease/{round_}"
            outcome: dict[str, str | None] = {}

            async def take(
                name: str, s: S3Store, key: str = key, outcome: dict[str, str | None] = outcome
            ) -> None:
                try:
                    outcome[name] = await s.put_if_match(key, name.encode(), None)
                except PreconditionFailed:
                    outcome[name] = None

            async with anyio.create_task_group() as tg:
                tg.start_soon(take, "a", a)
                tg.start_soon(take, "b", b)
            winners = [n for n, v in outcome.items() if v is not None]
            assert len(winners) == 1, outcome
            assert (await a.get(key)).data == (await b.get(key)).data == winners[0].encode()

        # Lease renewal: the holder swaps on its version; the other side's stale read is fenced.
        va = await a.put_if_match("lease/x", b"a-epoch-1", None)
        seen_by_b = (await b.get("lease/x")).version
        va = await a.put_if_match("lease/x", b"a-epoch-2", va)
        with pytest.raises(PreconditionFailed):
            await b.put_if_match("lease/x", b"b-steals", seen_by_b)
        assert (await b.get("lease/x")).data == b"a-epoch-2"

        # Read-modify-write from both clients with retry: no increment is lost.
        await a.put_atomic("counter", b"0")

        async def incrementer(s: S3Store, n: int) -> None:
            for _ in range(n):
                while True:
                    blob = await s.get("counter")
                    try:
                        await s.put_if_match("counter", b"%d" % (int(blob.data) + 1), blob.version)
                        break
                    except PreconditionFailed:
                        continue

        async with anyio.create_task_group() as tg:
            tg.start_soon(incrementer, a, 8)
            tg.start_soon(incrementer, b, 8)
        assert (await a.get("counter")).data == b"16"
    finally:
        await a.aclose()
        await b.aclose()


# -- large objects, listing, concurrency --------------------------------------------------------


async def test_large_object_range_reads(store: S3Store) -> None:
    size = 12 * MiB + 3
    data = random.Random(7).randbytes(size)
    v = await store.put_atomic("big", data)
    assert (await store.head("big")).size == size
    ranges = [
        (0, 100),
        (4 * MiB - 10, 20),  # across 4 MiB and 8 MiB boundaries (typical chunk sizes)
        (8 * MiB - 1, 2),
        (3 * MiB, 6 * MiB),
        (size - 5, 100),  # short read at the end
        (size, 1),
        (size + 10, 1),
        (123, 0),
    ]
    for offset, length in ranges:
        got = await store.get_range("big", offset, length)
        assert got == data[offset : offset + length], (offset, length)
    blob = await store.get("big")
    assert blob.version == v and blob.data == data
    got_many = await store.get_many(["big", "missing", "big"])
    assert got_many[0] is not None and got_many[0].data == data and got_many[1] is None


async def test_list_paginates_and_prefixes_isolate_worlds(
    s3_server: SeaweedFS, raw: S3Client
) -> None:
    prefix = fresh_prefix()
    small_pages = await s3_server.open_store(prefix=prefix, list_page_size=2)
    other = await s3_server.open_store(prefix=prefix.rstrip("/") + "-other")  # "/" added
    try:
        keys = [f"regions/r.{i}.0.region" for i in range(7)] + ["world.json", "regionsX"]
        for k in keys:
            await small_pages.put_atomic(k, k.encode())
        await other.put_atomic("world.json", b"other world")
        # Names another tool left that are not valid keys are never listed.
        for junk in ("regions/dir-marker/", "regions/.r.0.0.region.tmp-0123456789ab"):
            await raw.put_object(Bucket=s3_server.bucket, Key=prefix + junk, Body=b"")
        assert await small_pages.list() == sorted(keys)
        assert await small_pages.list("regions/") == sorted(k for k in keys if "/" in k)
        assert await other.list() == ["world.json"]
        assert other.prefix == prefix.rstrip("/") + "-other/"
        listed = await raw.list_objects_v2(Bucket=s3_server.bucket, Prefix=other.prefix)
        assert [o["Key"] for o in listed["Contents"]] == [other.prefix + "world.json"]
    finally:
        await small_pages.aclose()
        await other.aclose()


async def test_deleting_a_directory_name_keeps_the_objects_below(store: S3Store) -> None:
    # SeaweedFS keeps real directories in its filer: deleting "a" must not remove "a/...".
    for k in ("a/b", "a/c/d"):
        await store.put_atomic(k, b"x")
    for name in ("a", "a/c"):
        await store.delete(name)
    assert await store.list() == ["a/b", "a/c/d"]


async def test_get_many_is_concurrent_and_bounded(s3_server: SeaweedFS) -> None:
    s = await s3_server.open_store(prefix=fresh_prefix(), max_concurrency=3)
    try:
        keys = [f"k{i}" for i in range(12)]
        for k in keys:
            await s.put_atomic(k, k.encode())
        in_flight = peak = 0

        def sent(**_: Any) -> None:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)

        def done(**_: Any) -> None:
            nonlocal in_flight
            in_flight -= 1

        s.client.meta.events.register("before-send.s3.GetObject", sent)
        s.client.meta.events.register("after-call.s3.GetObject", done)
        got = await s.get_many([*keys, "missing"])
        assert [b.data if b else None for b in got] == [k.encode() for k in keys] + [None]
        assert 1 < peak <= 3
    finally:
        await s.aclose()


# -- lost responses -----------------------------------------------------------------------------


async def test_a_retried_conditional_put_whose_first_attempt_landed_succeeds(
    store: S3Store,
) -> None:
    """botocore retries when a response is lost; the retry then gets 412 because the first
    attempt did land. The store sees its own bytes in place and reports success."""
    armed = {"on": False}

    def lose_first_success(response: Any = None, **_: Any) -> int | None:
        if armed["on"] and response is not None and response[0].status_code == 200:
            armed["on"] = False
            return 0  # "retry now", as if the 200 never arrived
        return None

    # botocore-stubs types handlers as returning None; needs-retry handlers return a delay.
    store.client.meta.events.register_first(
        "needs-retry.s3.PutObject",
        lose_first_success,  # type: ignore[arg-type]
    )
    armed["on"] = True
    v = await store.put_if_match("lease", b"taken", None)
    assert not armed["on"], "the retry hook did not fire"
    armed["on"] = True
    v2 = await store.put_if_match("lease", b"renewed", v)
    assert not armed["on"]
    assert (await store.get("lease")).data == b"renewed"
    assert v2 == content_version(b"renewed")


# -- outages and bad configuration --------------------------------------------------------------


async def test_server_stopped_mid_test_raises_storage_unavailable_naming_the_key(
    tmp_path: Path,
) -> None:
    server = SeaweedFS(weed_or_skip(), tmp_path / "weed", bucket="outage")
    server.start()
    try:
        s = await server.open_store(
            prefix="w/", max_attempts=1, connect_timeout=1.0, read_timeout=3.0
        )
        try:
            v = await s.put_atomic("regions/r.0.0.region", b"before the outage")
            assert (await s.get("regions/r.0.0.region")).version == v
            server.kill()  # with pooled keep-alive connections still open
            key = "regions/r.0.0.region"
            calls: dict[str, Callable[[], Awaitable[object]]] = {
                "get": lambda: s.get(key),
                "get_range": lambda: s.get_range(key, 0, 4),
                "head": lambda: s.head(key),
                "get_many": lambda: s.get_many([key]),
                "put_atomic": lambda: s.put_atomic(key, b"x"),
                "put_if_match": lambda: s.put_if_match(key, b"x", v),
                "create": lambda: s.put_if_match(key, b"x", None),
                "delete": lambda: s.delete(key),
                "copy": lambda: s.copy(key, key + ".bak"),
            }
            for op, call in calls.items():
                with pytest.raises(StorageUnavailable) as info:
                    await call()
                assert info.value.key == key, op
                assert key in str(info.value) and "s3://outage/w/" in str(info.value), op
            with pytest.raises(StorageUnavailable, match="list failed"):
                await s.list("regions/")
        finally:
            await s.aclose()
    finally:
        server.stop()


async def test_bad_credentials_bucket_or_endpoint_give_clear_errors(
    s3_server: SeaweedFS,
) -> None:
    ep = s3_server.endpoint
    with pytest.raises(StorageUnavailable, match=r"access denied.*AWS_ACCESS_KEY_ID"):
        await S3Store.open(
            endpoint=ep, bucket=s3_server.bucket, access_key_id=ACCESS_KEY, secret_access_key="x"
        )
    with pytest.raises(StorageUnavailable, match="access denied"):
        await S3Store.open(
            endpoint=ep, bucket=s3_server.bucket, access_key_id="nobody", secret_access_key="x"
        )
    with pytest.raises(StorageUnavailable, match="bucket 'no-such-bucket' does not exist"):
        await S3Store.open(
            endpoint=ep,
            bucket="no-such-bucket",
            access_key_id=ACCESS_KEY,
            secret_access_key=SECRET_KEY,
        )
    (dead_port,) = free_ports(1)
    with pytest.raises(StorageUnavailable, match="open failed"):
        await S3Store.open(
            endpoint=f"http://127.0.0.1:{dead_port}",
            bucket="b",
            access_key_id=ACCESS_KEY,
            secret_access_key=SECRET_KEY,
            max_attempts=1,
            connect_timeout=1.0,
        )
    with pytest.raises(ConfigError, match="s3_prefix"):
        await s3_server.open_store(prefix="../escape")
    with pytest.raises(ConfigError, match="s3_bucket"):
        await S3Store.open(endpoint=ep, bucket="")

    # Skipping the bucket check defers the error to the first request, which names its key.
    s = await S3Store.open(
        endpoint=ep,
        bucket=s3_server.bucket,
        access_key_id=ACCESS_KEY,
        secret_access_key="wrong",
        check_bucket=False,
    )
    try:
        with pytest.raises(StorageUnavailable, match="access denied") as info:
            await s.get("world.json")
        assert info.value.key == "world.json"
        with pytest.raises(StorageUnavailable, match="access denied"):
            await s.put_if_match("world.json", b"x", None)
    finally:
        await s.aclose()
    m = await S3Store.open(
        endpoint=ep,
        bucket="no-such-bucket",
        access_key_id=ACCESS_KEY,
        secret_access_key=SECRET_KEY,
        check_bucket=False,
    )
    try:
        with pytest.raises(StorageUnavailable, match="does not exist") as info:
            await m.get("world.json")
        assert info.value.key == "world.json"
    finally:
        await m.aclose()


_AWS_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


async def test_open_store_builds_s3_from_settings_and_environment(
    s3_server: SeaweedFS, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in _AWS_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    settings = StorageSettings(
        backend="s3", s3_endpoint=s3_server.endpoint, s3_bucket=s3_server.bucket, s3_prefix="w1"
    )
    with pytest.raises(StorageUnavailable, match="no S3 credentials"):
        await open_store(settings, tmp_path)

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    store = await open_store(settings, tmp_path)
    try:
        assert isinstance(store, S3Store) and store.prefix == "w1/"
        v = await store.put_if_match(f"{uuid.uuid4().hex}/world.json", b"{}", None)
        assert v == content_version(b"{}")
    finally:
        await store.aclose()
    with pytest.raises(StorageUnavailable, match="s3_bucket is not set"):
        await open_store(StorageSettings(backend="s3", s3_endpoint=s3_server.endpoint), tmp_path)


async def test_missing_source_and_missing_keys(store: S3Store) -> None:
    with pytest.raises(NotFound) as info:
        await store.copy("nope", "dst")
    assert info.value.key == "nope"
    with pytest.raises(NotFound):
        await store.get_range("nope", 0, 0)
    with pytest.raises(PreconditionFailed):
        await store.put_if_match("nope", b"x", content_version(b"x"))
    assert await store.list() == []
