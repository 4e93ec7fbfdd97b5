"""Runtime events: what a shard server must hear about without polling.

::

    async with world.events() as events:
        async for event in events:
            match event:
                case PlayerRelocated(player_id=p, to=(x, y)):
                    tell_client(p, x, y)

Each subscriber gets its own bounded anyio memory stream (``buffer`` events). The runtime
never waits for a subscriber: when a subscriber's buffer is full, its *oldest* event is
dropped to make room and counted in :attr:`EventStream.dropped` (and in the world's stats).
A slow consumer therefore sees the newest events and can tell it missed some; recovery
itself (relocations, restores) never stalls behind it. Everything an event reports is also
durable elsewhere (incident log, ``players.idx``, ``state/inactive.json``), so a dropped
event loses a notification, never state.

A new subscription starts with the events retained so far (the last ``HISTORY`` of them)
unless ``history=False``: regions restored and players relocated while the world was being
opened happen before anyone can subscribe, and must not go unheard.

Streams end (``async for`` stops) when the world closes.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from types import TracebackType
from typing import Literal, TypeAlias

import anyio
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

__all__ = [
    "HISTORY",
    "AnyEvent",
    "Event",
    "EventHub",
    "EventStream",
    "PlayerRelocated",
    "RegionInactiveEvent",
    "RegionRestored",
    "ScrubAlert",
    "SnapshotTaken",
]

log = logging.getLogger(__name__)

#: Events kept for subscribers that arrive later (see the module docstring).
HISTORY = 256
#: Default per-subscriber buffer.
DEFAULT_BUFFER = 256

Region: TypeAlias = tuple[int, int]


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    #: Unix time the runtime emitted the event.
    time: float = msgspec.field(default_factory=time.time)


class RegionRestored(Event, tag="region_restored", frozen=True, kw_only=True):
    """A region file failed verification and the region serves again.

    ``source="snapshot"``: the newest valid snapshot copy was put in place and the journal's
    deltas above its lastProcessedTick re-applied; ``lost`` says what could not be brought
    back. ``source="memory"``: the runtime held the region's verified content and rewrote
    the file from it (nothing lost).
    """

    region: Region
    source: Literal["snapshot", "memory"]
    snapshot: str | None = None
    quarantine: str | None = None
    #: Journaled deltas re-applied on top of the snapshot copy.
    reapplied: int = 0
    lost: str = ""
    incidents: list[str] = msgspec.field(default_factory=list)


class RegionInactiveEvent(Event, tag="region_inactive", frozen=True, kw_only=True):
    """A region was taken out of service: no valid copy of its file exists.

    Its chunks raise ``RegionInactive`` (terrain stays available through
    ``World.terrain``) until ``streamer region rebuild``. Named ``...Event`` so it does not
    clash with the ``RegionInactive`` error.
    """

    region: Region
    reason: str
    quarantine: str | None = None
    incidents: list[str] = msgspec.field(default_factory=list)


class PlayerRelocated(Event, tag="player_relocated", frozen=True, kw_only=True):
    """A player character was moved out of an inactive region (durably, through the journal)."""

    player_id: str
    entity_id: str
    from_region: Region
    #: Last known tile, when the character record could be recovered.
    from_pos: tuple[int, int] | None
    #: The tile it was placed on, and its region.
    to: tuple[int, int]
    to_region: Region
    #: ``region_inactive``; ``record_lost`` is appended when no copy of the character
    #: record survived and a fresh one was created.
    reason: str


class ScrubAlert(Event, tag="scrub_alert", frozen=True, kw_only=True):
    """The background scrubber found a problem (also logged, recorded and counted)."""

    kind: Literal["checksum", "snapshots_below_min", "scrub_error"]
    message: str
    region: Region | None = None
    file: str | None = None
    incident: str | None = None


class SnapshotTaken(Event, tag="snapshot_taken", frozen=True, kw_only=True):
    snapshot: str
    reason: str
    files: int
    bytes: int


AnyEvent: TypeAlias = (
    RegionRestored | RegionInactiveEvent | PlayerRelocated | ScrubAlert | SnapshotTaken
)


class EventStream:
    """One subscription: an async iterator of events and an async context manager.

    Close it (``async with`` or :meth:`aclose`) when done; it also ends by itself when the
    world closes.
    """

    def __init__(
        self,
        hub: EventHub,
        send: MemoryObjectSendStream[AnyEvent],
        receive: MemoryObjectReceiveStream[AnyEvent],
    ) -> None:
        self._hub = hub
        self._send = send
        self._receive = receive
        # A second handle on the same buffer: the hub pops the oldest event through it.
        self._evict = receive.clone()
        self.dropped = 0

    def _offer(self, event: AnyEvent) -> None:
        try:
            self._send.send_nowait(event)
            return
        except anyio.WouldBlock:
            pass
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            self._hub._discard(self)
            return
        try:
            self._evict.receive_nowait()
        except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
            pass
        self.dropped += 1
        self._hub.dropped += 1
        try:
            self._send.send_nowait(event)
        except (anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass

    async def receive(self) -> AnyEvent:
        """The next event.

        :raises anyio.EndOfStream: the world closed and every buffered event was received.
        :raises anyio.ClosedResourceError: this stream was closed.
        """
        return await self._receive.receive()

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> AnyEvent:
        try:
            return await self._receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            self._close_all()
            raise StopAsyncIteration from None

    def _end(self) -> None:
        """The world closed: no more events; what is buffered can still be received."""
        self._send.close()
        self._evict.close()

    def _close_all(self) -> None:
        self._send.close()
        self._evict.close()
        self._receive.close()
        self._hub._discard(self)

    async def aclose(self) -> None:
        self._close_all()

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._close_all()


class EventHub:
    """Fans events out to every subscriber without ever blocking the emitter."""

    def __init__(self, history: int = HISTORY) -> None:
        self._subscribers: list[EventStream] = []
        self._history: deque[AnyEvent] = deque(maxlen=history)
        self._closed = False
        #: Events dropped across all subscribers (oldest-first eviction).
        self.dropped = 0
        self.emitted = 0

    def emit(self, event: AnyEvent) -> None:
        self.emitted += 1
        self._history.append(event)
        for sub in list(self._subscribers):
            sub._offer(event)

    def subscribe(self, *, buffer: int = DEFAULT_BUFFER, history: bool = True) -> EventStream:
        if buffer < 1:
            raise ValueError(f"buffer must be >= 1, got {buffer}")
        send, receive = anyio.create_memory_object_stream[AnyEvent](buffer)
        sub = EventStream(self, send, receive)
        if history:
            for event in self._history:
                sub._offer(event)
        if self._closed:
            sub._end()
        else:
            self._subscribers.append(sub)
        return sub

    def _discard(self, sub: EventStream) -> None:
        if sub in self._subscribers:
            self._subscribers.remove(sub)

    def close(self) -> None:
        self._closed = True
        subs, self._subscribers = self._subscribers, []
        for sub in subs:
            sub._end()

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)
