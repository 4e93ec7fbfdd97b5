"""Chunk record codec: bytes ⇄ ``ChunkRecord``, with lazy migration and packed tile arrays.

Decode has two paths:

- **fast**: peek a tiny Struct (``type``, ``schemaVersion``, ``record_versions``; msgspec
  skips every other field without building it). When the chunk and every nested type it
  lists are current, decode straight into ``ChunkRecord``. The nested records' own versions
  are then checked (a few int compares), so a chunk whose ``record_versions`` is stale or
  lying falls back to the slow path instead of being read with fields silently dropped.
- **slow**: decode to plain data, ``REGISTRY.upgrade_chunk``, ``msgspec.convert`` into
  ``ChunkRecord``. ``upgraded=True`` tells the caller the stored bytes must be rewritten.

Stored bytes are untrusted: ``decode`` lets only ``StreamerError`` subclasses escape, for any
input (``tests/test_codec.py`` fuzzes this). ``msgspec`` errors become ``MalformedFile``
naming ``where``, which is the caller's description of the bytes (region path + chunk).
"""

from __future__ import annotations

from operator import attrgetter
from typing import Any, Final, Literal, NamedTuple

import msgspec
import numpy as np
import numpy.typing as npt

from streamer.errors import MalformedFile, UnknownSchemaVersion
from streamer.schema.migrations import (
    CHUNK_NESTED_FIELDS,
    REGISTRY,
    MalformedRecord,
    RawRecord,
    refuse_newer_nested,
)
from streamer.schema.records import CURRENT_VERSIONS, ChunkRecord, Record

__all__ = [
    "CHUNK_TILES",
    "ChunkCodec",
    "DecodedChunk",
    "Encoding",
    "apply_tiles",
    "pack_tiles",
    "unpack_tiles",
]

Encoding = Literal["msgpack", "json"]

#: Tiles per chunk (64 x 64); a local tile index is ``ly * 64 + lx``.
CHUNK_TILES: Final = 64 * 64

_TILE_DTYPE: Final = np.dtype("<u2")

_CHUNK_VERSION: Final = CURRENT_VERSIONS["chunk"]
_CURRENT_NESTED: Final = {t: CURRENT_VERSIONS[t] for t in CHUNK_NESTED_FIELDS.values()}
# Item views compare as sets in C: `rv.items() <= _CURRENT_NESTED_ITEMS` is "every listed
# type is known and current" without a Python-level loop.
_CURRENT_NESTED_ITEMS: Final = _CURRENT_NESTED.items()
_SCHEMA_VERSION: Final = attrgetter("schemaVersion")
_NESTED_ATTRS: Final = tuple(
    (field, rtype, CURRENT_VERSIONS[rtype]) for field, rtype in CHUNK_NESTED_FIELDS.items()
)

# The only errors decoding untrusted bytes may raise besides our own. msgspec raises
# UnicodeDecodeError (not DecodeError) for invalid UTF-8 in a string. RecursionError: msgspec
# and ``copy`` recurse per nesting level, and a payload can nest arbitrarily deep.
_DECODE_ERRORS: Final = (
    msgspec.DecodeError,
    msgspec.ValidationError,
    UnicodeDecodeError,
    RecursionError,
)


class _ChunkPeek(msgspec.Struct):
    """Just enough of a chunk to choose the decode path; other fields are skipped unbuilt."""

    type: str
    schemaVersion: int
    record_versions: dict[str, int] = {}


class _VersionOnly(msgspec.Struct):
    # Only the version: each list holds one record type, and building ``type``/``id`` strings
    # for every record would triple the cost of screening a region at load.
    schemaVersion: int = 0


class _VersionPeek(msgspec.Struct):
    """Every record's ``type``/``schemaVersion`` of a chunk and its ``record_versions``; all
    other fields skipped unbuilt."""

    type: str = ""
    schemaVersion: int = 0
    characters: list[_VersionOnly] = []
    structures: list[_VersionOnly] = []
    features: list[_VersionOnly] = []
    societies: list[_VersionOnly] = []
    # Untyped: a malformed map must not fail the peek and hide a newer record (decode
    # reports it); a few entries at most.
    record_versions: Any = None


class DecodedChunk(NamedTuple):
    record: ChunkRecord
    #: True when a migration (or a ``record_versions`` fix) ran: rewrite at the next flush.
    upgraded: bool


class ChunkCodec:
    """Encodes and decodes ``ChunkRecord`` payloads in one encoding.

    Encoders and decoders are built once here: building a typed msgspec Decoder costs far more
    than decoding one chunk.
    """

    def __init__(self, encoding: Encoding) -> None:
        self.encoding: Final[Encoding] = encoding
        if encoding == "msgpack":
            self._enc: msgspec.msgpack.Encoder | msgspec.json.Encoder = msgspec.msgpack.Encoder()
            self._dec: msgspec.msgpack.Decoder[ChunkRecord] | msgspec.json.Decoder[ChunkRecord]
            self._dec = msgspec.msgpack.Decoder(ChunkRecord)
            self._peek: msgspec.msgpack.Decoder[_ChunkPeek] | msgspec.json.Decoder[_ChunkPeek]
            self._peek = msgspec.msgpack.Decoder(_ChunkPeek)
            self._versions: (
                msgspec.msgpack.Decoder[_VersionPeek] | msgspec.json.Decoder[_VersionPeek]
            )
            self._versions = msgspec.msgpack.Decoder(_VersionPeek)
            self._raw: msgspec.msgpack.Decoder[Any] | msgspec.json.Decoder[Any]
            self._raw = msgspec.msgpack.Decoder()
            # msgpack has a native bin type: a str where bytes belong is corruption, exactly as
            # the typed fast path would judge it.
            self._builtin: tuple[type, ...] | None = (bytes,)
        elif encoding == "json":
            self._enc = msgspec.json.Encoder()
            self._dec = msgspec.json.Decoder(ChunkRecord)
            self._peek = msgspec.json.Decoder(_ChunkPeek)
            self._versions = msgspec.json.Decoder(_VersionPeek)
            self._raw = msgspec.json.Decoder()
            # JSON carries bytes as base64 strings; convert() decodes them when bytes is not
            # declared a builtin type of the source.
            self._builtin = None
        else:
            raise ValueError(f"unknown encoding {encoding!r}; expected 'msgpack' or 'json'")

    def __repr__(self) -> str:
        return f"ChunkCodec({self.encoding!r})"

    def refuse_unknown_versions(self, payload: bytes, *, where: str) -> bool:
        """Raise if the chunk or any record in it is newer than this code knows, or its
        ``record_versions`` names a nested type this code does not know or a newer version;
        return whether the payload is current throughout (what :meth:`decode` would not
        upgrade).

        Cheap (~1-2 µs: only ``type``/``schemaVersion`` of each record are built), so a whole
        region can be screened when it loads: a region holding a record from the future is
        refused as a whole, before anything could be queued against it. Unparseable payloads
        pass here (as not current); :meth:`decode` reports them.

        :raises UnknownSchemaVersion: names the record type, id, version and ``where``.
        """
        try:
            peek = self._versions.decode(payload)
        except _DECODE_ERRORS:
            return False
        if peek.schemaVersion > _CHUNK_VERSION:
            raise UnknownSchemaVersion(
                f"chunk written at schemaVersion {peek.schemaVersion}, newer than this code "
                f"({_CHUNK_VERSION}); refusing it rather than downgrading",
                record_type="chunk",
                schema_version=peek.schemaVersion,
                where=where,
            )
        current = peek.schemaVersion == _CHUNK_VERSION and peek.type == "chunk"
        for field, rtype, version in _NESTED_ATTRS:
            for i, rec in enumerate(getattr(peek, field)):
                if rec.schemaVersion == version:
                    continue
                current = False
                if rec.schemaVersion > version:
                    # Rare: decode the payload once more for the record's id in the message.
                    raw = self._raw.decode(payload)[field][i]
                    rid = raw.get("id") if isinstance(raw, dict) else None
                    raise UnknownSchemaVersion(
                        f"record written at schemaVersion {rec.schemaVersion}, newer than this "
                        "code; refusing it rather than downgrading",
                        record_type=rtype,
                        record_id=None if rid is None else str(rid),
                        schema_version=rec.schemaVersion,
                        where=where,
                    )
        _refuse_unknown_nested(peek.record_versions, where)
        if not current:
            return False
        # The rest of ``decode_current``'s criteria, on the map peeked untyped above (so a
        # malformed one could not hide a newer record): str -> int, exact ints (a bool is
        # not a version), all current. Missing reads as empty, as the typed peek has it.
        rv = {} if peek.record_versions is None else peek.record_versions
        return (
            isinstance(rv, dict)
            and all(type(v) is int for v in rv.values())
            and rv.items() <= _CURRENT_NESTED_ITEMS
        )

    # -- encode ---------------------------------------------------------------------------

    def encode(self, rec: ChunkRecord) -> bytes:
        """Encode ``rec`` with ``record_versions`` recomputed from its nested records.

        ``rec`` itself is not modified.

        :raises ValueError: the packed tile arrays have unequal or odd byte lengths.
        """
        _check_tile_lengths(rec.tile_idx, rec.tile_val)
        rv: dict[str, int] = {}
        for field, rtype, _ in _NESTED_ATTRS:
            items: list[Record] = getattr(rec, field)
            if items:
                rv[rtype] = min(map(_SCHEMA_VERSION, items))
        if rv != rec.record_versions:
            rec = msgspec.structs.replace(rec, record_versions=rv)
        return self._enc.encode(rec)

    def encode_raw(self, d: RawRecord, *, where: str = "<raw chunk>") -> bytes:
        """Encode a plain-data chunk (as from :meth:`decode_raw`) after validating it.

        Old records are upgraded first and the result must convert to ``ChunkRecord``, so the
        codec never writes bytes that its own decode would reject or have to migrate again.

        :raises MalformedFile: ``d`` is not a valid chunk record.
        :raises UnknownSchemaVersion: ``d`` holds a version newer than this code.
        :raises MigrationFailed: upgrading an old record failed.
        """
        return self.encode(self._from_raw(d, where=where)[0])

    # -- decode ---------------------------------------------------------------------------

    def decode(self, payload: bytes, *, where: str) -> DecodedChunk:
        """Decode one chunk payload, upgrading old records in memory.

        :raises MalformedFile: not a chunk record in this encoding (names ``where``).
        :raises UnknownSchemaVersion: the chunk or a nested record is newer than this code.
        :raises MigrationFailed: a migration step failed (names record id, type, version).
        """
        rec = self.decode_current(payload, where=where)
        if rec is not None:
            return DecodedChunk(rec, False)
        # Old, newer or malformed: the slow path gives the authoritative answer and error.
        return self._decode_slow(payload, where=where)

    def decode_current(self, payload: bytes, *, where: str) -> ChunkRecord | None:
        """The record, if ``payload`` is a valid record of current versions only; else
        ``None`` (old, newer or malformed: ``decode`` migrates or reports it). ``decode``'s
        fast path. Never runs a migration step, so it may be called where a migration must
        not happen (a worker thread building ahead of the loop).

        :raises MalformedFile: current versions, but packed tiles out of shape.
        """
        # The peek first: the typed decoder alone would take a payload without ``type`` or
        # ``schemaVersion`` (the struct has defaults for them), which is malformed; and an
        # old record is told by its versions without decoding it whole.
        try:
            peek = self._peek.decode(payload)
        except _DECODE_ERRORS:
            return None
        if not (
            peek.schemaVersion == _CHUNK_VERSION
            and peek.type == "chunk"
            and peek.record_versions.items() <= _CURRENT_NESTED_ITEMS
        ):
            return None
        try:
            rec = self._dec.decode(payload)
        except _DECODE_ERRORS:
            return None
        if not _nested_all_current(rec):
            return None
        _check_decoded_tiles(rec, where)
        return rec

    def decode_raw(self, payload: bytes, *, where: str) -> RawRecord:
        """Decode a payload to plain data without typing or migrating it.

        Bytes fields are ``bytes`` for msgpack and base64 ``str`` for JSON.

        :raises MalformedFile: not a map in this encoding.
        """
        try:
            obj = self._raw.decode(payload)
        except _DECODE_ERRORS as exc:
            raise MalformedFile(
                f"chunk payload is not valid {self.encoding}: {exc}", path=where
            ) from exc
        if not isinstance(obj, dict):
            raise MalformedFile(
                f"chunk payload is a {type(obj).__name__}, expected a map", path=where
            )
        return obj

    def _decode_slow(self, payload: bytes, *, where: str) -> DecodedChunk:
        # The plain data was decoded here and is dropped after conversion: hand it over to the
        # registry (``consume``) instead of having every old record deep-copied first.
        raw = self.decode_raw(payload, where=where)
        rec, changed = self._from_raw(raw, where=where, consume=True)
        return DecodedChunk(rec, changed)

    def _from_raw(
        self, raw: RawRecord, *, where: str, consume: bool = False
    ) -> tuple[ChunkRecord, bool]:
        try:
            up, changed = REGISTRY.upgrade_chunk(raw, where=where, consume=consume)
        except MalformedRecord as exc:
            raise MalformedFile(str(exc), path=where) from exc
        except RecursionError as exc:
            raise MalformedFile("chunk record is nested too deeply", path=where) from exc
        try:
            rec = msgspec.convert(up, ChunkRecord, builtin_types=self._builtin)
        except (msgspec.ValidationError, RecursionError) as exc:
            raise MalformedFile(f"invalid chunk record: {exc}", path=where) from exc
        _check_decoded_tiles(rec, where)
        return rec, changed


def _refuse_unknown_nested(rv: Any, where: str) -> None:
    """Refuse what ``decode`` refuses in ``record_versions``: a nested type this code does not
    know (a list added by a newer release, whose records a rewrite would drop) or a newer
    version of a known one. Refused here, at region load, the region never loads; passed,
    it loaded while its chunk could never be decoded, so deltas queued against it could
    never be flushed. Malformed maps and values are left to ``decode``.
    """
    if isinstance(rv, dict):
        refuse_newer_nested(rv, _CURRENT_NESTED, where=where)


def _nested_all_current(rec: ChunkRecord) -> bool:
    if rec.schemaVersion != _CHUNK_VERSION:
        return False
    for field, _, current in _NESTED_ATTRS:
        for r in getattr(rec, field):
            if r.schemaVersion != current:
                return False
    return True


def _check_tile_lengths(idx_b: bytes, val_b: bytes) -> None:
    if len(idx_b) != len(val_b) or len(idx_b) % 2:
        raise ValueError(
            f"packed tiles: tile_idx has {len(idx_b)} bytes and tile_val {len(val_b)}; "
            "expected equal, even lengths (uint16 each)"
        )


def _check_decoded_tiles(rec: ChunkRecord, where: str) -> None:
    # Only the O(1) length checks: the full index check costs numpy calls on every load and is
    # done by unpack_tiles(), which every consumer of the arrays goes through.
    try:
        _check_tile_lengths(rec.tile_idx, rec.tile_val)
    except ValueError as exc:
        raise MalformedFile(str(exc), path=where) from exc


# -- packed tiles ------------------------------------------------------------------------


def pack_tiles(idx: npt.ArrayLike, val: npt.ArrayLike) -> tuple[bytes, bytes]:
    """Pack tile overrides as little-endian ``uint16`` bytes: ``(tile_idx, tile_val)``.

    :raises ValueError: not 1-D, unequal lengths, an index outside ``[0, 4096)`` or not
        strictly increasing, or a tile id outside ``[0, 65535]``.
    """
    i = np.asarray(idx)
    v = np.asarray(val)
    if i.ndim != 1 or v.ndim != 1 or i.shape != v.shape:
        raise ValueError(f"tile idx/val must be 1-D of equal length, got {i.shape} and {v.shape}")
    if i.size:
        if not (np.issubdtype(i.dtype, np.integer) and np.issubdtype(v.dtype, np.integer)):
            raise ValueError(f"tile idx/val must be integers, got {i.dtype} and {v.dtype}")
        if int(i.min()) < 0 or int(i.max()) >= CHUNK_TILES:
            raise ValueError(f"tile index out of range [0, {CHUNK_TILES})")
        if i.size > 1 and not bool(np.all(i[1:] > i[:-1])):
            raise ValueError("tile indices must be sorted and unique")
        if int(v.min()) < 0 or int(v.max()) > 0xFFFF:
            raise ValueError("tile id out of uint16 range")
    return i.astype(_TILE_DTYPE).tobytes(), v.astype(_TILE_DTYPE).tobytes()


def unpack_tiles(
    idx_b: bytes, val_b: bytes, *, where: str
) -> tuple[npt.NDArray[np.uint16], npt.NDArray[np.uint16]]:
    """Read-only ``uint16`` views of packed tile overrides, fully validated.

    :raises MalformedFile: unequal or odd byte lengths, an index >= 4096, or indices that are
        not strictly increasing (names ``where``).
    """
    if len(idx_b) != len(val_b) or len(idx_b) % 2:
        raise MalformedFile(
            f"packed tiles: tile_idx has {len(idx_b)} bytes and tile_val {len(val_b)}; "
            "expected equal, even lengths",
            path=where,
        )
    # frombuffer over immutable bytes is zero-copy and already read-only.
    i: npt.NDArray[np.uint16] = np.frombuffer(idx_b, dtype=_TILE_DTYPE)
    v: npt.NDArray[np.uint16] = np.frombuffer(val_b, dtype=_TILE_DTYPE)
    if i.size:
        if i.size > 1 and not bool(np.all(i[1:] > i[:-1])):
            raise MalformedFile("packed tiles: indices not sorted and unique", path=where)
        # Strictly increasing, so the last index is the largest.
        if int(i[-1]) >= CHUNK_TILES:
            raise MalformedFile(
                f"packed tiles: index {int(i[-1])} outside the chunk (< {CHUNK_TILES})", path=where
            )
    return i, v


def apply_tiles(
    base: npt.NDArray[np.uint16], idx: npt.NDArray[np.uint16], val: npt.NDArray[np.uint16]
) -> npt.NDArray[np.uint16]:
    """A new read-only copy of ``base`` (64x64, ``[ly, lx]``) with the overrides applied.

    ``base`` is left untouched: generated terrain may be shared or cached.

    :raises ValueError: ``base`` is not 64x64, or idx/val differ in length or exceed the chunk.
    """
    if base.shape != (64, 64):
        raise ValueError(f"base must be 64x64, got {base.shape}")
    if idx.shape != val.shape or idx.ndim != 1:
        raise ValueError(f"idx/val must be 1-D of equal length, got {idx.shape} and {val.shape}")
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= CHUNK_TILES):
        raise ValueError(f"tile index out of range [0, {CHUNK_TILES})")
    out = np.array(base, dtype=np.uint16, order="C", copy=True)
    out.reshape(-1)[idx] = val
    out.flags.writeable = False
    return out
