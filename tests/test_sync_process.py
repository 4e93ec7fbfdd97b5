"""The journal's sync process: commits written and synced off this process's GIL."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio
import pytest

from streamer import StorageUnavailable, TileSet, open_world
from streamer.config import Config, RuntimeSettings, StorageSettings
from streamer.format.journal import scan_frames
from streamer.runtime import journal as journal_module
from streamer.runtime import sync_process
from streamer.runtime.journal import JOURNAL_DIR, Journal, decode_batch
from streamer.runtime.sync_process import (
    DONE,
    LOST,
    NOT_SENT,
    SYNC_FAILED,
    WRITE_FAILED,
    SyncProcess,
)
from streamer.runtime.world import World
from streamer.storage.local import LocalStore
from streamer.worlddir import create_world

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


async def started() -> SyncProcess:
    proc = await SyncProcess.start()
    assert proc is not None
    return proc


def gone(pid: int) -> bool:
    """The process has exited (gone, or a zombie nobody reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def wait_gone(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if gone(pid):
            return True
        time.sleep(0.02)
    return False


# -- the process on its own ------------------------------------------------------------------


async def test_writes_and_syncs_to_the_descriptor_it_is_handed(tmp_path: Path) -> None:
    proc = await started()
    a = os.open(tmp_path / "a", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    b = os.open(tmp_path / "b", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    owner_a, owner_b = object(), object()
    try:
        assert await proc.write(a, owner_a, b"one,", True) == (DONE, 0)
        assert await proc.write(a, owner_a, b"two,", False) == (DONE, 0)
        # A new owner: the descriptor is handed over again, even under the same number.
        assert await proc.write(b, owner_b, b"three", True) == (DONE, 0)
        assert await proc.write(a, owner_a, b"four", True) == (DONE, 0)
        assert proc.requests == 4 and proc.alive
    finally:
        await proc.aclose()
        os.close(a)
        os.close(b)
    assert (tmp_path / "a").read_bytes() == b"one,two,four"
    assert (tmp_path / "b").read_bytes() == b"three"
    assert gone(proc.pid)


async def test_a_write_larger_than_the_socket_buffer_arrives_whole(tmp_path: Path) -> None:
    proc = await started()
    fd = os.open(tmp_path / "big", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    data = os.urandom(3 * 1024 * 1024 + 17)
    try:
        assert await proc.write(fd, fd, data, True) == (DONE, 0)
        assert await proc.write(fd, fd, b"tail", True) == (DONE, 0)  # still in step
    finally:
        await proc.aclose()
        os.close(fd)
    assert (tmp_path / "big").read_bytes() == data + b"tail"


async def test_a_failed_write_is_reported_with_its_errno(tmp_path: Path) -> None:
    proc = await started()
    (tmp_path / "ro").write_bytes(b"")
    ro = os.open(tmp_path / "ro", os.O_RDONLY)
    ok = os.open(tmp_path / "ok", os.O_WRONLY | os.O_CREAT)
    try:
        assert await proc.write(ro, ro, b"x", True) == (WRITE_FAILED, errno.EBADF)
        assert await proc.write(ok, ok, b"y", True) == (DONE, 0)  # it goes on
    finally:
        await proc.aclose()
        os.close(ro)
        os.close(ok)
    assert (tmp_path / "ok").read_bytes() == b"y"


async def test_a_cancelled_caller_still_gets_the_outcome(tmp_path: Path) -> None:
    proc = await started()
    fd = os.open(tmp_path / "c", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    data = os.urandom(2 * 1024 * 1024)
    try:
        with anyio.CancelScope() as scope:
            scope.cancel()
            outcome = await proc.write(fd, fd, data, True)
        assert outcome == (DONE, 0)
        assert await proc.write(fd, fd, b"!", True) == (DONE, 0)
    finally:
        await proc.aclose()
        os.close(fd)
    assert (tmp_path / "c").read_bytes() == data + b"!"


async def test_a_killed_process_answers_lost_and_is_reaped(tmp_path: Path) -> None:
    proc = await started()
    fd = os.open(tmp_path / "k", os.O_WRONLY | os.O_CREAT)
    try:
        assert await proc.write(fd, fd, b"a", True) == (DONE, 0)
        os.kill(proc.pid, signal.SIGKILL)
        # The loss shows on the next request (not sent), or before it if end of file
        # arrives first.
        for _ in range(200):
            if not proc.alive:
                break
            stage, _ = await proc.write(fd, fd, b"b", True)
            if stage in (LOST, NOT_SENT):
                break
            await anyio.sleep(0.01)
        assert not proc.alive
        assert (await proc.write(fd, fd, b"c", True))[0] == NOT_SENT
    finally:
        await proc.aclose()
        os.close(fd)
    assert gone(proc.pid)


async def test_a_process_lost_in_the_middle_of_a_large_send_answers_lost(
    tmp_path: Path,
) -> None:
    """The child stops reading while a commit larger than the socket's buffer is still being
    sent, and is then given up (as on a reply out of step): the request is answered lost,
    and the send is stopped rather than left watching a closed descriptor whose number the
    next segment may get."""
    proc = await started()
    fd = os.open(tmp_path / "l", os.O_WRONLY | os.O_CREAT)
    try:
        assert await proc.write(fd, fd, b"a", True) == (DONE, 0)
        os.kill(proc.pid, signal.SIGSTOP)
        async with anyio.create_task_group() as tg:
            outcome: list[tuple[int, int]] = []

            async def big() -> None:
                outcome.append(await proc.write(fd, fd, os.urandom(16 * 1024 * 1024), True))

            tg.start_soon(big)
            await anyio.sleep(0.2)  # the socket's buffer is full: the rest waits to be sent
            sending = proc._sending
            assert sending is not None and not sending.done()
            proc._lose("given up by the test")
        assert outcome == [(LOST, errno.EPIPE)]
        assert not proc.alive
        await anyio.sleep(0.05)
        assert sending is not None and sending.done()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        await proc.aclose()
        os.close(fd)
    assert (tmp_path / "l").read_bytes() == b"a"


async def test_a_request_to_a_process_already_gone_is_not_sent(tmp_path: Path) -> None:
    """Dead between two requests, before its end of file is read: the next request fails
    to send at all, which the journal can then write itself (nothing of it was written)."""
    proc = await started()
    fd = os.open(tmp_path / "n", os.O_WRONLY | os.O_CREAT)
    try:
        assert await proc.write(fd, fd, b"a", True) == (DONE, 0)
        os.kill(proc.pid, signal.SIGKILL)
        assert wait_gone(proc.pid)  # blocking: the loop has not read its end of file yet
        alive_before = proc.alive
        assert (await proc.write(fd, fd, b"b", True))[0] == NOT_SENT
        assert alive_before and not proc.alive
        assert (await proc.write(fd, fd, b"c", True))[0] == NOT_SENT
    finally:
        await proc.aclose()
        os.close(fd)
    assert (tmp_path / "n").read_bytes() == b"a"


# -- in a world ------------------------------------------------------------------------------


def cfg(*, sync_process: bool = True, segment_bytes: int = 64 * 1024 * 1024) -> Config:
    return Config(
        runtime=RuntimeSettings(
            flush_interval_ms=60_000,
            journal_sync_process=sync_process,
            journal_segment_bytes=segment_bytes,
        ),
        storage=StorageSettings(fsync=True),
    )


async def new_world(path: Path) -> Path:
    store = await LocalStore.open(path)
    await create_world(store, seed=5)
    return path


def journal_of(world: World) -> Journal:
    journal = world._journal
    assert journal is not None
    return journal


def the_process(world: World) -> SyncProcess:
    proc = journal_of(world)._proc
    assert proc is not None
    return proc


async def segment_open(journal: Journal) -> None:
    """Wait for the journal to have a segment open (its keeper opens one ahead)."""
    with anyio.fail_after(10):
        while journal.stats().segments_opened_ahead == 0 or journal._handle is None:
            await anyio.sleep(0.01)


def journal_ticks(path: Path) -> list[int]:
    """Every tick in the journal's segments, in order."""
    out = []
    for seg in sorted((path / JOURNAL_DIR).glob("*.wal")):
        for payload in scan_frames(seg.read_bytes()).payloads:
            out += [d.tick for d in decode_batch(payload, where=str(seg)).deltas]
    return out


def edit(tick: int) -> list[TileSet]:
    return [TileSet(tick=tick, x=tick % 500, y=0, tile=tick % 60_000)]


async def test_a_world_commits_through_it_and_replays_every_batch(tmp_path: Path) -> None:
    await new_world(tmp_path)
    # Small segments: every rotation hands the process a new descriptor.
    async with open_world(tmp_path, cfg(segment_bytes=4096)) as world:
        pid = the_process(world).pid
        assert world.stats().journal.sync_process_pid == pid
        for tick in range(1, 301):
            await world.submit(edit(tick))
        stats = world.stats().journal
        assert stats.sync_process
        # Each segment's first commit is the thread's (it creates the segment); the rest
        # are the process's.
        assert stats.commits_in_process >= 300 - stats.segments - stats.segments_deleted
        assert stats.commits_in_process > 200
    assert wait_gone(pid)  # closed with the world
    async with open_world(tmp_path, cfg()) as world:
        for tick in (1, 150, 300):
            c = await world.chunk((tick % 500) // 64, 0)
            assert c.tiles[0, (tick % 500) % 64] == tick % 60_000


async def test_turned_off_commits_stay_in_the_thread(tmp_path: Path) -> None:
    await new_world(tmp_path)
    async with open_world(tmp_path, cfg(sync_process=False)) as world:
        await world.submit(edit(1))
        stats = world.stats().journal
        assert not stats.sync_process and stats.commits_in_process == 0
        assert journal_of(world)._proc is None


async def test_without_fsync_there_is_no_process(tmp_path: Path) -> None:
    await new_world(tmp_path)
    config = Config(
        runtime=RuntimeSettings(flush_interval_ms=60_000), storage=StorageSettings(fsync=False)
    )
    async with open_world(tmp_path, config) as world:
        await world.submit(edit(1))
        assert journal_of(world)._proc is None
        assert world.stats().journal.commits_in_process == 0


async def test_a_killed_process_loses_nothing_acknowledged(tmp_path: Path) -> None:
    await new_world(tmp_path)
    acked: list[int] = []
    failed: list[int] = []
    async with open_world(tmp_path, cfg()) as world:
        for tick in range(1, 51):
            await world.submit(edit(tick))
            acked.append(tick)
        pid = the_process(world).pid
        os.kill(pid, signal.SIGKILL)
        assert wait_gone(pid)
        for tick in range(51, 101):
            try:
                await world.submit(edit(tick))
                acked.append(tick)
            except StorageUnavailable as exc:
                assert "sync process was lost" in str(exc)
                failed.append(tick)
        stats = world.stats().journal
        assert not stats.sync_process and stats.sync_process_pid == 0
        assert failed == []  # none was in flight: the next one goes through the thread
        assert stats.sync_process_restarts == 0  # not yet: replaced after a pause (5 s)
        ticks = journal_ticks(tmp_path)  # before the close folds and deletes them
    assert sorted(set(ticks)) == ticks  # each once, in order
    assert set(acked) <= set(ticks)
    assert not set(failed) & set(ticks)  # the failed commit was cut away
    async with open_world(tmp_path, cfg()) as world:
        assert world.stats().journal.sync_process  # a new one with the next open
        c = await world.chunk(0, 0)
        for tick in acked:
            if tick < 64:
                assert c.tiles[0, tick] == tick


@pytest.mark.parametrize(
    ("stage", "err"),
    [(WRITE_FAILED, errno.ENOSPC), (SYNC_FAILED, errno.EIO), (LOST, errno.EPIPE)],
)
async def test_a_failed_commit_fails_its_batch_and_the_next_one_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: int, err: int
) -> None:
    await new_world(tmp_path)
    real_write = SyncProcess.write
    fail_next = [False]

    async def write(
        self: SyncProcess, fd: int, owner: object, data: bytes, sync: bool
    ) -> tuple[int, int]:
        if fail_next[0]:
            fail_next[0] = False
            # As the child would leave it: a partial write, then the failure.
            os.write(fd, data[: len(data) // 2])
            return stage, err
        return await real_write(self, fd, owner, data, sync)

    monkeypatch.setattr(SyncProcess, "write", write)
    async with open_world(tmp_path, cfg()) as world:
        await world.submit(edit(1))
        await world.submit(edit(2))
        fail_next[0] = True
        with pytest.raises(StorageUnavailable, match=os.strerror(err) if stage != LOST else "lost"):
            await world.submit(edit(3))
        await world.submit(edit(4))  # a new segment; the journal goes on
        assert not journal_of(world).broken
        if stage != LOST:
            assert world.stats().journal.sync_process
        assert journal_ticks(tmp_path) == [1, 2, 4]


async def test_a_process_lost_during_a_sync_with_unsynced_acknowledged_bytes_stops_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interval mode: acknowledged bytes are unsynced when a request with a sync is lost. The
    child shares the file: its sync may have seen an error no later sync reports, so the
    journal stops as after a failed sync instead of going on."""
    await new_world(tmp_path)
    real_write = SyncProcess.write
    lose = [False]

    async def write(
        self: SyncProcess, fd: int, owner: object, data: bytes, sync: bool
    ) -> tuple[int, int]:
        if lose[0] and sync:
            return LOST, errno.EPIPE
        return await real_write(self, fd, owner, data, sync)

    monkeypatch.setattr(SyncProcess, "write", write)
    config = Config(
        runtime=RuntimeSettings(
            flush_interval_ms=60_000, durability="interval", fsync_interval_ms=60_000
        ),
        storage=StorageSettings(fsync=True),
    )
    async with open_world(tmp_path, config) as world:
        journal = journal_of(world)
        await world.submit(edit(1))  # acknowledged, written, not synced (interval: 60 s)
        await world.submit(edit(2))
        assert world.stats().journal.unsynced_bytes > 0
        lose[0] = True
        journal._last_sync -= 120  # the interval has passed: the next commit syncs
        with pytest.raises(StorageUnavailable, match="lost during a sync"):
            await world.submit(edit(3))
        assert journal.broken
        with pytest.raises(StorageUnavailable, match="unusable"):
            await world.submit(edit(4))


def _children_running(parent: int, marker: str) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and marker.encode() in cmdline:
            out.append(int(entry.name))
    return out


def test_it_dies_with_the_process_that_opened_the_world(tmp_path: Path) -> None:
    """A SIGKILLed world takes its sync process along: no write of it may land after the
    next process opened the world."""
    anyio.run(new_world, tmp_path)
    script = (
        "import sys, anyio\n"
        "from streamer import open_world, TileSet\n"
        "from tests.test_sync_process import cfg\n"
        "async def main():\n"
        "    async with open_world(sys.argv[1], cfg()) as w:\n"
        "        await w.submit([TileSet(tick=1, x=0, y=0, tile=1)])\n"
        "        print('ready', flush=True)\n"
        "        await anyio.sleep(60)\n"
        "anyio.run(main)\n"
    )
    world = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert world.stdout is not None
        assert world.stdout.readline().strip() == "ready"
        children = _children_running(world.pid, sync_process._CHILD.name)
        assert len(children) == 1
        world.kill()
        world.wait(10)
        assert wait_gone(children[0])
    finally:
        if world.poll() is None:
            world.kill()
            world.wait()
        assert world.stdout is not None
        world.stdout.close()
    assert journal_ticks(tmp_path) == [1]


async def test_a_failed_open_stops_it_before_letting_go_of_the_world(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await new_world(tmp_path)

    async def replay(self: World, batches: object) -> None:
        assert _children_running(os.getpid(), sync_process._CHILD.name)  # it was started
        raise RuntimeError("injected replay failure")

    monkeypatch.setattr(World, "_replay", replay)
    with pytest.raises(RuntimeError, match="injected replay failure"):
        async with open_world(tmp_path, cfg()):
            pass
    assert not [
        pid for pid in _children_running(os.getpid(), sync_process._CHILD.name) if not gone(pid)
    ]


async def test_a_flush_keeps_a_small_passed_segment_open(tmp_path: Path) -> None:
    """Dropping the segment being written to after every flush would cost a record of what
    leaves, an unlink, directory syncs and the next segment's creation, to free a few KiB."""
    await new_world(tmp_path)
    async with open_world(tmp_path, cfg()) as world:
        await world.submit(edit(1))
        await world.flush()
        stats = world.stats().journal
        assert stats.segments == 1 and stats.segments_deleted == 0
        assert stats.segments_opened_ahead == 0
        await world.submit(edit(2))  # into the same segment, by the process
        assert world.stats().journal.commits_in_process == stats.commits_in_process + 1
    assert not list((tmp_path / JOURNAL_DIR).glob("*.wal"))  # the close drops it


async def test_the_next_segment_is_open_before_the_commit_that_needs_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A closed segment (full, or passed and big enough to drop) is followed by one opened
    ahead, so the next commit goes straight to the sync process instead of creating a
    segment itself."""
    await new_world(tmp_path)
    async with open_world(tmp_path, cfg(segment_bytes=4096)) as world:
        journal = journal_of(world)
        tick = 0
        while world.stats().journal.segments < 2:  # the first one filled and rotated
            tick += 1
            await world.submit(edit(tick))
        await segment_open(journal)
        before = world.stats().journal
        await world.submit(edit(tick + 1))
        after = world.stats().journal
        assert after.commits_in_process == before.commits_in_process + 1
        assert after.segments_opened_ahead == before.segments_opened_ahead

        monkeypatch.setattr(Journal, "COLLECT_ACTIVE_BYTES", 1)
        await world.flush()  # all passed, the active one now "big": everything dropped
        await segment_open(journal)
        assert world.stats().journal.segments_opened_ahead == before.segments_opened_ahead + 1
        assert world.stats().journal.segments == 0  # open, empty: not counted
        assert [p.stat().st_size for p in (tmp_path / JOURNAL_DIR).glob("*.wal")] == [0]
        await world.submit(edit(tick + 2))
        assert world.stats().journal.commits_in_process == after.commits_in_process + 1
    # Closing drops the passed segment: a cleanly closed world keeps no journal.
    assert not list((tmp_path / JOURNAL_DIR).glob("*.wal"))
    # An empty newest segment (one a crash left behind) is nothing on replay.
    (tmp_path / JOURNAL_DIR / "00000000000000000099.wal").write_bytes(b"")
    async with open_world(tmp_path, cfg()) as world:
        await world.submit(edit(3_000))
        for t in (1, 2, 3, tick + 2):
            c = await world.chunk(t // 64, 0)
            assert int(c.tiles[0, t % 64]) == t


def test_a_world_run_in_another_thread_gets_its_process_too(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG follows the thread that started the child: a world whose event loop
    runs in a thread of its own keeps its sync process while that thread runs."""
    anyio.run(new_world, tmp_path)
    seen: dict[str, object] = {}

    async def body() -> None:
        async with open_world(tmp_path, cfg()) as world:
            await anyio.sleep(0.3)  # the child has started and set its death signal
            for tick in range(1, 21):
                await world.submit(edit(tick))
            stats = world.stats().journal
            seen["pid"] = stats.sync_process_pid
            seen["in_process"] = stats.commits_in_process
            seen["alive"] = stats.sync_process

    thread = threading.Thread(target=anyio.run, args=(body,))
    thread.start()
    thread.join(60)
    assert not thread.is_alive()
    assert seen["alive"] is True
    assert isinstance(seen["in_process"], int) and seen["in_process"] >= 19
    assert isinstance(seen["pid"], int) and wait_gone(seen["pid"])


async def test_a_lost_process_is_replaced_after_a_pause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "_RESTART_FIRST_S", 0.05)
    await new_world(tmp_path)
    async with open_world(tmp_path, cfg()) as world:
        await world.submit(edit(1))
        first = world.stats().journal.sync_process_pid
        os.kill(first, signal.SIGKILL)
        assert wait_gone(first)
        await world.submit(edit(2))  # through the thread; the loss is noticed
        with anyio.fail_after(10):
            while not world.stats().journal.sync_process:
                await anyio.sleep(0.02)
        stats = world.stats().journal
        assert stats.sync_process_restarts == 1
        assert stats.sync_process_pid not in (0, first)
        await world.submit(edit(3))
        assert world.stats().journal.commits_in_process == stats.commits_in_process + 1
        second = stats.sync_process_pid
    assert wait_gone(second)
    async with open_world(tmp_path, cfg()) as world:
        c = await world.chunk(0, 0)
        assert [int(c.tiles[0, t]) for t in (1, 2, 3)] == [1, 2, 3]
