"""The chunk value handed to callers and held by the cache.

A ``Chunk`` is immutable: callers on many tasks share one instance, and the cache accounts its
size once, so nothing may change it after construction. Edits produce a new ``Chunk``
(``with_tiles``/``with_records``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TypeAlias

import msgspec
import numpy as np
import numpy.typing as npt

from streamer.coords import CHUNK_SIZE
from streamer.schema.records import Character, Feature, Record, Society, Structure

#: ``(cx, cy)``: the address of a chunk, used as the key everywhere in the runtime.
ChunkKey: TypeAlias = tuple[int, int]

Tiles: TypeAlias = npt.NDArray[np.uint16]

_TILE_SHAPE = (CHUNK_SIZE, CHUNK_SIZE)

# Fixed part of a Chunk that is not its tiles or records: the slotted object, the ndarray
# header and the four tuples. Measured with sys.getsizeof on CPython 3.11; rounded up so the
# estimate errs towards evicting early rather than overrunning the budget.
_CHUNK_OVERHEAD = 512


def _frozen_tiles(tiles: npt.ArrayLike) -> Tiles:
    arr = np.asarray(tiles, dtype=np.uint16)
    if arr.shape != _TILE_SHAPE:
        raise ValueError(f"chunk tiles must have shape {_TILE_SHAPE}, got {arr.shape}")
    if arr.flags.writeable or arr.base is not None:
        # Whoever passed a writable array (or a view of one) can still mutate it under every
        # reader sharing this chunk; an 8 KiB copy is far cheaper than that bug.
        arr = np.array(arr, dtype=np.uint16, copy=True, order="C")
        arr.flags.writeable = False
    return arr


#: Encodes records only to size them (one encoder, reused).
_SIZE_ENCODER = msgspec.msgpack.Encoder()
#: Decoded records take 3.8-6.2x their msgpack size in CPython 3.11 objects (measured over
#: generated features and NPCs, and characters with 20 item stacks), plus per-object headers.
_BYTES_PER_ENCODED_BYTE = 6
_RECORD_OVERHEAD = 64


def _elidable_bytes(rtype: type[Record]) -> int:
    """The most a stored ``rtype`` record can be smaller than its re-encoding: every field
    with a default, key and default value, left out (msgspec fills them in on decode)."""
    total = 0
    for f in msgspec.structs.fields(rtype):
        if f.default is not msgspec.NODEFAULT:
            value = f.default
        elif f.default_factory is not msgspec.NODEFAULT:
            value = f.default_factory()
        else:
            continue
        total += len(_SIZE_ENCODER.encode(f.encode_name)) + len(_SIZE_ENCODER.encode(value))
    return total


_ELIDABLE_CHARACTER = _elidable_bytes(Character)
_ELIDABLE_FEATURE = _elidable_bytes(Feature)
_ELIDABLE_STRUCTURE = _elidable_bytes(Structure)
_ELIDABLE_SOCIETY = _elidable_bytes(Society)


def estimate_records_nbytes(records: Iterable[Record]) -> int:
    """Bytes the records of a chunk keep alive, for cache accounting.

    Scaled from their msgpack size: one C-level encode costs microseconds, where walking
    every object with ``sys.getsizeof`` cost ~0.4 ms per chunk of generated features,
    twice the terrain generation a load is bounded by. The factor errs high, as the cache
    budget is a ceiling.
    """
    recs = records if isinstance(records, list | tuple) else list(records)
    if not recs:
        return 0
    return len(recs) * _RECORD_OVERHEAD + _BYTES_PER_ENCODED_BYTE * len(_SIZE_ENCODER.encode(recs))


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class Chunk:
    """One 64x64 chunk as served: generated terrain with edits applied, plus its records.

    ``tiles`` is a read-only ``uint16`` array of shape (64, 64) indexed ``[ly, lx]``; a writable
    input is copied so no caller can mutate what others see. ``nbytes`` is computed at
    construction (tiles + a deep estimate of the records) and is what the chunk costs in the
    cache.

    Equality is identity: comparing tile arrays element-wise on every ``==`` would be both
    slow and ambiguous (numpy returns an array).
    """

    cx: int
    cy: int
    tiles: Tiles
    entities: tuple[Character, ...] = ()
    features: tuple[Feature, ...] = ()
    structures: tuple[Structure, ...] = ()
    societies: tuple[Society, ...] = ()
    nbytes: int = dataclasses.field(init=False, repr=True)

    def __post_init__(self) -> None:
        # Frozen dataclass: normalising fields has to go through object.__setattr__.
        tiles = _frozen_tiles(self.tiles)
        object.__setattr__(self, "tiles", tiles)
        for name in ("entities", "features", "structures", "societies"):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        records_nbytes = estimate_records_nbytes(
            (*self.entities, *self.features, *self.structures, *self.societies)
        )
        object.__setattr__(self, "nbytes", _CHUNK_OVERHEAD + tiles.nbytes + records_nbytes)

    @classmethod
    def _trusted(
        cls,
        cx: int,
        cy: int,
        tiles: Tiles,
        entities: tuple[Character, ...],
        features: tuple[Feature, ...],
        structures: tuple[Structure, ...],
        societies: tuple[Society, ...],
        *,
        records_encoded: int | None = None,
    ) -> Chunk:
        """Construct without normalising (the load path's hot constructor).

        ``tiles`` must be a fresh, read-only, C-contiguous ``uint16`` (64, 64) array that owns
        its data (what ``_frozen_tiles`` would return unchanged) and the records tuples;
        ``nbytes`` is computed as by the regular constructor; given ``records_encoded`` (the
        msgpack payload the records were decoded from, less its packed tiles), from that
        plus the fields a stored record may leave out, instead of encoding them again: an
        upper bound of the regular figure, never below it.
        """
        self = object.__new__(cls)
        setattr_ = object.__setattr__
        setattr_(self, "cx", cx)
        setattr_(self, "cy", cy)
        setattr_(self, "tiles", tiles)
        setattr_(self, "entities", entities)
        setattr_(self, "features", features)
        setattr_(self, "structures", structures)
        setattr_(self, "societies", societies)
        if not (entities or features or structures or societies):
            records_nbytes = 0
        elif records_encoded is not None:
            count = len(entities) + len(features) + len(structures) + len(societies)
            # A stored record written by older code may leave out fields with defaults that
            # its re-encoding has: add the most that can be, so the estimate only errs high.
            encoded = (
                records_encoded
                + len(entities) * _ELIDABLE_CHARACTER
                + len(features) * _ELIDABLE_FEATURE
                + len(structures) * _ELIDABLE_STRUCTURE
                + len(societies) * _ELIDABLE_SOCIETY
            )
            records_nbytes = count * _RECORD_OVERHEAD + _BYTES_PER_ENCODED_BYTE * encoded
        else:
            records_nbytes = estimate_records_nbytes(
                (*entities, *features, *structures, *societies)
            )
        setattr_(self, "nbytes", _CHUNK_OVERHEAD + tiles.nbytes + records_nbytes)
        return self

    @property
    def key(self) -> ChunkKey:
        return (self.cx, self.cy)

    def with_tiles(self, tiles: npt.ArrayLike) -> Chunk:
        """A copy with other tiles (records shared, ``nbytes`` recomputed)."""
        return dataclasses.replace(self, tiles=_frozen_tiles(tiles))

    def with_records(
        self,
        *,
        entities: Iterable[Character] | None = None,
        features: Iterable[Feature] | None = None,
        structures: Iterable[Structure] | None = None,
        societies: Iterable[Society] | None = None,
    ) -> Chunk:
        """A copy with some record collections replaced; ``None`` keeps the current one."""
        return Chunk(
            self.cx,
            self.cy,
            self.tiles,
            entities=self.entities if entities is None else tuple(entities),
            features=self.features if features is None else tuple(features),
            structures=self.structures if structures is None else tuple(structures),
            societies=self.societies if societies is None else tuple(societies),
        )
