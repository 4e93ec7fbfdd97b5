"""Crash-point enumeration for LocalStore on the simulated file system.

A workload of puts, compare-and-swaps, deletes, copies and batched puts (``put_many_atomic``)
runs once to count its mutating file-system operations (N). Then for every k in 0..N it runs
again on a fresh SimulatedFileSystem that loses power before operation k+1, takes the durable
image (what a reboot would find), opens a LocalStore on it and checks every key:

- it reads as its last acknowledged content, or as the content of the one operation that was
  in flight when the power went (acknowledged deletes stay deleted); a batched put in flight
  lets each of its keys read as old or new independently of the others;
- nothing else is listed and no temp file survives ``open``.

The same enumeration must find violations when the writer skips its file fsync or its
directory fsync: that is the proof the checker can see the bugs it is meant to exclude.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from streamer.errors import NotFound, PreconditionFailed, StorageError
from streamer.storage.faultfs import Op, SimulatedCrash, SimulatedFileSystem
from streamer.storage.fs import is_temp_name
from streamer.storage.local import LocalStore, content_version

# Steps: ("put", key, data) | ("cas", key, data, mode) with mode "match" | "create" | "stale"
# | ("delete", key) | ("copy", src, dst) | ("putmany", key1, data1, key2, data2, ...). The
# expected outcome (success or PreconditionFailed) follows from the model, so a wrong one is a
# test failure, not noise.
Step = tuple[str, ...]

WORKLOAD: list[Step] = [
    ("put", "world.json", "w1"),
    ("put", "regions/r.0.0.region", "a1"),
    ("put", "regions/r.0.1.region", "b1"),
    ("cas", "regions/r.0.0.region", "a2", "match"),
    ("cas", "leases/r.0.0", "L1", "create"),
    ("cas", "leases/r.0.0", "L2", "create"),  # exists: refused
    ("copy", "regions/r.0.0.region", "snapshots/1/r.0.0.region"),
    ("put", "regions/r.0.0.region", "a3"),
    ("delete", "regions/r.0.1.region"),
    ("cas", "regions/r.0.0.region", "a4", "stale"),  # refused
    ("copy", "snapshots/1/r.0.0.region", "regions/r.0.1.region"),
    ("delete", "world.json"),
    ("put", "world.json", "w2"),
    ("cas", "leases/r.0.0", "L3", "match"),
    ("delete", "never/existed"),
    ("copy", "regions/r.0.0.region", "snapshots/1/r.0.0.region"),
    ("delete", "leases/r.0.0"),
    ("cas", "leases/r.0.0", "L4", "create"),
]


# Batched puts over one directory, two directories (and the root), new and existing keys,
# a key deleted and re-created by a batch, a brand-new directory made inside a batch, with
# ordinary puts, compare-and-swaps, deletes and copies around them.
MANY_WORKLOAD: list[Step] = [
    ("put", "world.json", "w1"),
    ("put", "regions/r.0.0.region", "a1"),
    ("put", "regions/r.0.1.region", "b1"),
    # one directory: two existing keys and a new one
    ("putmany", "regions/r.0.0.region", "a2", "regions/r.1.0.region", "c1",
     "regions/r.0.1.region", "b2"),
    ("delete", "regions/r.0.1.region"),
    # two directories, one of them new: a deleted key comes back, a new directory is made
    ("putmany", "regions/r.0.1.region", "b3", "players/p1", "p1", "regions/r.0.0.region", "a3"),
    ("cas", "regions/r.1.0.region", "c2", "match"),
    # the root and two directories; one key rewritten with the content it already has
    ("putmany", "world.json", "w2", "regions/r.1.0.region", "c3", "players/p1", "p1"),
    ("copy", "regions/r.0.0.region", "snapshots/1/r.0.0.region"),
    ("put", "regions/r.0.0.region", "a4"),
    ("delete", "players/p1"),
    ("putmany", "players/p1", "p2", "players/p2", "q1"),
    ("putmany", "regions/r.0.0.region", "a5"),
]  # fmt: skip


@dataclass
class Run:
    acked: dict[str, bytes | None] = field(default_factory=dict)
    #: key -> the content the operation in flight gives it (empty when none is in flight).
    in_flight: dict[str, bytes | None] = field(default_factory=dict)
    crashed: bool = False


def _pairs(step: Step) -> list[tuple[str, bytes]]:
    """The (key, data) items of a ``putmany`` step."""
    assert step[0] == "putmany" and len(step) % 2 == 1 and len(step) > 1, step
    return [(step[i], step[i + 1].encode()) for i in range(1, len(step), 2)]


def _keys(steps: list[Step]) -> set[str]:
    """Every key a workload touches."""
    keys: set[str] = set()
    for s in steps:
        if s[0] == "putmany":
            keys.update(k for k, _ in _pairs(s))
        else:
            keys.add(s[1])
            if s[0] == "copy":
                keys.add(s[2])
    return keys


def _effects(acked: dict[str, bytes | None], step: Step) -> tuple[dict[str, bytes | None], bool]:
    """(key -> its content once the step succeeds, whether it succeeds)."""
    if step[0] == "putmany":
        return dict(_pairs(step)), True
    key, after, ok = _outcome(acked, step)
    return {key: after}, ok


def _outcome(acked: dict[str, bytes | None], step: Step) -> tuple[str, bytes | None, bool]:
    """(key the step writes, its content afterwards, whether it succeeds)."""
    kind, key = step[0], step[1]
    if kind == "put":
        return key, step[2].encode(), True
    if kind == "delete":
        return key, None, True
    if kind == "copy":
        return step[2], acked.get(key), True
    data, mode = step[2].encode(), step[3]
    current = acked.get(key)
    ok = (mode == "create" and current is None) or (mode == "match" and current is not None)
    return key, data if ok else current, ok


async def _run_single(
    store: LocalStore,
    step: Step,
    key: str,
    ok: bool,
    current: bytes | None,
    stale: dict[str, str],
) -> None:
    """One single-key step; ``current`` is the key's acknowledged content before it."""
    kind = step[0]
    if kind == "put":
        await store.put_atomic(key, step[2].encode())
    elif kind == "delete":
        await store.delete(key)
    elif kind == "copy":
        await store.copy(step[1], key)
    else:
        mode = step[3]
        if mode == "create":
            version = None
        elif mode == "match":
            version = "0" * 16 if current is None else content_version(current)
        else:
            version = stale.get(key, "0" * 16)
            if current is not None and version == content_version(current):
                version = "0" * 16  # old content came back: that version is live
        try:
            await store.put_if_match(key, step[2].encode(), version)
            assert ok, f"{step} should have been refused"
        except PreconditionFailed:
            assert not ok, f"{step} should have succeeded"


async def run_workload(store: LocalStore, steps: list[Step]) -> Run:
    run = Run()
    stale: dict[str, str] = {}  # a version each key had before its latest write
    for step in steps:
        effects, ok = _effects(run.acked, step)
        run.in_flight = dict(effects)
        acked = dict(effects)  # what this step acknowledges once it returns
        try:
            if step[0] == "putmany":
                items = _pairs(step)
                results = await store.put_many_atomic(items)
                assert len(results) == len(items)
                # The simulated file system without injected faults never fails a write.
                assert all(isinstance(r, str) for r in results), f"{step}: {results}"
                for (k, data), res in zip(items, results, strict=True):
                    assert res == content_version(data), f"{step}: {k} got version {res}"
            else:
                (key,) = effects
                await _run_single(store, step, key, ok, run.acked.get(key), stale)
        except SimulatedCrash:
            run.crashed = True
            return run
        for k, after in acked.items():
            before = run.acked.get(k)
            if before is not None and before != after:
                stale[k] = content_version(before)
            run.acked[k] = after
        run.in_flight = {}
    return run


async def check_image(image: SimulatedFileSystem, run: Run, keys: set[str]) -> list[str]:
    """Every way the store recovered from ``image`` differs from what was acknowledged."""
    return await check_store(await LocalStore.open("/recovered", fs=image), image, run, keys)


async def check_store(
    store: LocalStore, fs: SimulatedFileSystem, run: Run, keys: set[str]
) -> list[str]:
    violations: list[str] = []
    present = []
    for key in sorted(keys):
        allowed = {run.acked.get(key)}
        if key in run.in_flight:
            allowed.add(run.in_flight[key])
        try:
            got: bytes | None = (await store.get(key)).data
        except NotFound:
            got = None
        if got is not None:
            present.append(key)
        if got not in allowed:
            violations.append(f"{key}: read {got!r}, allowed {allowed!r}")
    listed = await store.list()
    if listed != present:
        violations.append(f"list() = {listed}, expected {present}")
    temps = [p for p in fs.tree() if is_temp_name(p.rpartition("/")[2])]
    if temps:
        violations.append(f"temp files survived open: {temps}")
    return violations


@dataclass
class Enumeration:
    ops: int
    states_checked: int
    crashes: int
    bad_points: int
    violations: list[str]


async def enumerate_crashes(
    steps: list[Step], store_cls: type[LocalStore] = LocalStore, *, torn: bool = False
) -> Enumeration:
    keys = _keys(steps)

    async def attempt(fs: SimulatedFileSystem) -> Run:
        try:
            store = await store_cls.open("/world", fs=fs)
        except SimulatedCrash:
            return Run(crashed=True)
        return await run_workload(store, steps)

    clean = SimulatedFileSystem()
    clean_run = await attempt(clean)
    assert not clean_run.crashed and clean_run.in_flight == {}
    total = len(clean.ops)

    states = crashes = bad_points = 0
    violations: list[str] = []
    for k in range(total + 1):
        fs = SimulatedFileSystem()
        fs.crash_after(k)
        run = await attempt(fs)
        assert run.crashed == (k < total), f"crash point {k} of {total}"
        assert fs.crashed == run.crashed
        crashes += run.crashed
        image = fs.durable_image(torn=torn, rng=random.Random(k))
        found = await check_image(image, run, keys)
        states += 1
        if found:
            bad_points += 1
            violations += [f"k={k} ({fs.crashed_op}): {v}" for v in found]
    return Enumeration(total, states, crashes, bad_points, violations)


class SkipsFileFsync(LocalStore):
    def _sync_file(self, handle: int) -> None:
        pass


class SkipsDirFsync(LocalStore):
    def _sync_dir(self, path: str) -> None:
        pass


@pytest.mark.parametrize("torn", [False, True], ids=["clean-cut", "torn"])
async def test_every_crash_point_recovers_acknowledged_state(torn: bool) -> None:
    result = await enumerate_crashes(WORKLOAD, torn=torn)
    assert result.violations == []
    assert result.crashes == result.ops  # one crash point per mutating operation
    assert result.states_checked == result.ops + 1  # plus the run that finished
    assert result.ops > 50


@pytest.mark.parametrize("torn", [False, True], ids=["clean-cut", "torn"])
async def test_checker_catches_a_writer_that_skips_the_file_fsync(torn: bool) -> None:
    result = await enumerate_crashes(WORKLOAD, SkipsFileFsync, torn=torn)
    assert result.bad_points > 0
    assert len(result.violations) > 0
    if not torn:
        # The classic bug: the rename is durable, the data is not -> an empty file.
        assert any("read b''" in v for v in result.violations)


async def test_checker_catches_a_writer_that_skips_the_directory_fsync() -> None:
    result = await enumerate_crashes(WORKLOAD, SkipsDirFsync)
    assert result.bad_points > 0
    assert len(result.violations) > 0


class NoSyncOnOpen(LocalStore):
    def _sync_dir(self, path: str) -> None:
        pass


async def enumerate_kill_then_power_loss(
    steps: list[Step], reopen_cls: type[LocalStore] = LocalStore
) -> tuple[int, list[str]]:
    """Kill the process at every crash point, reopen (the page cache survived, so unsynced
    renames are visible), then lose power. Whatever the reopened store showed must survive:
    ``open`` has to make the visible state durable before anyone builds on it."""
    keys = _keys(steps)
    clean = SimulatedFileSystem()
    await run_workload(await LocalStore.open("/w", fs=clean), steps)
    total = len(clean.ops)
    violations: list[str] = []
    for k in range(total):
        fs = SimulatedFileSystem()
        fs.crash_after(k)
        try:
            run = await run_workload(await LocalStore.open("/w", fs=fs), steps)
        except SimulatedCrash:
            run = Run(crashed=True)
        assert run.crashed
        fs.restart()
        reopened = await reopen_cls.open("/w", fs=fs)
        visible = {b.key: b for b in [await reopened.head(key) for key in await reopened.list()]}
        found = await check_store(reopened, fs, run, keys)  # visible state is a valid one...
        image = fs.durable_image()
        durable = await LocalStore.open("/w", fs=image)
        after = {b.key: b for b in [await durable.head(key) for key in await durable.list()]}
        if after != visible:  # ...and it is exactly what survives the power loss
            found.append(f"visible {sorted(visible)} but durable {sorted(after)}")
        violations += [f"k={k} ({fs.crashed_op}): {v}" for v in found]
    return total, violations


async def test_process_kill_then_power_loss_keeps_what_was_visible() -> None:
    total, violations = await enumerate_kill_then_power_loss(WORKLOAD)
    assert violations == []
    assert total > 50


async def test_checker_catches_an_open_that_does_not_sync_directories() -> None:
    _, violations = await enumerate_kill_then_power_loss(WORKLOAD, NoSyncOnOpen)
    assert len(violations) > 0


def _random_workload(rng: random.Random, length: int) -> list[Step]:
    keys = ["a/1", "a/2", "b/c/3", "top", "b/4"]
    model: dict[str, bytes | None] = {}
    steps: list[Step] = []
    for i in range(length):
        kind = rng.choice(["put", "put", "cas", "cas", "delete", "copy"])
        key = rng.choice(keys)
        data = f"{key}#{i}"
        if kind == "put":
            step: Step = ("put", key, data)
        elif kind == "delete":
            step = ("delete", key)
        elif kind == "copy":
            sources = [k for k, v in model.items() if v is not None]
            if not sources:
                continue
            step = ("copy", rng.choice(sources), key)
        else:
            step = ("cas", key, data, rng.choice(["match", "create", "stale"]))
        k, after, _ = _outcome(model, step)
        model[k] = after
        steps.append(step)
    return steps


async def test_random_workloads_recover(torture: bool) -> None:
    rng = random.Random(20261126)
    total_ops = 0
    for _ in range(25 if torture else 2):
        steps = _random_workload(rng, 40 if torture else 12)
        result = await enumerate_crashes(steps, torn=rng.random() < 0.5)
        assert result.violations == []
        assert result.crashes == result.ops
        total_ops += result.ops
    assert total_ops > 0


# -- batched puts (put_many_atomic) ------------------------------------------------------------


class SyncsOneDirPerBatch(LocalStore):
    """A plausible group-commit bug: one directory fsync per batch, not per directory."""

    _syncs_left: int | None = None

    def _put_many_blocking(self, items: Sequence[tuple[str, bytes]]) -> list[str | StorageError]:
        self._syncs_left = 1
        try:
            return super()._put_many_blocking(items)
        finally:
            self._syncs_left = None

    def _sync_dir(self, path: str) -> None:
        if self._syncs_left is not None:
            if self._syncs_left == 0:
                return
            self._syncs_left -= 1
        super()._sync_dir(path)


def test_many_workload_model() -> None:
    assert sum(s[0] == "putmany" for s in MANY_WORKLOAD) >= 4
    assert _keys(MANY_WORKLOAD) >= {
        "world.json",
        "players/p1",
        "players/p2",
        "regions/r.1.0.region",
    }
    # A putmany step lets each of its keys be old or new: the model sees every key of it.
    effects, ok = _effects({}, MANY_WORKLOAD[3])
    assert ok and effects == {
        "regions/r.0.0.region": b"a2",
        "regions/r.1.0.region": b"c1",
        "regions/r.0.1.region": b"b2",
    }


@pytest.mark.parametrize("torn", [False, True], ids=["clean-cut", "torn"])
async def test_putmany_every_crash_point_recovers_acknowledged_state(torn: bool) -> None:
    result = await enumerate_crashes(MANY_WORKLOAD, torn=torn)
    assert result.violations == []
    assert result.crashes == result.ops
    assert result.states_checked == result.ops + 1
    assert result.ops > 30


@pytest.mark.parametrize("torn", [False, True], ids=["clean-cut", "torn"])
async def test_putmany_checker_catches_a_writer_that_skips_the_file_fsync(torn: bool) -> None:
    result = await enumerate_crashes(MANY_WORKLOAD, SkipsFileFsync, torn=torn)
    assert result.bad_points > 0
    if not torn:
        assert any("read b''" in v for v in result.violations)


async def test_putmany_checker_catches_a_writer_that_skips_the_directory_fsync() -> None:
    result = await enumerate_crashes(MANY_WORKLOAD, SkipsDirFsync)
    assert result.bad_points > 0
    assert len(result.violations) > 0


async def test_putmany_checker_catches_one_directory_fsync_per_batch() -> None:
    result = await enumerate_crashes(MANY_WORKLOAD, SyncsOneDirPerBatch)
    assert result.bad_points > 0
    # The lost writes are the batched ones outside the batch's first directory.
    assert any("players/" in v or "world.json" in v for v in result.violations)


async def test_putmany_process_kill_then_power_loss_keeps_what_was_visible() -> None:
    total, violations = await enumerate_kill_then_power_loss(MANY_WORKLOAD)
    assert violations == []
    assert total > 30


async def test_putmany_kill_checker_catches_an_open_that_does_not_sync_directories() -> None:
    _, violations = await enumerate_kill_then_power_loss(MANY_WORKLOAD, NoSyncOnOpen)
    assert len(violations) > 0


def _dir_fsyncs(ops: list[Op], d: str) -> int:
    return sum(op.name == "fsync_dir" and op.path == d for op in ops)


async def test_putmany_does_one_directory_fsync_per_directory() -> None:
    items = [(f"regions/r.{i}.0.region", f"r{i}".encode()) for i in range(4)]

    async def fresh() -> tuple[SimulatedFileSystem, LocalStore, int]:
        fs = SimulatedFileSystem()
        store = await LocalStore.open("/w", fs=fs)
        await store.put_atomic("regions/r.0.0.region", b"old")  # one replaced, three new
        return fs, store, len(fs.ops)

    fs, store, start = await fresh()
    results = await store.put_many_atomic(items)
    assert results == [content_version(d) for _, d in items]
    batch_ops = fs.ops[start:]
    assert _dir_fsyncs(batch_ops, "regions") == 1
    assert sum(op.name == "fsync_dir" for op in batch_ops) == 1
    # Every temp is durable before the first rename, the directory fsync follows the last
    # rename, and the backup of the replaced key goes only after the directory fsync.
    names = [op.name for op in batch_ops]
    assert names.count("fsync") == 4 and names.count("replace") == 4
    last_fsync = max(i for i, n in enumerate(names) if n == "fsync")
    first_replace = names.index("replace")
    last_replace = max(i for i, n in enumerate(names) if n == "replace")
    assert last_fsync < first_replace
    assert last_replace < names.index("fsync_dir")
    assert names[names.index("fsync_dir") + 1 :] == ["unlink"]
    assert {k: fs.read(k) for k, _ in items} == dict(items)

    fs, store, start = await fresh()
    for key, data in items:
        await store.put_atomic(key, data)
    assert _dir_fsyncs(fs.ops[start:], "regions") == 4

    # Two directories (one new): each fsynced once by the batch itself.
    fs, store, start = await fresh()
    more = [*items, ("players/p1", b"p"), ("players/p2", b"q")]
    assert all(isinstance(r, str) for r in await store.put_many_atomic(more))
    assert _dir_fsyncs(fs.ops[start:], "regions") == 1
    assert _dir_fsyncs(fs.ops[start:], "players") == 1
    assert _dir_fsyncs(fs.ops[start:], "") == 1  # by makedirs: the root gained "players"
