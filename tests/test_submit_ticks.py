"""A failed batch's ticks stop counting as submitted: ``hwm`` is accepted or pending only."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from streamer import DeltaError, StorageUnavailable, TileSet, open_world
from streamer.runtime.queues import Queued, RegionQueue
from tests.test_submit_moves import CONF, new_world


def test_a_failed_batch_no_longer_raises_hwm() -> None:
    q = RegionQueue((0, 0), lpt=3)
    q.reserve([5, 6])
    q.extend([5, 6], [(0, 0)] * 2, [TileSet(tick=t, x=1, y=1, tile=1) for t in (5, 6)])
    q.settle()  # durable
    q.reserve([10])
    q.settle(failed=True)
    assert q.hwm == 6  # the durable batch's newest tick, not the failed one's
    q.check_ticks([9])
    with pytest.raises(DeltaError, match="below tick 6"):
        q.check_ticks([5])


def test_pending_batches_with_higher_ticks_still_count() -> None:
    q = RegionQueue((0, 0), lpt=3)
    q.reserve([10])
    q.reserve([12])  # appended behind it, in a later group commit
    q.settle(failed=True)
    assert q.hwm == 12
    with pytest.raises(DeltaError, match="below tick 12"):
        q.check_ticks([11])
    q.settle(failed=True)
    assert q.hwm == 3  # nothing above lastProcessedTick was ever accepted
    q.check_ticks([4])


def test_folded_ticks_keep_counting_after_a_failure() -> None:
    q = RegionQueue((0, 0), lpt=0)
    q.reserve([7])
    q.extend([7], [(0, 0)], [TileSet(tick=7, x=1, y=1, tile=1)])
    q.settle()
    items = q.take(7)
    q.folded(items, 7)
    assert not q.entries
    q.reserve([9])
    q.settle(failed=True)
    assert q.hwm == 7
    q.push(Queued(8, (0, 0), TileSet(tick=8, x=1, y=1, tile=1)))  # as replay/recovery queue
    q.hwm = 8
    q.reserve([11])
    q.settle(failed=True)
    assert q.hwm == 8


async def test_after_a_failed_batch_a_lower_tick_is_accepted(tmp_path: Path) -> None:
    """The reviewer's scenario: a batch at tick 10 fails (EIO); tick 9 was refused as
    "below tick 10 already submitted" though tick 10 was never accepted."""
    fs = await new_world(tmp_path)
    async with open_world(tmp_path, CONF, fs=fs) as world:
        await world.submit([TileSet(tick=5, x=1, y=1, tile=1)])
        fs.inject("write", errno.EIO, path_contains="journal/")
        with pytest.raises(StorageUnavailable):
            await world.submit([TileSet(tick=10, x=1, y=1, tile=2)])
        await world.submit([TileSet(tick=9, x=1, y=1, tile=3)])
        with pytest.raises(DeltaError, match="below tick 9"):
            await world.submit([TileSet(tick=8, x=1, y=1, tile=4)])
        assert int((await world.chunk(0, 0)).tiles[1, 1]) == 3


def test_a_batch_withdrawn_from_the_middle_releases_only_its_own_reservation() -> None:
    """``Journal.withdraw`` fails a batch behind others still on their way; releasing the
    oldest reservation instead would let a flush seal an in-flight batch's tick."""
    q = RegionQueue((0, 0), lpt=3)
    q.reserve([10], seq=1)  # its dependency, failing
    q.reserve([10], seq=2)  # unrelated, still on its way to the journal
    q.reserve([11], seq=3)  # withdrawn
    q.settle(failed=True, seq=1)
    q.settle(failed=True, seq=3)
    assert [p.seq for p in q.pending] == [2] and q.pending_count == 1
    assert q.hwm == 10
    # Nothing at or above the in-flight batch's tick may be sealed by a full flush.
    q.extend([9], [(0, 0)], [TileSet(tick=9, x=1, y=1, tile=1)])
    cutoff = q.cutoff(full=True, idle_s=0, now=0)
    assert cutoff is None or cutoff < 10
    q.settle(seq=2)
    assert not q.pending and q.pending_count == 0
