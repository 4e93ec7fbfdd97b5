"""The write path of :class:`~streamer.runtime.world.World`: ``submit`` and what it rests on.

``submit`` validates the whole batch (types, bounds, ticks), turns an ``EntityMove`` into
remove + upsert carrying the character as it lands, routes every delta to its region and
chunk, and appends ONE journal frame for the batch (group commit).

A move is resolved against the overlay first (entities changed by batches accepted but
not yet durable), so a shard server may pipeline submits without awaiting each. A batch
resolved against another's pending change depends on it: if that batch fails, the
dependent is withdrawn from the journal's queue before it is written and fails too, naming
it. Before, a later group commit wrote it anyway, and the entity existed though its creator
was told it was never created. (Waiting for the batch to settle instead let later submits
overtake the move, which was then refused for going backwards in ticks.)

The journal's hooks land here too: ``_on_durable`` — running in journal order — appends the
deltas to their region queues and applies them to cached chunks; ``_on_failed`` releases
what a failed batch reserved. Both wake the submits waiting for those batches.

``_SubmitPath`` is a mixin of ``World``; the world state it uses is declared below and set up
in ``World.__init__`` (``_dependents`` on first use).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TypeAlias, cast

import anyio
import msgspec

from streamer.coords import CHUNK_SIZE, chunk_of, region_of_chunk
from streamer.errors import DeltaError, RegionInactive, StorageUnavailable
from streamer.runtime.cache import ChunkCache
from streamer.runtime.chunk import ChunkKey
from streamer.runtime.journal import (
    JOURNAL_DIR,
    Journal,
    JournalBatch,
    RegionTicks,
    encode_batch_raw,
)
from streamer.runtime.loader import ChunkLoader
from streamer.runtime.players import PlayerIndex
from streamer.runtime.queues import ChunkDelta, DeltaQueues, RegionKey
from streamer.runtime.regionstate import apply_to_chunk
from streamer.schema.deltas import (
    RECORD_FIELDS,
    AnyDelta,
    Delta,
    EntityMove,
    EntityRemove,
    EntityUpsert,
    FeatureAdd,
    FeatureRemove,
    SocietyUpdate,
    StructureRemove,
    StructureUpsert,
    TileSet,
)
from streamer.schema.records import CURRENT_VERSIONS, Character, Record

log = logging.getLogger(__name__)

_I32 = 1 << 31
#: Direct ``chunk()`` calls go ahead of every interest prefetch (priorities are >= 0).
_DIRECT_PRIORITY = -1

_DELTA_TYPES = (
    TileSet,
    EntityUpsert,
    EntityRemove,
    EntityMove,
    FeatureAdd,
    FeatureRemove,
    StructureUpsert,
    StructureRemove,
    SocietyUpdate,
)
_DELTA_TYPE_SET = frozenset(_DELTA_TYPES)
#: Exact delta types that involve no entity: a batch of only these needs no move resolution,
#: no entity overlay and no player index, so it is routed once, before the journal.
_PLAIN_TYPES = frozenset(
    {TileSet, FeatureAdd, FeatureRemove, StructureUpsert, StructureRemove, SocietyUpdate}
)
_TILES_ONLY = frozenset({TileSet})
#: Delta type → (field, exact record type, its tag, the only schemaVersion accepted). The
#: record goes into a chunk as it is, so it must be what this code writes: an older version
#: in today's shape would be "migrated" again when the chunk is next read and fail there, and
#: a newer one makes the whole region refuse to load, taking its valid edits with it.
_RECORD_FIELDS: dict[type, tuple[str, type[Record], str, int]] = {
    delta: (field, rec, tag, CURRENT_VERSIONS[tag])
    for delta, (field, rec) in RECORD_FIELDS.items()
    for tag in (str(rec.__struct_config__.tag),)
}
_CHUNK_SHIFT = CHUNK_SIZE.bit_length() - 1
assert 1 << _CHUNK_SHIFT == CHUNK_SIZE  # x >> shift is x // CHUNK_SIZE, negatives included
#: Distinct chunk keys ``_route_batch`` shares before it starts over.
_CHUNK_KEYS_MAX = 1 << 16
_BATCH_DECODER = msgspec.msgpack.Decoder(list[AnyDelta])
_BATCH_ENCODER = msgspec.msgpack.Encoder()


class _Part:
    """The deltas of one batch for one region, in batch order, with their ticks and chunks."""

    __slots__ = ("chunks", "deltas", "ticks")

    def __init__(self, ticks: list[int], chunks: list[ChunkKey], deltas: list[ChunkDelta]) -> None:
        self.ticks = ticks
        self.chunks = chunks
        self.deltas = deltas


#: A batch routed once (at submit): its parts per region, in order of first appearance.
_Routed: TypeAlias = dict[RegionKey, _Part]


def _delta_point(d: ChunkDelta) -> tuple[int, int]:
    if type(d) is TileSet:
        return d.x, d.y
    match d:
        case TileSet(x=x, y=y) | EntityRemove(x=x, y=y) | FeatureRemove(x=x, y=y):
            return x, y
        case StructureRemove(x=x, y=y):
            return x, y
        case EntityUpsert(character=c):
            return c.x, c.y
        case FeatureAdd(feature=f):
            return f.x, f.y
        case StructureUpsert(structure=s):
            return s.x, s.y
        case SocietyUpdate(society=s):
            return s.x, s.y
    raise DeltaError(f"not a single-chunk delta: {d!r}")


def _check_record(d: AnyDelta, spec: tuple[str, type[Record], str, int], what: str) -> None:
    """Refuse a record that is not exactly what this code writes: its exact type (so its
    ``type`` tag) and the current ``schemaVersion`` of that type.

    :raises DeltaError: names the delta (``what``), the record's id, type and version.
    """
    field, rec_type, tag, current = spec
    rec = getattr(d, field)
    if type(rec) is not rec_type:
        # A subclass (even one with the same tag) would be journaled and replayed as the base
        # type but held in memory as itself until then.
        raise DeltaError(
            f"{what}: {field} must be exactly a {rec_type.__name__} record (type {tag!r}), "
            f"got {type(rec).__name__}"
        )
    version = rec.schemaVersion
    if type(version) is not int or version != current:
        raise DeltaError(
            f"{what}: {tag} record {getattr(rec, 'id', None)!r} has schemaVersion {version!r}; "
            f"this server accepts only schemaVersion {current} for type {tag!r} (records are "
            "never migrated on submit: build it at the current version)"
        )


class _SubmitPath:
    """``World``'s write path: submit, validation, routing, move expansion, the entity overlay
    and the journal's durable/failed hooks."""

    # World state, set up in ``World.__init__``.
    _journal: Journal | None
    _queues: DeltaQueues
    _cache: ChunkCache
    _loader: ChunkLoader
    _players: PlayerIndex
    _inactive: set[RegionKey]
    _overlay: dict[str, tuple[int, Character | None]]
    _routing: dict[int, tuple[_Routed, bool]]
    _chunk_keys: dict[ChunkKey, ChunkKey]
    #: Batch seq → batches whose moves were resolved against its pending changes (they
    #: must not be written if it fails); made on first use.
    _dependents: dict[int, set[int]] | None = None
    _flush_wake: anyio.Event
    _region_size: int
    _bound: int
    # World methods.
    _check_open: Callable[[], None]
    _ensure_regions: Callable[[Iterable[RegionKey]], Awaitable[dict[RegionKey, Exception]]]

    # -- routing --------------------------------------------------------------------------

    def _region_of_point(self, x: int, y: int) -> tuple[RegionKey, ChunkKey]:
        ck = chunk_of(x, y)
        return region_of_chunk(ck[0], ck[1], self._region_size), ck

    def _route(self, delta: AnyDelta) -> list[tuple[RegionKey, ChunkKey, ChunkDelta]]:
        """Where each part of a journaled delta goes (moves are split before journaling)."""
        if isinstance(delta, EntityMove):
            raise DeltaError("EntityMove must be resolved before routing")
        region, chunk = self._region_of_point(*_delta_point(delta))
        return [(region, chunk, delta)]

    def _route_batch(self, deltas: Sequence[AnyDelta], *, tiles_only: bool = False) -> _Routed:
        """Route a batch of resolved deltas at once: per region, its deltas in batch order.

        ``tiles_only``: every delta is exactly a ``TileSet`` (checked by the caller).
        """
        chunks: list[ChunkKey]
        keys = self._chunk_keys
        if len(keys) > _CHUNK_KEYS_MAX:
            keys.clear()  # only identity is shared through it: forgetting costs nothing
        # Queued deltas refer to one shared key tuple per chunk instead of a new tuple each:
        # a tuple is a collected object, and hundreds of thousands of them queued at once
        # would make the collector run (and promote) far more often (see deltas.py).
        intern = keys.setdefault
        if tiles_only:
            sh = _CHUNK_SHIFT
            chunks = [
                intern(c, c)
                for d in cast(Sequence[TileSet], deltas)
                for c in ((d.x >> sh, d.y >> sh),)
            ]
        else:
            chunks = []
            for d in deltas:
                if isinstance(d, EntityMove):
                    raise DeltaError("EntityMove must be resolved before routing")
                c = chunk_of(*_delta_point(d))
                chunks.append(intern(c, c))
        ticks = [d.tick for d in deltas]
        rs = self._region_size
        region_of = {c: region_of_chunk(c[0], c[1], rs) for c in set(chunks)}
        regions = set(region_of.values())
        if len(regions) == 1:
            return {regions.pop(): _Part(ticks, chunks, cast(list[ChunkDelta], list(deltas)))}
        parts: _Routed = {}
        for t, c, d in zip(ticks, chunks, cast(Sequence[ChunkDelta], deltas), strict=True):
            region = region_of[c]
            part = parts.get(region)
            if part is None:
                part = parts[region] = _Part([], [], [])
            part.ticks.append(t)
            part.chunks.append(c)
            part.deltas.append(d)
        return parts

    def _batch_ticks(self, batch: JournalBatch) -> RegionTicks:
        ticks: dict[RegionKey, int] = {}
        for delta in batch.deltas:
            for region, _, d in self._route(delta):
                if d.tick > ticks.get(region, -1):
                    ticks[region] = d.tick
        return ticks

    def _check_point(self, x: int, y: int, what: str) -> None:
        limit = self._bound if self._bound > 0 else _I32 * CHUNK_SIZE // 2
        if not (-limit < x < limit and -limit < y < limit):
            raise DeltaError(f"{what}: tile ({x}, {y}) is outside the world (|x|, |y| < {limit})")

    # -- writes ---------------------------------------------------------------------------

    async def submit(self, deltas: Iterable[Delta]) -> None:
        """Apply a batch of deltas atomically; return once it is durable.

        The batch is one journal frame: after a crash either all of it or none of it is
        there. ``durability="sync"`` returns after the journal fsync covering it (shared with
        concurrent callers); ``"interval"`` returns once written, fsyncing every
        ``fsync_interval_ms``. A full region queue makes this wait for a flush (back-pressure).

        Ticks: per region, a delta must have a tick above the region's lastProcessedTick and
        not below a tick already submitted there. A flush seals the ticks it folds; routine
        flushes leave a region's newest tick open while it is being written to, but
        ``flush()``, closing and back-pressure seal everything queued.

        ``EntityUpsert`` places (or replaces) a character in the chunk at its position; use
        ``EntityMove`` to relocate one. Removes of absent records are no-ops.

        :raises DeltaError: a malformed delta, a record (character, structure, feature,
            society) not exactly of its type at the current ``schemaVersion``, a coordinate
            outside the world, a tick going backwards, or an ``EntityMove`` whose entity is
            not at its ``from`` position.
        :raises TickAlreadyProcessed: a tick at or below the region's lastProcessedTick.
        :raises StorageUnavailable: the journal write failed; nothing of the batch applied.
        :raises WorldClosed: the world is closed.
        """
        self._check_open()
        batch, encoded, kinds = self._validate(list(deltas))
        if not batch:
            return
        journal = self._journal
        assert journal is not None
        regions: dict[RegionKey, int] = {}
        moves: list[EntityMove] = []
        plain = kinds <= _PLAIN_TYPES
        routed: _Routed | None = None
        if plain:
            # Nothing to resolve: route every delta once, here, for the whole write path.
            routed = self._route_batch(batch, tiles_only=kinds == _TILES_ONLY)
            regions = {r: len(part.ticks) for r, part in routed.items()}
        for d in batch if not plain else ():
            if isinstance(d, EntityMove):
                moves.append(d)
                points = [(d.from_x, d.from_y), (d.to_x, d.to_y)]
            else:
                points = [_delta_point(d)]
            for p in points:
                region = self._region_of_point(*p)[0]
                regions[region] = regions.get(region, 0) + 1
        for region in regions:
            if region in self._inactive:
                raise RegionInactive(*region)
        while True:
            failed = await self._ensure_regions(regions)
            if failed:
                raise next(iter(failed.values()))
            if routed is not None:
                # Refuse a stale batch before it can press for room: a back-pressure flush
                # would seal ticks on behalf of a batch that is refused anyway.
                for region, part in routed.items():
                    q = self._queues.regions.get(region)
                    if q is not None:
                        q.check_ticks(part.ticks)
            waited = False
            for region, n in regions.items():
                while region in self._queues.regions and self._queues.full(region, n):
                    waited = True
                    q = self._queues.regions[region]
                    q.urgent = True
                    self._flush_wake.set()
                    await self._queues.wait_for_room(region)
                    self._check_open()
            if waited:
                continue  # state may have changed while waiting: re-check everything
            if moves and not await self._sources_ready(moves):
                continue
            # Critical section: no await until the batch is in the journal's queue, so the
            # tick checks, move resolution and journal order all see the same state.
            if any(r not in self._queues.regions for r in regions):
                continue
            depends: set[int] = set()
            if routed is None:
                expanded: list[AnyDelta] = list(self._expand(batch, depends))
                parts = self._route_batch(expanded)
            else:
                expanded, parts = batch, routed
            for region, part in parts.items():
                self._queues.regions[region].check_ticks(part.ticks)
            seq = journal.next_seq()
            jb = JournalBatch(seq=seq, deltas=expanded)
            # Without moves the journaled deltas are the validated ones: reuse that encoding.
            payload = encode_batch_raw(seq, encoded) if len(expanded) == len(batch) else None
            pending = journal.append(
                jb, {r: max(part.ticks) for r, part in parts.items()}, payload=payload
            )
            self._routing[seq] = (parts, plain)
            for region, part in parts.items():
                self._queues.regions[region].reserve(part.ticks, seq)
            if not plain:
                self._overlay_batch(jb)
            if depends:
                deps = self._dependents
                if deps is None:
                    deps = self._dependents = {}
                for earlier in depends:
                    deps.setdefault(earlier, set()).add(seq)
            break
        await pending.wait()

    def _validate(self, given: list[Delta]) -> tuple[list[AnyDelta], bytes, set[type]]:
        """Check a batch; return it, its msgpack encoding and the exact types in it.

        :raises DeltaError: the first bad delta, in batch order.
        """
        kinds: set[type] = set(map(type, given))
        if not kinds <= _DELTA_TYPE_SET:
            for i, item in enumerate(given):
                if type(item) not in _DELTA_TYPE_SET:
                    # Exact types only: a subclass would journal and replay as its base type
                    # yet be applied by its own type until then (and inherit gc=False).
                    sub = " (subclasses are not accepted)" if isinstance(item, _DELTA_TYPES) else ""
                    raise DeltaError(
                        f"delta #{i}: expected one of "
                        f"{', '.join(t.__name__ for t in _DELTA_TYPES)}, got "
                        f"{type(item).__name__}{sub}"
                    )
        batch = cast(list[AnyDelta], given)
        try:
            # Round-trip through the typed decoder: Struct constructors do not check types,
            # and a record the journal cannot decode again must never be acknowledged.
            encoded = _BATCH_ENCODER.encode(batch)
            # Tile edits whose fields are all exact ints always decode again, so a batch of
            # them that also passes every bound (checked in one pass) skips the decode.
            valid_tiles = kinds == _TILES_ONLY and self._tiles_valid(cast(list[TileSet], batch))
            if not valid_tiles:
                _BATCH_DECODER.decode(encoded)
        except (msgspec.ValidationError, msgspec.EncodeError, TypeError, OverflowError) as err:
            raise DeltaError(f"malformed delta in batch: {err}") from None
        if valid_tiles:
            return batch, encoded, kinds
        # The general checks; they also name the first bad delta the fast check found.
        for i, d in enumerate(batch):
            what = f"delta #{i} ({type(d).__name__}, tick {d.tick})"
            if d.tick < 0:
                raise DeltaError(f"{what}: tick must be >= 0")
            if isinstance(d, EntityMove):
                self._check_point(d.from_x, d.from_y, what)
                self._check_point(d.to_x, d.to_y, what)
                continue
            spec = _RECORD_FIELDS.get(type(d))
            if spec is not None:
                _check_record(d, spec, what)
            self._check_point(*_delta_point(d), what)
            if isinstance(d, TileSet) and not 0 <= d.tile <= 0xFFFF:
                raise DeltaError(f"{what}: tile id {d.tile} is outside 0..65535")
            if isinstance(d, StructureUpsert):
                s = d.structure
                self._check_point(s.x + s.w - 1, s.y + s.h - 1, what)
        return batch, encoded, kinds

    def _tiles_valid(self, batch: list[TileSet]) -> bool:
        """Whether every tile edit has exact-int fields and passes the checks of ``_validate``
        (one cheap pass; ``False`` sends the batch through the general checks)."""
        limit = self._bound if self._bound > 0 else _I32 * CHUNK_SIZE // 2
        low = -limit
        for d in batch:
            tick, x, y, tile = d.tick, d.x, d.y, d.tile
            if not (
                type(tick) is int
                and type(x) is int
                and type(y) is int
                and type(tile) is int
                and tick >= 0
                and low < x < limit
                and low < y < limit
                and 0 <= tile <= 0xFFFF
            ):
                return False
        return True

    async def _sources_ready(self, moves: list[EntityMove]) -> bool:
        """Load the source chunks of moves not resolvable from pending state; True if none
        had to be loaded (so the caller can resolve without another await)."""
        need = []
        for m in moves:
            if m.entity_id in self._overlay:
                continue
            key = chunk_of(m.from_x, m.from_y)
            if self._cache.peek(key) is None:
                need.append(key)
        if not need:
            return True
        errors: list[Exception] = []
        async with anyio.create_task_group() as tg:
            for key in dict.fromkeys(need):
                tg.start_soon(self._load_quiet, key, errors, tg.cancel_scope)
        if errors:
            # The caller gets the error itself (StorageUnavailable, RegionInactive,
            # WorldClosed ...), not an ExceptionGroup it would have to take apart.
            # The others are logged, not attached: a loader hands one error object to every
            # chunk of a failed region and to every caller waiting on it.
            first = errors[0]
            for other in dict.fromkeys(errors[1:]):
                if other is not first:
                    log.warning("submit: another EntityMove source chunk failed to load: %r", other)
            raise first
        return False

    async def _load_quiet(
        self, key: ChunkKey, errors: list[Exception], scope: anyio.CancelScope
    ) -> None:
        try:
            await self._loader.get(key, _DIRECT_PRIORITY)
        except Exception as exc:
            errors.append(exc)
            scope.cancel()  # the batch fails anyway: stop waiting for the other loads

    def _lookup_entity(
        self,
        local: dict[str, Character | None],
        entity_id: str,
        x: int,
        y: int,
        depends: set[int],
    ) -> Character | None:
        if entity_id in local:
            return local[entity_id]
        entry = self._overlay.get(entity_id)
        if entry is not None:
            depends.add(entry[0])
            return entry[1]
        chunk = self._cache.peek(chunk_of(x, y))
        if chunk is None:
            raise DeltaError(f"EntityMove: source chunk {chunk_of(x, y)} is not loaded")
        for c in chunk.entities:
            if c.id == entity_id:
                return c
        return None

    def _expand(self, batch: list[AnyDelta], depends: set[int]) -> list[ChunkDelta]:
        """Split each EntityMove into remove (source) + upsert (target, moved record).

        ``depends`` receives the seqs of pending batches a move was resolved against.
        """
        local: dict[str, Character | None] = {}
        out: list[ChunkDelta] = []
        for d in batch:
            if isinstance(d, EntityMove):
                ch = self._lookup_entity(local, d.entity_id, d.from_x, d.from_y, depends)
                if ch is None or chunk_of(ch.x, ch.y) != chunk_of(d.from_x, d.from_y):
                    raise DeltaError(
                        f"EntityMove at tick {d.tick}: entity {d.entity_id!r} is not in chunk "
                        f"{chunk_of(d.from_x, d.from_y)} (from ({d.from_x}, {d.from_y}))"
                    )
                moved = msgspec.structs.replace(ch, x=d.to_x, y=d.to_y)
                out.append(EntityRemove(tick=d.tick, entity_id=d.entity_id, x=ch.x, y=ch.y))
                out.append(EntityUpsert(tick=d.tick, character=moved))
                local[d.entity_id] = moved
            else:
                if isinstance(d, EntityUpsert):
                    local[d.character.id] = d.character
                elif isinstance(d, EntityRemove):
                    local[d.entity_id] = None
                out.append(d)
        return out

    def _overlay_batch(self, jb: JournalBatch) -> None:
        for d in jb.deltas:
            if isinstance(d, EntityUpsert):
                self._overlay[d.character.id] = (jb.seq, d.character)
            elif isinstance(d, EntityRemove):
                self._overlay[d.entity_id] = (jb.seq, None)

    def _clear_overlay(self, jb: JournalBatch) -> None:
        for d in jb.deltas:
            eid = d.character.id if isinstance(d, EntityUpsert) else None
            if isinstance(d, EntityRemove):
                eid = d.entity_id
            if eid is not None:
                entry = self._overlay.get(eid)
                if entry is not None and entry[0] == jb.seq:
                    del self._overlay[eid]

    def _index_player(self, d: ChunkDelta, region: RegionKey) -> None:
        if isinstance(d, EntityUpsert) and d.character.player_id is not None:
            self._players.placed(d.character.id, d.character.player_id, region)
        elif isinstance(d, EntityRemove):
            self._players.removed(d.entity_id, region)

    def _on_durable(self, batches: Sequence[JournalBatch]) -> None:
        """Journal hook, in journal order: queue each batch and update cached chunks."""
        queues = self._queues.regions
        for jb in batches:
            routed = self._routing.pop(jb.seq, None)
            parts, plain = routed if routed is not None else (self._route_batch(jb.deltas), False)
            for region, part in parts.items():
                queues[region].extend(part.ticks, part.chunks, part.deltas)
            if not plain:
                for delta in jb.deltas:  # in batch order: a move removes, then places
                    for region, _, d in self._route(delta):
                        self._index_player(d, region)
            for region in parts:
                queues[region].settle(seq=jb.seq)
            for part in parts.values():
                self._apply_cached(part)
            if not plain:
                self._clear_overlay(jb)
        if self._dependents:
            for jb in batches:
                self._dependents.pop(jb.seq, None)

    def _apply_cached(self, part: _Part) -> None:
        """Apply a batch's deltas to the cached chunks they touch, one new chunk per chunk."""
        cache = self._cache
        hits = [key for key in dict.fromkeys(part.chunks) if key in cache]
        if not hits:
            return
        groups: dict[ChunkKey, list[ChunkDelta]] = {key: [] for key in hits}
        for c, d in zip(part.chunks, part.deltas, strict=True):
            group = groups.get(c)
            if group is not None:
                group.append(d)
        for key, ds in groups.items():
            cached = cache.peek(key)  # again: putting an earlier chunk may have evicted it
            if cached is not None:
                cache.put(key, apply_to_chunk(cached, ds))
                cache.mark_dirty(key)

    def _on_failed(self, batches: Sequence[JournalBatch]) -> None:
        for jb in batches:
            routed = self._routing.pop(jb.seq, None)
            regions = routed[0] if routed is not None else self._batch_ticks(jb)
            for region in regions:
                q = self._queues.regions.get(region)
                if q is not None and q.pending:
                    q.settle(failed=True, seq=jb.seq)
            self._clear_overlay(jb)
        deps = self._dependents
        if not deps:
            return
        journal = self._journal
        for jb in batches:
            for later in sorted(deps.pop(jb.seq, ())):
                # Still queued (a group is taken only after the previous one's hooks ran),
                # unless it shared this batch's group and failed with it. Withdrawing it
                # calls this hook again for it, so its own dependents go too.
                if journal is not None:
                    journal.withdraw(
                        later,
                        StorageUnavailable(
                            f"batch not written: an EntityMove in it was resolved against "
                            f"batch {jb.seq}, submitted earlier, which failed and was never "
                            "applied",
                            key=JOURNAL_DIR,
                        ),
                    )
