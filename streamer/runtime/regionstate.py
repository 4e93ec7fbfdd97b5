"""Region state in memory, and folding queued deltas into a new region file.

A :class:`RegionState` is a decoded region file kept as *payloads*: the encoded chunk records
exactly as stored. A flush decodes only the chunks its deltas touch (plus chunks a lazy
migration upgraded), re-encodes those, and reuses every other payload byte for byte.

Chunks without a record are "pristine": their features and NPCs come from the generator's
region defaults. The first delta that touches one creates its ``ChunkRecord`` from those
defaults plus the generator's fingerprint of the base terrain; from then on the record's
lists are authoritative (a removed default tree stays removed).

Everything here is synchronous and pure over its inputs, so the world can run a fold in a
worker thread while the event loop keeps serving.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Generator as Generator_
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias, TypeVar

import numpy as np
import numpy.typing as npt

from streamer.coords import CHUNK_SIZE, local_index
from streamer.errors import IntegrityError
from streamer.format.checksum import hex64
from streamer.format.region import Encoding, decode_region, encode_region, region_key
from streamer.runtime.chunk import Chunk
from streamer.runtime.queues import _CHUNK_OF, ChunkDelta, Queued, QueuedEntries
from streamer.schema.codec import ChunkCodec, pack_tiles, unpack_tiles
from streamer.schema.deltas import (
    EntityRemove,
    EntityUpsert,
    FeatureAdd,
    FeatureRemove,
    SocietyUpdate,
    StructureRemove,
    StructureUpsert,
    TileSet,
)
from streamer.schema.records import Character, ChunkRecord, Feature, Society, Structure
from streamer.worldgen import ChunkDefaults

__all__ = [
    "ChunkEdit",
    "FoldResult",
    "Generator",
    "FoldSteps",
    "FreshChunk",
    "RegionState",
    "advance",
    "apply_to_chunk",
    "build_chunk",
    "check_fingerprint",
    "fold_region",
    "fold_steps",
    "fresh_chunks",
    "region_state_from_bytes",
]

ChunkKey: TypeAlias = tuple[int, int]
RegionKey: TypeAlias = tuple[int, int]
Tiles: TypeAlias = npt.NDArray[np.uint16]
#: How ``schema.codec.pack_tiles`` stores tile overrides: little-endian uint16.
_PACKED = np.dtype("<u2")
_TILE_SHAPE = (CHUNK_SIZE, CHUNK_SIZE)
#: ``local_index(x, y)`` is ``((y & _MASK) << _SHIFT) | (x & _MASK)`` (negatives included).
_SHIFT = CHUNK_SIZE.bit_length() - 1
_MASK = CHUNK_SIZE - 1
_R = TypeVar("_R", Character, Feature, Structure, Society)


class Generator(Protocol):
    """What the runtime needs from ``worldgen.TerrainGenerator``."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> int: ...

    def chunk_tiles(self, cx: int, cy: int) -> Tiles: ...

    def fingerprint(self, cx: int, cy: int) -> int: ...

    def chunk_defaults(self, cx: int, cy: int, region_size: int) -> ChunkDefaults: ...


@dataclass(eq=False)
class RegionState:
    """One region's stored chunk payloads, as of ``generation`` (0: no file yet)."""

    key: RegionKey
    generation: int = 0
    lpt: int = -1
    chunks: dict[ChunkKey, bytes] = field(default_factory=dict)
    #: Chunks whose record a lazy migration upgraded: rewritten at the next flush.
    upgraded: set[ChunkKey] = field(default_factory=set)
    #: Chunks whose base fingerprint has been checked against the generator.
    checked: set[ChunkKey] = field(default_factory=set)
    #: Chunks whose payload was at the current record versions when the region loaded (seen
    #: by the load's screening), so a flush's in-memory upgrade need not look at them again.
    #: Payloads only ever change to current ones, so membership stays true.
    current: set[ChunkKey] = field(default_factory=set)

    @property
    def path(self) -> str:
        return region_key(*self.key)


_SCREENING: dict[str, ChunkCodec] = {}


def _screening_codec(encoding: Encoding) -> ChunkCodec:
    codec = _SCREENING.get(encoding)
    if codec is None:
        codec = _SCREENING[encoding] = ChunkCodec(encoding)
    return codec


def region_state_from_bytes(data: bytes | None, key: RegionKey) -> RegionState:
    """Verify a region file (``None``: no file) into a state.

    :raises IntegrityError: the file is damaged (see ``decode_region``).
    :raises UnsupportedFormat: written by a newer format version.
    :raises UnknownSchemaVersion: a record in it is newer than this code.
    """
    if data is None:
        return RegionState(key)
    rx, ry = key
    path = region_key(rx, ry)
    rf = decode_region(data, rx=rx, ry=ry, path=path)
    # A record from newer code makes the whole region refuse to load (design §7): nothing may
    # be queued against it, since no flush could ever fold into it without downgrading.
    codec = _screening_codec(rf.header.encoding)
    current = {
        (cx, cy)
        for (cx, cy), payload in rf.chunks.items()
        if codec.refuse_unknown_versions(payload, where=f"{path} chunk ({cx}, {cy})")
    }
    return RegionState(
        key,
        generation=rf.header.generation,
        lpt=rf.header.last_processed_tick,
        chunks=dict(rf.chunks),
        current=current,
    )


def check_fingerprint(rec: ChunkRecord, gen: Generator, region: RegionKey, where: str) -> None:
    """A record's edits were made on terrain the generator must still produce.

    :raises IntegrityError: generator or base terrain changed under stored edits.
    """
    actual = gen.fingerprint(rec.cx, rec.cy)
    if rec.base_fingerprint != actual or rec.generator != gen.name:
        raise IntegrityError(
            f"chunk ({rec.cx}, {rec.cy}) was edited on terrain from {rec.generator} "
            f"v{rec.generator_version} that this generator ({gen.name} v{gen.version}) no "
            "longer produces; refusing to shift player edits onto different terrain",
            path=where,
            expected=hex64(rec.base_fingerprint),
            actual=hex64(actual),
            region=region,
        )


class ChunkEdit:
    """A mutable working copy of one chunk's persisted state, for applying deltas.

    Tile overrides read from a record stay packed (numpy) and edits go to a dict on top of
    them, so folding a few edits into a chunk with thousands of overrides is array work, not
    a dict of thousands of entries; :attr:`tiles` merges them when someone asks for it.
    """

    __slots__ = ("_packed", "_tiles", "characters", "features", "societies", "structures")

    def __init__(
        self,
        *,
        tiles: dict[int, int] | None = None,
        characters: Iterable[Character] = (),
        features: Iterable[Feature] = (),
        structures: Iterable[Structure] = (),
        societies: Iterable[Society] = (),
    ) -> None:
        self._tiles: dict[int, int] = {} if tiles is None else tiles
        #: Stored overrides under ``_tiles`` (sorted unique indices, values), or None.
        self._packed: tuple[npt.NDArray[np.uint16], npt.NDArray[np.uint16]] | None = None
        self.characters = {c.id: c for c in characters}
        self.features = {f.id: f for f in features}
        self.structures = {s.id: s for s in structures}
        self.societies = {s.id: s for s in societies}

    @classmethod
    def from_record(cls, rec: ChunkRecord, *, where: str) -> ChunkEdit:
        idx, val = unpack_tiles(rec.tile_idx, rec.tile_val, where=where)
        edit = cls(
            characters=rec.characters,
            features=rec.features,
            structures=rec.structures,
            societies=rec.societies,
        )
        if idx.size:
            edit._packed = (idx, val)
        return edit

    @property
    def tiles(self) -> dict[int, int]:
        """Every tile override, ``local_index → tile`` (stored ones merged with edits)."""
        if self._packed is not None:
            idx, val = self._packed
            merged = dict(zip(idx.tolist(), val.tolist(), strict=True))
            merged.update(self._tiles)
            self._tiles, self._packed = merged, None
        return self._tiles

    @classmethod
    def from_defaults(cls, d: ChunkDefaults) -> ChunkEdit:
        return cls(characters=d.npcs, features=d.features)

    def apply(self, delta: ChunkDelta) -> None:
        match delta:
            case TileSet(x=x, y=y, tile=tile):
                self._tiles[local_index(x, y)] = tile
            case EntityUpsert(character=c):
                self.characters[c.id] = c
            case EntityRemove(entity_id=eid):
                self.characters.pop(eid, None)
            case FeatureAdd(feature=f):
                self.features[f.id] = f
            case FeatureRemove(feature_id=fid):
                self.features.pop(fid, None)
            case StructureUpsert(structure=s):
                self.structures[s.id] = s
            case StructureRemove(structure_id=sid):
                self.structures.pop(sid, None)
            case SocietyUpdate(society=soc):
                self.societies[soc.id] = soc

    def set_tiles(self, tiles: Mapping[int, int]) -> None:
        """Override tiles (``local index -> tile``), as if by ``TileSet`` deltas in order."""
        self._tiles.update(tiles)

    def apply_all(self, deltas: Iterable[ChunkDelta]) -> None:
        """``apply`` each delta in order (tile edits in one dict update)."""
        ds = deltas if isinstance(deltas, list | tuple) else list(deltas)
        tiles = [d for d in ds if isinstance(d, TileSet)]
        if len(tiles) != len(ds):
            for d in ds:
                if not isinstance(d, TileSet):
                    # Tile edits and record changes touch disjoint state: only the order
                    # within each kind matters, and both keep it.
                    self.apply(d)
        if tiles:
            self._tiles.update(_tile_edits(tiles))

    def on_base(self, base: Tiles) -> Tiles:
        """``base`` terrain with every tile override applied (``base`` itself if none)."""
        if self._packed is None and not self._tiles:
            return base
        arr = np.array(base, dtype=np.uint16, copy=True)
        if self._packed is not None:
            idx, val = self._packed
            arr.reshape(-1)[idx] = val
        if self._tiles:
            _set_tiles(arr, self._tiles)
        arr.flags.writeable = False  # what Chunk wants: it need not copy it again
        return arr

    def packed_tiles(self) -> tuple[bytes, bytes]:
        if self._packed is not None:
            # Dense merge over the chunk: stored overrides, then edits (later wins).
            idx, val = self._packed
            present = np.zeros(CHUNK_SIZE * CHUNK_SIZE, dtype=np.bool_)
            dense = np.empty(CHUNK_SIZE * CHUNK_SIZE, dtype=_PACKED)
            present[idx] = True
            dense[idx] = val
            if self._tiles:
                t = self._tiles
                new_idx = np.fromiter(t.keys(), dtype=np.int64, count=len(t))
                present[new_idx] = True
                dense[new_idx] = np.fromiter(t.values(), dtype=np.int64, count=len(t))
            where = np.flatnonzero(present)
            # Sorted, unique, in range and uint16 by construction: what pack_tiles would check.
            return where.astype(_PACKED).tobytes(), dense[where].tobytes()
        if not self.tiles:
            return b"", b""
        idx = np.fromiter(sorted(self.tiles), dtype=np.int64, count=len(self.tiles))
        val = np.fromiter((self.tiles[i] for i in idx.tolist()), dtype=np.int64, count=idx.size)
        return pack_tiles(idx, val)

    def to_record(self, cx: int, cy: int, *, generator: str, version: int, fp: int) -> ChunkRecord:
        tile_idx, tile_val = self.packed_tiles()
        return ChunkRecord(
            cx=cx,
            cy=cy,
            generator=generator,
            generator_version=version,
            base_fingerprint=fp,
            tile_idx=tile_idx,
            tile_val=tile_val,
            characters=list(self.characters.values()),
            structures=list(self.structures.values()),
            features=list(self.features.values()),
            societies=list(self.societies.values()),
        )


def _tile_edits(tile_sets: Iterable[TileSet]) -> dict[int, int]:
    """``local_index → tile`` of ``tile_sets`` in order (a later edit of a tile wins)."""
    return {(d.y % CHUNK_SIZE) * CHUNK_SIZE + d.x % CHUNK_SIZE: d.tile for d in tile_sets}


def _with_tile_edits(tiles: Tiles, edits: Mapping[int, int]) -> Tiles:
    """A read-only copy of ``tiles`` with ``edits`` applied in one fancy-index assignment."""
    arr = np.array(tiles, dtype=np.uint16, copy=True)
    _set_tiles(arr, edits)
    arr.flags.writeable = False  # what Chunk wants: it need not copy it again
    return arr


def _set_tiles(arr: Tiles, edits: Mapping[int, int]) -> None:
    idx = np.fromiter(edits.keys(), dtype=np.int64, count=len(edits))
    val = np.fromiter(edits.values(), dtype=np.int64, count=len(edits))
    # Keys are unique, so the assignment order cannot matter.
    arr.reshape(-1)[idx] = val


def apply_to_chunk(chunk: Chunk, deltas: Sequence[ChunkDelta]) -> Chunk:
    """A new ``Chunk`` with ``deltas`` applied (the input chunk is shared and immutable)."""
    if all(type(d) is TileSet for d in deltas):
        tile_sets: Sequence[TileSet] = deltas  # type: ignore[assignment]
        records: list[ChunkDelta] = []
    else:
        tile_sets = [d for d in deltas if isinstance(d, TileSet)]
        records = [d for d in deltas if not isinstance(d, TileSet)]
    tiles: Tiles = chunk.tiles
    if tile_sets:
        tiles = _with_tile_edits(chunk.tiles, _tile_edits(tile_sets))
    if not records:
        return chunk.with_tiles(tiles) if tile_sets else chunk
    edit = ChunkEdit(
        characters=chunk.entities,
        features=chunk.features,
        structures=chunk.structures,
        societies=chunk.societies,
    )
    for rd in records:
        edit.apply(rd)
    return Chunk(
        chunk.cx,
        chunk.cy,
        tiles,
        entities=tuple(edit.characters.values()),
        features=tuple(edit.features.values()),
        structures=tuple(edit.structures.values()),
        societies=tuple(edit.societies.values()),
    )


def build_chunk(
    cx: int,
    cy: int,
    base: Tiles,
    record: ChunkRecord | None,
    defaults: ChunkDefaults | None,
    queued: Sequence[ChunkDelta],
    *,
    where: str,
    payload_size: int | None = None,
) -> Chunk:
    """The served chunk: base terrain + stored record (or generator defaults) + queued deltas.

    :param payload_size: the size of the msgpack payload ``record`` was decoded from, if
        known: a chunk with tile edits is then sized for the cache from it instead of by
        encoding its records again (never JSON: base64 tiles would count several times).
    """
    if record is not None and not queued:
        return _chunk_from_record(cx, cy, base, record, where=where, payload_size=payload_size)
    if record is None:
        edit = ChunkEdit() if defaults is None else ChunkEdit.from_defaults(defaults)
    else:
        edit = ChunkEdit.from_record(record, where=where)
    edit.apply_all(queued)
    tiles = edit.on_base(base)
    return Chunk(
        cx,
        cy,
        tiles,
        entities=tuple(edit.characters.values()),
        features=tuple(edit.features.values()),
        structures=tuple(edit.structures.values()),
        societies=tuple(edit.societies.values()),
    )


def _by_id(records: Sequence[_R]) -> tuple[_R, ...]:
    """``records`` keyed by id as ``ChunkEdit`` keeps them (the last of an id wins, in the
    position of its first), as a tuple."""
    if not records:
        return ()
    return tuple({r.id: r for r in records}.values())


def _chunk_from_record(
    cx: int,
    cy: int,
    base: Tiles,
    record: ChunkRecord,
    *,
    where: str,
    payload_size: int | None = None,
) -> Chunk:
    """``build_chunk`` of a stored record without queued deltas: the load path's common case,
    without a ``ChunkEdit`` in between (same result)."""
    idx, val = unpack_tiles(record.tile_idx, record.tile_val, where=where)
    entities = _by_id(record.characters)
    features = _by_id(record.features)
    structures = _by_id(record.structures)
    societies = _by_id(record.societies)
    if not idx.size:
        return Chunk(
            cx,
            cy,
            base,
            entities=entities,
            features=features,
            structures=structures,
            societies=societies,
        )
    arr = np.array(base, dtype=np.uint16, copy=True, order="C")
    if arr.shape != _TILE_SHAPE:
        raise ValueError(f"chunk tiles must have shape {_TILE_SHAPE}, got {arr.shape}")
    arr.reshape(-1)[idx] = val
    arr.flags.writeable = False
    # The payload less its tiles: the records' stored size plus the record's few scalar
    # fields (``Chunk._trusted`` adds what older writers may have left out).
    encoded = (
        None
        if payload_size is None
        else max(0, payload_size - len(record.tile_idx) - len(record.tile_val))
    )
    return Chunk._trusted(
        cx, cy, arr, entities, features, structures, societies, records_encoded=encoded
    )


@dataclass(frozen=True, slots=True)
class FoldResult:
    data: bytes
    chunks: dict[ChunkKey, bytes]
    generation: int
    lpt: int
    #: Chunks whose payload changed in this fold.
    changed: frozenset[ChunkKey]
    #: How many of the folded items each chunk had (what ``RegionQueue.folded`` subtracts).
    counts: Mapping[ChunkKey, int] = field(default_factory=dict)


#: Items a fold handles between two steps (grouping them per chunk, or applying them):
#: a few hundred microseconds of work at most.
_STEP_ITEMS = 256


def _group(
    seg: Sequence[Queued],
    tiles_of: dict[ChunkKey, dict[int, int]],
    others_of: dict[ChunkKey, list[ChunkDelta]],
    counts: Counter[ChunkKey],
) -> None:
    """Sort ``seg``'s deltas into ``fold_steps``' per-chunk tile maps and lists."""
    counts.update(map(_CHUNK_OF, seg))
    for item in seg:
        d = item.delta
        if type(d) is TileSet:
            m = tiles_of.get(item.chunk)
            if m is None:
                m = tiles_of[item.chunk] = {}
            m[((d.y & _MASK) << _SHIFT) | (d.x & _MASK)] = d.tile
        else:
            group = others_of.get(item.chunk)
            if group is None:
                group = others_of[item.chunk] = []
            group.append(d)


#: What a chunk without a stored record starts from: its generator defaults and the
#: fingerprint of its base terrain.
FreshChunk: TypeAlias = tuple[ChunkDefaults, int]


def _fresh_chunk(gen: Generator, ck: ChunkKey, region_size: int) -> FreshChunk:
    cx, cy = ck
    return gen.chunk_defaults(cx, cy, region_size), gen.fingerprint(cx, cy)


def fresh_chunks(
    gen: Generator, keys: Iterable[ChunkKey], region_size: int
) -> dict[ChunkKey, FreshChunk]:
    """:data:`FreshChunk` of each of ``keys`` (blocking numpy work: run it in a thread)."""
    return {ck: _fresh_chunk(gen, ck, region_size) for ck in keys}


#: A fold as a sequence of short steps (``next()`` runs one) that returns its result.
FoldSteps: TypeAlias = Generator_[None, None, FoldResult]


def fold_region(state_chunks: Mapping[ChunkKey, bytes], **kw: Any) -> FoldResult:
    """:func:`fold_steps` run to the end, in one go (same arguments)."""
    result = advance(fold_steps(state_chunks, **kw))
    assert result is not None  # no bound given: it ran to the end
    return result


def advance(
    steps: FoldSteps,
    *,
    max_steps: int | None = None,
    until: float | None = None,
    pause: Callable[[], None] | None = None,
) -> FoldResult | None:
    """Run ``steps``: to the end (the result), or ``None`` once ``max_steps`` steps have run
    or ``time.perf_counter()`` has passed ``until``. ``pause`` is called after each step."""
    n = 0
    while True:
        try:
            next(steps)
        except StopIteration as done:
            result: FoldResult = done.value
            return result
        n += 1
        if (max_steps is not None and n >= max_steps) or (
            until is not None and time.perf_counter() >= until
        ):
            return None
        if pause is not None:
            pause()


def fold_steps(
    state_chunks: Mapping[ChunkKey, bytes],
    *,
    key: RegionKey,
    generation: int,
    lpt: int,
    items: Sequence[Queued] | QueuedEntries,
    upgraded: Iterable[ChunkKey],
    codec: ChunkCodec,
    gen: Generator,
    writer: str,
    encoding: Encoding,
    region_size: int,
    fresh: Mapping[ChunkKey, FreshChunk] | None = None,
) -> FoldSteps:
    """Apply ``items`` (in order) to the region's chunks and encode a complete new file.

    Unchanged chunk payloads are reused as they are. The new file has ``generation + 1`` and
    ``last_processed_tick`` = the highest folded tick (never lower than ``lpt``).

    A generator of short steps (at most ``_STEP_ITEMS`` items, or one chunk, each): the
    world runs the first steps of a fold on its event loop, where a small fold finishes
    without a thread hop, and the rest in a worker thread that hands the GIL back between
    steps (``runtime/flushing.py``).

    :param fresh: generator output for chunks without a stored record, computed beforehand
        (:func:`fresh_chunks`, in a worker thread): a region's defaults take milliseconds of
        numpy work. A chunk missing from it is generated here.
    :raises IntegrityError, SchemaError: a stored chunk the fold needs does not decode.
    """
    rx, ry = key
    path = region_key(rx, ry)
    # Tile edits become one ``local index -> tile`` map per chunk as they are read (a later
    # edit of a tile wins, as applying them in order would); other deltas keep their order
    # in a list per chunk. The two kinds touch disjoint state, so applying each kind in
    # order gives what applying everything in order gives. Maps of ints are not collected
    # objects; lists of the deltas would be walked by every collection during the fold.
    tiles_of: dict[ChunkKey, dict[int, int]] = {}
    others_of: dict[ChunkKey, list[ChunkDelta]] = {}
    counts: Counter[ChunkKey] = Counter()
    segments = items.segments if isinstance(items, QueuedEntries) else (items,)
    since_step = 0
    for whole in segments:
        # A big batch's segment is cut into steps too (slicing copies references only).
        parts = (
            [whole]
            if len(whole) <= _STEP_ITEMS
            else [whole[i : i + _STEP_ITEMS] for i in range(0, len(whole), _STEP_ITEMS)]
        )
        for seg in parts:
            _group(seg, tiles_of, others_of, counts)
            since_step += len(seg)
            if since_step >= _STEP_ITEMS:
                since_step = 0
                yield
    new_lpt = lpt
    if items:
        # Queued ticks are non-decreasing (see runtime/queues.py): the last is the highest.
        new_lpt = max(new_lpt, items[-1].tick)
    touched = set(counts) | set(upgraded)
    chunks = dict(state_chunks)
    for ck in sorted(touched):
        cx, cy = ck
        where = f"{path} chunk ({cx}, {cy})"
        payload = chunks.get(ck)
        if payload is not None:
            rec = codec.decode(payload, where=where).record
            edit = ChunkEdit.from_record(rec, where=where)
            gen_name, gen_version, fp = rec.generator, rec.generator_version, rec.base_fingerprint
        else:
            got = fresh.get(ck) if fresh is not None else None
            defaults, fp = got if got is not None else _fresh_chunk(gen, ck, region_size)
            edit = ChunkEdit.from_defaults(defaults)
            gen_name, gen_version = gen.name, gen.version
        yield
        others = others_of.get(ck, [])
        for start in range(0, len(others), _STEP_ITEMS):
            for d in others[start : start + _STEP_ITEMS]:
                edit.apply(d)
            yield
        tile_map = tiles_of.get(ck)
        if tile_map:
            edit.set_tiles(tile_map)
        rec = edit.to_record(cx, cy, generator=gen_name, version=gen_version, fp=fp)
        chunks[ck] = codec.encode(rec)
        yield
    yield  # the whole file's encoding is a step of its own (the loop's budget may be spent)
    data = encode_region(
        rx=rx,
        ry=ry,
        last_processed_tick=new_lpt,
        generation=generation + 1,
        writer=writer,
        encoding=encoding,
        chunks=chunks,
        region_size=region_size,
    )
    return FoldResult(
        data=data,
        chunks=chunks,
        generation=generation + 1,
        lpt=new_lpt,
        changed=frozenset(touched),
        counts=counts,
    )
