"""``QueuedEntries``: the segmented FIFO behind every region queue, against a plain list.

A flush takes a prefix (``take_while_le``), checks it (``is_prefix``, indexing from either
end) and drops it; these must agree with the list they stand for for every shape of
segments, including a cutoff inside a segment and ticks repeated across segments.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamer import TileSet
from streamer.runtime.queues import Queued, QueuedEntries


def build(segment_ticks: list[list[int]]) -> tuple[QueuedEntries, list[Queued]]:
    fifo = QueuedEntries()
    flat: list[Queued] = []
    for i, ticks in enumerate(segment_ticks):
        seg = tuple(
            Queued(t, (i, j), TileSet(tick=t, x=j, y=i, tile=1)) for j, t in enumerate(ticks)
        )
        fifo.extend_segment(seg)
        flat.extend(seg)
    return fifo, flat


@st.composite
def segmented(draw: st.DrawFn) -> list[list[int]]:
    """Non-decreasing ticks cut into segments of 1-8 entries (as batches push them)."""
    steps = draw(st.lists(st.integers(0, 2), min_size=0, max_size=60))
    ticks, t = [], 0
    for s in steps:
        t += s
        ticks.append(t)
    out, i = [], 0
    while i < len(ticks):
        n = draw(st.integers(1, 8))
        out.append(ticks[i : i + n])
        i += n
    return out


@settings(max_examples=300, deadline=None)
@given(segs=segmented(), cutoff=st.integers(-1, 130))
def test_take_while_le_is_the_list_prefix(segs: list[list[int]], cutoff: int) -> None:
    fifo, flat = build(segs)
    taken = fifo.take_while_le(cutoff)
    want = [q for q in flat if q.tick <= cutoff]
    assert list(taken) == want
    assert len(taken) == len(want)
    assert all(a is b for a, b in zip(taken, want, strict=True))  # shared, not copied
    assert fifo.is_prefix(taken)
    assert list(fifo) == flat  # taking does not change the queue


@settings(max_examples=300, deadline=None)
@given(segs=segmented(), data=st.data())
def test_indexing_and_drop_prefix_match_the_list(
    segs: list[list[int]], data: st.DataObject
) -> None:
    fifo, flat = build(segs)
    for i in range(-len(flat), len(flat)):
        assert fifo[i] is flat[i]
    for bad in (len(flat), -len(flat) - 1):
        with pytest.raises(IndexError):
            fifo[bad]
    n = data.draw(st.integers(0, len(flat)))
    fifo.drop_prefix(n)
    assert list(fifo) == flat[n:] and len(fifo) == len(flat) - n


def test_is_prefix_refuses_other_entries() -> None:
    fifo, flat = build([[1, 2], [2, 3], [4]])
    other, _ = build([[1, 2], [2, 3]])
    assert not fifo.is_prefix(other)  # same ticks, different entries
    assert fifo.is_prefix(fifo.take_while_le(3))
    assert not fifo.is_prefix(QueuedEntries(flat[1:3]))
