"""Crash-point enumeration for LocalStore on the simulated file system.

A workload of puts, compare-and-swaps, deletes and copies runs once to count its mutating
file-system operations (N). Then for every k in 0..N it runs again on a fresh
SimulatedFileSystem that loses power before operation k+1, takes the durable image (what a
reboot would find), opens a LocalStore on it and checks every key:

- it reads as its last acknowledged content, or as the content of the one operation that was
  in flight when the power went (acknowledged deletes stay deleted);
- nothing else is listed and no temp file survives ``open``.

The same enumeration must find violations when the writer skips its file fsync or its
directory fsync: that is the proof the checker can see the bugs it is meant to exclude.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from streamer.errors import NotFound, PreconditionFailed
from streamer.storage.faultfs import SimulatedCrash, SimulatedFileSystem
from streamer.storage.fs import is_temp_name
from streamer.storage.local import LocalStore, content_version

# Steps: ("put", key, data) | ("cas", key, data, mode) with mode "match" | "create" | "stale"
# | ("delete", key) | ("copy", src, dst). The expected outcome (success or
# PreconditionFailed) follows from the model, so a wrong one is a test failure, not noise.
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


@dataclass
class Run:
    acked: dict[str, bytes | None] = field(default_factory=dict)
    in_flight: tuple[str, bytes | None] | None = None
    crashed: bool = False


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


async def run_workload(store: LocalStore, steps: list[Step]) -> Run:
    run = Run()
    stale: dict[str, str] = {}  # a version each key had before its latest write
    for step in steps:
        key, after, ok = _outcome(run.acked, step)
        run.in_flight = (key, after)
        try:
            kind = step[0]
            if kind == "put":
                await store.put_atomic(key, step[2].encode())
            elif kind == "delete":
                await store.delete(key)
            elif kind == "copy":
                await store.copy(step[1], key)
            else:
                mode, current = step[3], run.acked.get(key)
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
        except SimulatedCrash:
            run.crashed = True
            return run
        before = run.acked.get(key)
        if before is not None and before != after:
            stale[key] = content_version(before)
        run.acked[key] = after
        run.in_flight = None
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
        if run.in_flight is not None and run.in_flight[0] == key:
            allowed.add(run.in_flight[1])
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
    keys = {s[1] for s in steps} | {s[2] for s in steps if s[0] == "copy"}

    async def attempt(fs: SimulatedFileSystem) -> Run:
        try:
            store = await store_cls.open("/world", fs=fs)
        except SimulatedCrash:
            return Run(crashed=True)
        return await run_workload(store, steps)

    clean = SimulatedFileSystem()
    clean_run = await attempt(clean)
    assert not clean_run.crashed and clean_run.in_flight is None
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
    keys = {s[1] for s in steps} | {s[2] for s in steps if s[0] == "copy"}
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
