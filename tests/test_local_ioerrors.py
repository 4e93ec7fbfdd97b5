"""LocalStore under I/O errors: EIO and ENOSPC at every step of a write, once and persistently.

Promises checked each time: the write raises StorageUnavailable naming key and errno, the old
version stays readable with its old content (in the running process and in the durable
image), no temp file is left (or ``open`` removes it), an fsync is never retried on the same
data, and after a transient error the next write succeeds.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from collections import Counter
from pathlib import Path
from unittest import mock

import pytest

from streamer.errors import InvalidKey, NotFound, StorageUnavailable
from streamer.storage import fs as fs_module
from streamer.storage.faultfs import SimulatedFileSystem
from streamer.storage.fs import OsFileSystem, is_temp_name
from streamer.storage.local import LocalStore, content_version

KEY = "regions/r.0.0.region"
#: Every file-system step of a replacing write, in order (link = the rollback backup).
WRITE_STEPS = ["create", "write", "fsync", "link", "replace", "fsync_dir"]
ERRNOS = [errno.EIO, errno.ENOSPC]


class CountingFS(SimulatedFileSystem):
    """Counts fsync calls per handle (one handle = one inode opened by one write)."""

    def __init__(self) -> None:
        super().__init__()
        self.fsync_calls: Counter[int] = Counter()

    def fsync(self, handle: int) -> None:
        self.fsync_calls[handle] += 1
        super().fsync(handle)


def temps(fs: SimulatedFileSystem) -> list[str]:
    return [p for p in fs.tree() if is_temp_name(p.rpartition("/")[2])]


async def _store_with_old(fs: SimulatedFileSystem | None = None) -> tuple[LocalStore, str]:
    store = await LocalStore.open("/w", fs=fs if fs is not None else SimulatedFileSystem())
    return store, await store.put_atomic(KEY, b"old")


async def _assert_old_intact(store: LocalStore, fs: SimulatedFileSystem, v_old: str) -> None:
    blob = await store.get(KEY)
    assert (blob.data, blob.version) == (b"old", v_old)
    assert (await store.get_many([KEY]))[0] == blob
    assert await store.list() == [KEY]
    reopened = await LocalStore.open("/w", fs=fs.durable_image())
    assert (await reopened.get(KEY)).data == b"old"
    assert await reopened.list() == [KEY]


@pytest.mark.parametrize("once", [True, False], ids=["once", "persistent"])
@pytest.mark.parametrize("err", ERRNOS, ids=errno.errorcode.get)
@pytest.mark.parametrize("step", WRITE_STEPS)
async def test_put_atomic_error_at_each_step(step: str, err: int, once: bool) -> None:
    fs = SimulatedFileSystem()
    store, v_old = await _store_with_old(fs)
    fs.inject(step, err, path_contains="regions", once=once)
    with pytest.raises(StorageUnavailable) as info:
        await store.put_atomic(KEY, b"new")
    assert info.value.key == KEY
    assert errno.errorcode[err] in str(info.value)
    assert temps(fs) == []
    await _assert_old_intact(store, fs, v_old)
    if not once:
        with pytest.raises(StorageUnavailable):
            await store.put_atomic(KEY, b"new")
        await _assert_old_intact(store, fs, v_old)
        fs.clear_faults()
    assert await store.put_atomic(KEY, b"new") == content_version(b"new")
    assert (await store.get(KEY)).data == b"new"
    assert (await LocalStore.open("/w", fs=fs.durable_image())).fs.read(KEY) == b"new"
    assert temps(fs) == []


@pytest.mark.parametrize("err", ERRNOS, ids=errno.errorcode.get)
@pytest.mark.parametrize("step", WRITE_STEPS)
async def test_put_if_match_error_at_each_step(step: str, err: int) -> None:
    fs = SimulatedFileSystem()
    store, v_old = await _store_with_old(fs)
    fs.inject(step, err, path_contains="regions")
    with pytest.raises(StorageUnavailable):
        await store.put_if_match(KEY, b"new", v_old)
    assert temps(fs) == []
    await _assert_old_intact(store, fs, v_old)
    await store.put_if_match(KEY, b"new", v_old)  # the transient error is gone
    assert (await store.get(KEY)).data == b"new"


@pytest.mark.parametrize("err", ERRNOS, ids=errno.errorcode.get)
@pytest.mark.parametrize("step", ["create", "write", "fsync", "link", "fsync_dir"])
async def test_create_only_error_leaves_the_key_absent(step: str, err: int) -> None:
    fs = SimulatedFileSystem()
    store = await LocalStore.open("/w", fs=fs)
    fs.inject(step, err, path_contains="leases")
    with pytest.raises(StorageUnavailable):
        await store.put_if_match("leases/r.0.0", b"me", None)
    with pytest.raises(NotFound):
        await store.get("leases/r.0.0")
    assert temps(fs) == []
    assert await store.list() == []
    await store.put_if_match("leases/r.0.0", b"me", None)


@pytest.mark.parametrize("err", ERRNOS, ids=errno.errorcode.get)
@pytest.mark.parametrize("step", ["link", "replace", "fsync_dir"])
async def test_copy_error_keeps_the_old_destination(step: str, err: int) -> None:
    fs = SimulatedFileSystem()
    store, _ = await _store_with_old(fs)
    await store.put_atomic("snapshots/1/r", b"snap")
    fs.inject(step, err, path_contains="regions")
    with pytest.raises(StorageUnavailable) as info:
        await store.copy("snapshots/1/r", KEY)
    assert info.value.key == KEY
    assert temps(fs) == []
    await _assert_old_intact_with(store, fs, {KEY: b"old", "snapshots/1/r": b"snap"})
    await store.copy("snapshots/1/r", KEY)
    assert (await store.get(KEY)).data == b"snap"


async def _assert_old_intact_with(
    store: LocalStore, fs: SimulatedFileSystem, expect: dict[str, bytes]
) -> None:
    for s in (store, await LocalStore.open("/w", fs=fs.durable_image())):
        assert {k: (await s.get(k)).data for k in await s.list()} == expect


@pytest.mark.parametrize("err", ERRNOS, ids=errno.errorcode.get)
@pytest.mark.parametrize("step", ["replace", "fsync_dir"])
async def test_delete_error_keeps_the_object(step: str, err: int) -> None:
    fs = SimulatedFileSystem()
    store, v_old = await _store_with_old(fs)
    fs.inject(step, err, path_contains="regions")
    with pytest.raises(StorageUnavailable):
        await store.delete(KEY)
    assert temps(fs) == []
    await _assert_old_intact(store, fs, v_old)
    await store.delete(KEY)
    assert await store.list() == []
    assert await (await LocalStore.open("/w", fs=fs.durable_image())).list() == []


async def test_mkdir_error_for_a_new_directory() -> None:
    fs = SimulatedFileSystem()
    store = await LocalStore.open("/w", fs=fs)
    fs.inject("mkdir", errno.ENOSPC)
    with pytest.raises(StorageUnavailable, match="ENOSPC"):
        await store.put_atomic("new/dir/key", b"x")
    assert await store.list() == []
    await store.put_atomic("new/dir/key", b"x")
    image = await LocalStore.open("/w", fs=fs.durable_image())
    assert (await image.get("new/dir/key")).data == b"x"


async def test_temp_left_by_failed_cleanup_is_removed_at_open() -> None:
    fs = SimulatedFileSystem()
    store, _ = await _store_with_old(fs)
    fs.inject("fsync", errno.EIO, path_contains="regions")
    fs.inject("unlink", errno.EIO, once=False)
    with pytest.raises(StorageUnavailable):
        await store.put_atomic(KEY, b"new")
    assert len(temps(fs)) == 1
    assert await store.list() == [KEY]  # never listed
    fs.clear_faults()
    reopened = await LocalStore.open("/w", fs=fs)
    assert reopened.removed_temps == 1
    assert temps(fs) == []
    assert (await reopened.get(KEY)).data == b"old"


@pytest.mark.parametrize("once", [True, False], ids=["once", "persistent"])
async def test_fsync_failure_is_never_retried(once: bool) -> None:
    fs = CountingFS()
    store, v_old = await _store_with_old(fs)
    before, n_ops = set(fs.fsync_calls), len(fs.ops)
    fs.inject("fsync", errno.EIO, path_contains="regions", once=once)
    with pytest.raises(StorageUnavailable):
        await store.put_atomic(KEY, b"new")
    failed = [h for h in fs.fsync_calls if h not in before]
    assert len(failed) == 1  # one inode was written...
    assert fs.fsync_calls[failed[0]] == 1  # ...and fsynced exactly once
    after = [op.name for op in fs.ops[n_ops:]]
    assert after == ["create", "write", "unlink"]  # never installed, temp removed
    await _assert_old_intact(store, fs, v_old)


async def test_read_errors_are_unavailable_not_missing() -> None:
    fs = SimulatedFileSystem()
    store, _ = await _store_with_old(fs)
    for op, call in [
        ("read", store.get(KEY)),
        ("read", store.head(KEY)),
        ("read", store.get_many([KEY])),
        ("pread", store.get_range(KEY, 0, 1)),
        ("listdir", store.list()),
    ]:
        fs.inject(op, errno.EIO)
        with pytest.raises(StorageUnavailable, match="EIO"):
            await call
    assert (await store.get(KEY)).data == b"old"


# -- the real file system, with os.fsync failing ------------------------------------------------


def _on_disk(root: Path) -> list[str]:
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and not str(p.relative_to(root)).startswith(".locks")
    )


async def test_real_fs_fsync_eio(tmp_path: Path) -> None:
    store = await LocalStore.open(tmp_path)
    v_old = await store.put_atomic(KEY, b"old")
    with mock.patch("os.fsync", side_effect=OSError(errno.EIO, "Input/output error")) as m:
        with pytest.raises(StorageUnavailable, match="EIO") as info:
            await store.put_atomic(KEY, b"new")
    assert info.value.key == KEY
    assert m.call_count == 1  # the file fsync failed and was not retried
    assert (tmp_path / KEY).read_bytes() == b"old"
    assert (await store.get(KEY)).version == v_old
    assert _on_disk(tmp_path) == [KEY]
    await store.put_atomic(KEY, b"new")
    assert (tmp_path / KEY).read_bytes() == b"new"


async def test_real_fs_directory_fsync_eio_rolls_back(tmp_path: Path) -> None:
    store = await LocalStore.open(tmp_path)
    await store.put_atomic(KEY, b"old")
    (tmp_path / "leases").mkdir()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    with mock.patch("os.fsync", side_effect=fsync):
        with pytest.raises(StorageUnavailable, match="EIO"):
            await store.put_atomic(KEY, b"new")
        with pytest.raises(StorageUnavailable, match="EIO"):
            await store.delete(KEY)
        with pytest.raises(StorageUnavailable, match="EIO"):
            await store.put_if_match("leases/x", b"me", None)
    assert (tmp_path / KEY).read_bytes() == b"old"
    assert _on_disk(tmp_path) == [KEY]
    assert await store.list() == [KEY]


async def test_real_fs_enospc_on_write(tmp_path: Path) -> None:
    store = await LocalStore.open(tmp_path)
    await store.put_atomic(KEY, b"old")
    with mock.patch("os.write", side_effect=OSError(errno.ENOSPC, "No space left on device")):
        with pytest.raises(StorageUnavailable, match="ENOSPC"):
            await store.put_atomic(KEY, b"new" * 1000)
    assert (tmp_path / KEY).read_bytes() == b"old"
    assert _on_disk(tmp_path) == [KEY]


# -- put_many_atomic: one batch, three keys in one directory ----------------------------------

#: Two existing keys and a new one, all in ``regions``; each name is unique in every path a
#: write touches (its temp and backup are ``regions/.<name>.tmp-…``).
MANY_OLD: dict[str, bytes | None] = {
    "regions/r.0.0.region": b"a-old",
    "regions/r.0.1.region": b"b-old",
    "regions/r.1.0.region": None,
}
MANY_NEW = {key: key.encode() + b"-new" for key in MANY_OLD}
MANY_KEYS = list(MANY_OLD)
NEW_KEY = "regions/r.1.0.region"

# (step, what the fault matches): "regions" matches every item (and the directory); a key's
# file name matches only that item's temp, backup and rename.
MANY_CASES = [
    *[(step, "regions") for step in WRITE_STEPS],
    *[(step, key) for step in ["create", "write", "fsync", "link", "replace"] for key in MANY_KEYS],
]
MANY_CASES.remove(("link", NEW_KEY))  # a new key has no old object to link to a backup


def _affected(step: str, target: str, once: bool) -> set[str]:
    """The keys whose item must fail: a failed directory fsync fails the whole directory; any
    other step fails the item it hits (the first one in order when it hits every item once)."""
    if step == "fsync_dir":
        return set(MANY_KEYS)
    if target != "regions":
        return {target}
    return {MANY_KEYS[0]} if once else set(MANY_KEYS)


async def _many_store(fs: SimulatedFileSystem) -> LocalStore:
    store = await LocalStore.open("/w", fs=fs)
    for key, data in MANY_OLD.items():
        if data is not None:
            await store.put_atomic(key, data)
    return store


async def _assert_many(store: LocalStore, expect: dict[str, bytes | None]) -> None:
    for key, data in expect.items():
        if data is None:
            with pytest.raises(NotFound):
                await store.get(key)
        else:
            blob = await store.get(key)
            assert (blob.data, blob.version) == (data, content_version(data)), key
    assert await store.list() == sorted(k for k, v in expect.items() if v is not None)


@pytest.mark.parametrize("once", [True, False], ids=["once", "persistent"])
@pytest.mark.parametrize("err", ERRNOS, ids=errno.errorcode.get)
@pytest.mark.parametrize(("step", "target"), MANY_CASES)
async def test_put_many_atomic_error_at_each_step(
    step: str, target: str, err: int, once: bool
) -> None:
    fs = SimulatedFileSystem()
    store = await _many_store(fs)
    # A key's file name (not its path) is in its temp's and backup's paths too.
    fs.inject(step, err, path_contains=target.rpartition("/")[2], once=once)
    items = list(MANY_NEW.items())
    results = await store.put_many_atomic(items)
    affected = _affected(step, target, once)
    expect: dict[str, bytes | None] = {}
    for (key, data), res in zip(items, results, strict=True):
        if key in affected:
            assert isinstance(res, StorageUnavailable), (key, res)
            assert res.key == key
            assert errno.errorcode[err] in str(res)
            expect[key] = MANY_OLD[key]
        else:
            assert res == content_version(data), (key, res)
            expect[key] = data
    assert temps(fs) == []
    await _assert_many(store, expect)
    # What the results acknowledged is durable; a failed item left its old content there too.
    await _assert_many(await LocalStore.open("/w", fs=fs.durable_image()), expect)
    if not once:
        again = await store.put_many_atomic(items)
        assert [isinstance(r, StorageUnavailable) for r in again] == [
            k in affected for k, _ in items
        ]
        await _assert_many(store, expect)
    fs.clear_faults()
    reopened = await LocalStore.open("/w", fs=fs)
    assert reopened.removed_temps == 0
    assert temps(fs) == []
    await _assert_many(reopened, expect)
    # The store is still usable: single and batched puts both go through.
    assert await reopened.put_atomic(MANY_KEYS[0], b"later") == content_version(b"later")
    final = [(k, b"final " + k.encode()) for k in MANY_KEYS]
    assert await reopened.put_many_atomic(final) == [content_version(d) for _, d in final]
    await _assert_many(await LocalStore.open("/w", fs=fs.durable_image()), dict(final))


async def test_put_many_atomic_dir_fsync_error_fails_only_that_directory() -> None:
    fs = SimulatedFileSystem()
    store = await _many_store(fs)
    await store.put_atomic("players/p1", b"p-old")
    fs.inject("fsync_dir", errno.EIO, path_contains="players")
    items = [("regions/r.0.0.region", b"a-new"), ("players/p1", b"p-new"), (NEW_KEY, b"c-new")]
    results = await store.put_many_atomic(items)
    assert results[0] == content_version(b"a-new")
    assert isinstance(results[1], StorageUnavailable) and results[1].key == "players/p1"
    assert results[2] == content_version(b"c-new")
    expect: dict[str, bytes | None] = {
        "regions/r.0.0.region": b"a-new",
        "regions/r.0.1.region": b"b-old",
        NEW_KEY: b"c-new",
        "players/p1": b"p-old",
    }
    assert temps(fs) == []
    await _assert_many(store, expect)
    await _assert_many(await LocalStore.open("/w", fs=fs.durable_image()), expect)


async def test_put_many_atomic_temp_left_by_failed_cleanup_is_removed_at_open() -> None:
    fs = SimulatedFileSystem()
    store = await _many_store(fs)
    fs.inject("fsync", errno.EIO, path_contains="r.0.1.region")
    fs.inject("unlink", errno.EIO, path_contains="r.0.1.region", once=False)
    results = await store.put_many_atomic(list(MANY_NEW.items()))
    assert [isinstance(r, StorageUnavailable) for r in results] == [False, True, False]
    assert len(temps(fs)) == 1
    fs.clear_faults()
    reopened = await LocalStore.open("/w", fs=fs)
    assert reopened.removed_temps == 1
    assert temps(fs) == []
    expect: dict[str, bytes | None] = dict(MANY_NEW)
    expect["regions/r.0.1.region"] = MANY_OLD["regions/r.0.1.region"]
    await _assert_many(reopened, expect)


async def test_real_fs_put_many_atomic(tmp_path: Path) -> None:
    store = await LocalStore.open(tmp_path)
    await store.put_atomic(KEY, b"old")
    items = [(KEY, b"r00"), ("regions/r.0.1.region", b"r01"), ("players/p1", b"p1"), ("top", b"t")]
    results = await store.put_many_atomic(items)
    assert results == [content_version(d) for _, d in items]
    assert _on_disk(tmp_path) == sorted(k for k, _ in items)  # no temp, no backup
    for key, data in items:
        assert (tmp_path / key).read_bytes() == data
        assert (await store.get(key)).data == data
    assert await store.list() == sorted(k for k, _ in items)
    assert await store.put_many_atomic([]) == []
    assert _on_disk(tmp_path) == sorted(k for k, _ in items)


@pytest.mark.parametrize(
    "bad",
    [
        [("regions/new", b"x"), ("players/p", b"y"), ("regions/new", b"z")],
        [("regions/new", b"x"), ("../escape", b"y")],
        [("regions/new", b"x"), ("regions/.r.tmp-0123456789ab", b"y")],
        [("regions/new", b"x"), (".locks/00", b"y")],
        [("regions/new", b"x"), ("", b"y")],
    ],
    ids=["duplicate", "dotdot", "temp-name", "reserved", "empty"],
)
async def test_real_fs_put_many_atomic_refuses_bad_batches(
    tmp_path: Path, bad: list[tuple[str, bytes]]
) -> None:
    store = await LocalStore.open(tmp_path)
    await store.put_atomic(KEY, b"old")
    keys = [k for k, _ in bad]
    expected = ValueError if len(set(keys)) != len(keys) else InvalidKey
    with pytest.raises(expected):
        await store.put_many_atomic(bad)
    assert _on_disk(tmp_path) == [KEY]  # nothing written, not even the valid items
    assert not (tmp_path / "regions" / "new").exists()
    assert not (tmp_path / "players").exists()
    assert (tmp_path / KEY).read_bytes() == b"old"


async def test_real_fs_put_many_atomic_fails_a_symlinked_item_alone(tmp_path: Path) -> None:
    """An item whose directory is a symlink out of the root fails with InvalidKey; the other
    items of the batch are written, and no temp is left anywhere."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    store = await LocalStore.open(root)
    await store.put_atomic("regions/a", b"old-a")
    os.symlink(outside, root / "evil")
    results = await store.put_many_atomic(
        [("regions/a", b"new-a"), ("evil/b", b"escape"), ("regions/c", b"new-c")]
    )
    assert isinstance(results[1], InvalidKey) and "symlink" in str(results[1])
    assert [results[0], results[2]] == [content_version(b"new-a"), content_version(b"new-c")]
    assert (root / "regions" / "a").read_bytes() == b"new-a"
    assert (root / "regions" / "c").read_bytes() == b"new-c"
    assert list(outside.iterdir()) == []
    assert not [p for p in root.rglob("*") if is_temp_name(p.name)]


async def test_put_many_atomic_dir_fsync_refusing_the_path_rolls_that_directory_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A directory swapped for an escaping symlink between the renames and the directory
    fsync makes ``fsync_dir`` raise ``InvalidKey``: that directory's items fail with it and
    are rolled back, the other directories' items still commit."""
    fs = SimulatedFileSystem()
    store = await _many_store(fs)
    await store.put_atomic("players/p1", b"p-old")
    orig = LocalStore._sync_dir

    def sync_dir(self: LocalStore, path: str) -> None:
        if path == "players":
            raise InvalidKey("path escapes the store through a symlink", key=path)
        orig(self, path)

    monkeypatch.setattr(LocalStore, "_sync_dir", sync_dir)
    items = [("regions/r.0.0.region", b"a-new"), ("players/p1", b"p-new")]
    results = await store.put_many_atomic(items)
    assert results[0] == content_version(b"a-new")
    assert isinstance(results[1], InvalidKey)
    assert temps(fs) == []
    monkeypatch.undo()
    expect: dict[str, bytes | None] = {
        "regions/r.0.0.region": b"a-new",
        "regions/r.0.1.region": b"b-old",
        NEW_KEY: None,
        "players/p1": b"p-old",
    }
    await _assert_many(store, expect)
    await _assert_many(await LocalStore.open("/w", fs=fs.durable_image()), expect)


async def test_put_many_atomic_on_a_closed_store_writes_nothing() -> None:
    fs = SimulatedFileSystem()
    store = await _many_store(fs)
    assert await store.put_many_atomic([]) == []
    await store.aclose()
    with pytest.raises(StorageUnavailable):
        await store.put_many_atomic([("regions/r.0.0.region", b"x")])
    assert await store.put_many_atomic([]) == []  # nothing to write, as get_many([])
    expect = dict(MANY_OLD)
    await _assert_many(await LocalStore.open("/w", fs=fs.durable_image()), expect)


class _RollbackFails(SimulatedFileSystem):
    """Once armed, a directory fsync fails with EIO, and so does every replace or unlink
    after it (the rollback's)."""

    armed = False
    dir_failed = False

    def fsync_dir(self, path: str) -> None:
        if self.armed:
            self.dir_failed = True
            raise OSError(errno.EIO, "Input/output error")
        super().fsync_dir(path)

    def replace(self, src: str, dst: str) -> None:
        if self.dir_failed:
            raise OSError(errno.EIO, "Input/output error")
        super().replace(src, dst)

    def unlink(self, path: str) -> None:
        if self.dir_failed:
            raise OSError(errno.EIO, "Input/output error")
        super().unlink(path)


@pytest.mark.parametrize("existed", [True, False], ids=["replacing", "creating"])
async def test_a_rollback_that_fails_is_logged_and_the_write_still_fails(
    existed: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The directory fsync fails and so does putting the old object (or its absence) back:
    the write raises the fsync's error as always, and the operator is told which key now
    shows a version that may not be durable."""
    fs = _RollbackFails()
    store = await LocalStore.open("/w", fs=fs)
    if existed:
        await store.put_atomic(KEY, b"old")
    fs.armed = True
    with pytest.raises(StorageUnavailable, match="EIO") as info:
        await store.put_atomic(KEY, b"new")
    assert info.value.key == KEY
    msgs = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any(KEY in m and "previous version back" in m for m in msgs), msgs


# -- put_many_atomic: every temp's writeback starts before the first fsync waits ------------


class _OrderFS(SimulatedFileSystem):
    """Records create/write/start_writeback/fsync/close in call order, with open handles."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.open_now = 0
        self.most_open = 0

    def create(self, path: str) -> int:
        h = super().create(path)
        if is_temp_name(path.rpartition("/")[2]):
            self.calls.append("create")
            self.open_now += 1
            self.most_open = max(self.most_open, self.open_now)
        return h

    def write(self, handle: int, data: bytes | memoryview) -> None:
        self.calls.append("write")
        super().write(handle, data)

    def start_writeback(self, handle: int) -> None:
        self.calls.append("hint")
        super().start_writeback(handle)

    def fsync(self, handle: int) -> None:
        self.calls.append("fsync")
        super().fsync(handle)

    def close(self, handle: int) -> None:
        self.open_now -= 1
        super().close(handle)


async def test_put_many_atomic_starts_every_writeback_before_the_first_fsync() -> None:
    fs = _OrderFS()
    store = await LocalStore.open("/w", fs=fs)
    items = [(f"regions/r.{i}.0.region", b"x%d" % i) for i in range(5)]
    fs.calls.clear()
    assert await store.put_many_atomic(items) == [content_version(d) for _, d in items]
    assert fs.calls == ["create", "write", "hint"] * 5 + ["fsync"] * 5
    await _assert_many(await LocalStore.open("/w", fs=fs.durable_image()), dict(items))


async def test_put_many_atomic_bounds_the_temps_open_at_once() -> None:
    fs = _OrderFS()
    store = await LocalStore.open("/w", fs=fs)
    items = [(f"regions/r.{i}.0.region", b"y%d" % i) for i in range(150)]
    assert await store.put_many_atomic(items) == [content_version(d) for _, d in items]
    assert fs.most_open == 64  # _TEMPS_IN_FLIGHT: 150 items go in three groups
    assert fs.open_now == 0
    assert fs.calls.count("fsync") == 150 and temps(fs) == []


async def test_put_many_atomic_without_fsync_gives_no_writeback_hint() -> None:
    fs = _OrderFS()
    store = await LocalStore.open("/w", fs=fs, fsync=False)
    fs.calls.clear()
    await store.put_many_atomic([("regions/a", b"1"), ("regions/b", b"2")])
    assert fs.calls == ["create", "write"] * 2


@pytest.mark.parametrize("kind", ["simulated", "os"])
def test_start_writeback_is_a_hint_that_never_raises(kind: str, tmp_path: Path) -> None:
    fs: SimulatedFileSystem | OsFileSystem = (
        SimulatedFileSystem() if kind == "simulated" else OsFileSystem(tmp_path)
    )
    fs.makedirs("d")
    h = fs.create("d/f")
    fs.write(h, b"data")
    fs.start_writeback(h)
    fs.fsync(h)
    fs.close(h)
    fs.start_writeback(h)  # closed: the real call fails with EBADF, which a hint swallows
    fs.start_writeback(-1)
    assert fs.read("d/f") == b"data"


def test_sync_file_range_is_bound_on_linux() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("sync_file_range is Linux's")
    assert fs_module._sync_file_range is not None  # else the hint silently does nothing
