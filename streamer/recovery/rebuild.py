"""Rebuilding a region from the generator, and regenerating a whole world from its seed.

Both are offline operations: the caller holds the ``WorldLock`` (nothing else writes).

**Region rebuild** (``streamer region rebuild``) resets one region to what the generator
makes of it: terrain is regenerated on every load anyway (nothing to store), and the region
file is replaced by one holding exactly the generator's default NPCs and features, as
``ChunkRecord``s for the chunks that have any. Every other piece of dynamic state in the
region (player edits, characters, structures, societies) is gone; the previous file, if any,
is quarantined first, so a rebuild never destroys the last copy of anything.

The new file's ``lastProcessedTick`` is the highest tick known anywhere for the region:
the old header's (if it still verifies), the one a ``data_loss`` incident recorded for the
damaged file, the snapshots' records of it, and **every tick in the journal**. The journal
matters most: at the next open, replay applies each journaled delta whose tick is above its
region's lastProcessedTick. A rebuilt file with a low tick (or no file, which reads as -1)
would let replay resurrect deltas from before the rebuild (a character walking back into a
region that was just cleared, half of a structure). Every delta still in the journal was
acknowledged before the rebuild, so it belongs to the state being discarded; ticks are
game-global and only grow, so deltas submitted after the rebuild are all above it.

Player characters that lived in the region are gone with it; their ``players.idx`` entries
are dropped so the runtime places those players at spawn instead of looking for them in a
region that no longer has them. The incident lists them.

**World regeneration** (``streamer regenerate``) drops all dynamic state: every region file,
``players.idx``, every journal segment and the inactive list. The manifest (seed, generator,
params) stays, so the world's structure is unchanged. A ``pre-regenerate`` snapshot is taken
first; files that fail verification cannot go into a (verified) snapshot, so they are moved
to ``quarantine/`` before it, where ``streamer salvage`` can still read them. Deletion starts
with the journal, so a crash part-way leaves regions that are each consistent on their own,
never a journal that would replay into regions that no longer exist.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from typing import Any, Final

import anyio.to_thread
import msgspec

from streamer.coords import CHUNK_SIZE, region_chunks
from streamer.errors import NotFound, StreamerError
from streamer.format.checksum import xxh3
from streamer.format.journal import scan_frames, segment_keys
from streamer.format.manifest import WorldManifest
from streamer.format.region import (
    decode_index,
    decode_region,
    encode_region,
    parse_region_key,
    region_key,
)
from streamer.recovery.inactive import INACTIVE_KEY, load_inactive, reactivate
from streamer.recovery.incidents import IncidentLog
from streamer.recovery.lineage import write_lineage
from streamer.recovery.quarantine import quarantine_copy
from streamer.recovery.snapshots import create_snapshot, list_snapshots
from streamer.runtime.journal_drops import DROPS_KEY
from streamer.schema.codec import ChunkCodec
from streamer.schema.records import ChunkRecord
from streamer.storage.base import BlobStore
from streamer.worldgen import TerrainGenerator, params_from_dict

__all__ = [
    "PLAYERS_KEY",
    "WRITER",
    "RebuildResult",
    "RegenerateResult",
    "journal_high_tick",
    "rebuild_region",
    "regenerate_world",
    "region_in_bounds",
]

log = logging.getLogger(__name__)

WRITER: Final = "streamer-rebuild"
PLAYERS_KEY: Final = "players.idx"
_U64: Final = struct.Struct("<Q")
_PLAYERS_DECODER: Final = msgspec.msgpack.Decoder(dict[str, tuple[int, int]])
_PLAYERS_ENCODER: Final = msgspec.msgpack.Encoder(order="sorted")
_BATCH: Final = 32


class RebuildResult(msgspec.Struct, frozen=True, kw_only=True):
    region: tuple[int, int]
    file: str
    last_processed_tick: int
    generation: int
    #: Chunks that got a record (those with generator defaults).
    chunks: int
    npcs: int
    features: int
    #: Where the previous file went (None: there was none).
    quarantine: str | None
    players_removed: list[str]
    was_inactive: bool
    incident: str


class RegenerateResult(msgspec.Struct, frozen=True, kw_only=True):
    snapshot: str
    #: Files that failed verification, moved to quarantine (key -> quarantine key).
    quarantined: dict[str, str]
    regions_removed: int
    journal_segments_removed: int
    players_removed: int
    inactive_cleared: int
    incident: str


def region_in_bounds(manifest: WorldManifest, rx: int, ry: int) -> bool:
    """Whether any tile of region ``(rx, ry)`` is inside a bounded world (always, unbounded).

    Same rule as the runtime: tiles with ``|x| < bound_tiles`` and ``|y| < bound_tiles``.
    """
    b = manifest.bound_tiles
    if b <= 0:
        return True
    span = manifest.region_size * CHUNK_SIZE
    return all(v * span < b and (v + 1) * span - 1 > -b for v in (rx, ry))


class _TickPeek(msgspec.Struct):
    tick: int


class _BatchPeek(msgspec.Struct):
    # Only the ticks: replay order and routing are the runtime's business, not ours.
    deltas: list[_TickPeek] = msgspec.field(default_factory=list)


_BATCH_PEEK: Final = msgspec.msgpack.Decoder(_BatchPeek)


def _high_tick_blocking(segments: Sequence[bytes]) -> int:
    high = -1
    for data in segments:
        for payload in scan_frames(data).payloads:
            try:
                batch = _BATCH_PEEK.decode(payload)
            except (
                msgspec.DecodeError,
                msgspec.ValidationError,
                UnicodeDecodeError,
                RecursionError,
            ):
                continue  # a frame the runtime would also refuse: it can never replay
            for d in batch.deltas:
                high = max(high, d.tick)
    return high


async def journal_high_tick(store: BlobStore) -> int:
    """The highest tick of any delta still in the journal (-1: none)."""
    keys = segment_keys(await store.list("journal/"))
    blobs: list[bytes] = []
    for i in range(0, len(keys), _BATCH):
        blobs.extend(b.data for b in await store.get_many(keys[i : i + _BATCH]) if b is not None)
    return await anyio.to_thread.run_sync(_high_tick_blocking, blobs)


def _decode_players(data: bytes) -> dict[str, tuple[int, int]] | None:
    # players.idx layout (docs/internals.md): msgpack {player_id: [rx, ry]} + xxh3 trailer.
    if len(data) < _U64.size:
        return None
    body, (stored,) = data[: -_U64.size], _U64.unpack(data[-_U64.size :])
    if xxh3(body) != stored:
        return None
    try:
        return dict(_PLAYERS_DECODER.decode(body))
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError):
        return None


def _encode_players(index: dict[str, tuple[int, int]]) -> bytes:
    body = _PLAYERS_ENCODER.encode(index)
    return body + _U64.pack(xxh3(body))


def _old_state(data: bytes | None, rx: int, ry: int, key: str) -> dict[str, Any]:
    if data is None:
        return {"state": "missing", "last_processed_tick": None, "generation": None}
    try:
        rf = decode_region(data, rx=rx, ry=ry, path=key)
        return {
            "state": "verified",
            "last_processed_tick": rf.header.last_processed_tick,
            "generation": rf.header.generation,
            "chunks": len(rf.chunks),
        }
    except (StreamerError, ValueError) as exc:
        fault = str(exc)
    try:
        idx = decode_index(data, rx=rx, ry=ry, path=key)
    except (StreamerError, ValueError):
        idx = 0
    if isinstance(idx, int):
        return {"state": "damaged", "fault": fault, "last_processed_tick": None, "generation": None}
    return {
        "state": "damaged",
        "fault": fault,
        "last_processed_tick": idx.header.last_processed_tick,
        "generation": idx.header.generation,
    }


def _build_blocking(
    manifest: WorldManifest,
    rx: int,
    ry: int,
    lpt: int,
    generation: int,
    old: bytes | None,
) -> tuple[bytes, int, int, int, dict[str, Any]]:
    """Everything CPU-bound in one hop: read the old header, generate, encode the file."""
    key = region_key(rx, ry)
    old_state = _old_state(old, rx, ry, key)
    gen = TerrainGenerator(manifest.seed, params_from_dict(manifest.generator_params))
    codec = ChunkCodec(manifest.encoding)
    rs = manifest.region_size
    chunks: dict[tuple[int, int], bytes] = {}
    npcs = features = 0
    for cx, cy in region_chunks(rx, ry, rs):
        d = gen.chunk_defaults(cx, cy, rs)
        if not d.npcs and not d.features:
            continue  # pristine: the runtime takes its (empty) defaults from the generator
        rec = ChunkRecord(
            cx=cx,
            cy=cy,
            generator=gen.name,
            generator_version=gen.version,
            base_fingerprint=gen.fingerprint(cx, cy),
            characters=list(d.npcs),
            features=list(d.features),
        )
        chunks[(cx, cy)] = codec.encode(rec)
        npcs += len(d.npcs)
        features += len(d.features)
    lpt = max(lpt, old_state["last_processed_tick"] or -1)
    generation = max(generation, (old_state["generation"] or 0) + 1)
    data = encode_region(
        rx=rx,
        ry=ry,
        last_processed_tick=lpt,
        generation=generation,
        writer=WRITER,
        encoding=manifest.encoding,
        chunks=chunks,
        region_size=rs,
    )
    old_state["new_last_processed_tick"] = lpt
    old_state["new_generation"] = generation
    return data, len(chunks), npcs, features, old_state


async def _recorded_ticks(store: BlobStore, incidents: IncidentLog, key: str) -> int:
    """The highest lastProcessedTick recorded for ``key`` in snapshots and incidents."""
    high = -1
    for info in await list_snapshots(store):
        high = max(high, info.last_processed_tick.get(key, -1))
    for inc in (await incidents.read()).incidents:
        if inc.file != key:
            continue
        for field in ("damaged_last_processed_tick", "snapshot_last_processed_tick"):
            v = inc.details.get(field)
            if isinstance(v, int):
                high = max(high, v)
        damaged = inc.details.get("damaged_file")
        header = damaged.get("header") if isinstance(damaged, dict) else None
        if isinstance(header, dict) and isinstance(header.get("last_processed_tick"), int):
            high = max(high, header["last_processed_tick"])
    return high


async def rebuild_region(
    store: BlobStore,
    manifest: WorldManifest,
    rx: int,
    ry: int,
    *,
    incidents: IncidentLog,
) -> RebuildResult:
    """Reset region ``(rx, ry)`` to the generator's defaults and bring it back into service.

    Precondition: the caller holds the ``WorldLock`` (the world is not open anywhere).

    :raises ValueError: the region is outside a bounded world.
    :raises IntegrityError: ``state/inactive.json`` is damaged (``check --repair`` first).
    :raises StorageError: a write failed; the previous file is in quarantine if it was
        already copied, and the region stays inactive until a rebuild completes.
    """
    if not region_in_bounds(manifest, rx, ry):
        raise ValueError(
            f"region ({rx}, {ry}) is outside this world (bounded to |x|, |y| < "
            f"{manifest.bound_tiles} tiles, {manifest.region_size * CHUNK_SIZE} tiles per region)"
        )
    region = (rx, ry)
    key = region_key(rx, ry)
    was = (await load_inactive(store)).get(region)
    try:
        old: bytes | None = (await store.get(key)).data
    except NotFound:
        old = None
    lpt = max(await journal_high_tick(store), await _recorded_ticks(store, incidents, key))
    data, nchunks, npcs, features, old_state = await anyio.to_thread.run_sync(
        _build_blocking, manifest, rx, ry, lpt, 1, old
    )
    qkey = await quarantine_copy(store, key) if old is not None else None
    await store.put_atomic(key, data)
    removed = await _drop_players(store, {region})
    inc = await incidents.record(
        "region_rebuilt",
        region=region,
        file=key,
        details={
            "previous_file": old_state,
            "quarantine": qkey,
            "last_processed_tick": old_state["new_last_processed_tick"],
            "generation": old_state["new_generation"],
            "chunks_with_defaults": nchunks,
            "npcs": npcs,
            "features": features,
            "players_removed": removed,
            "was_inactive": was is not None,
            "inactive_incident": None if was is None else was.incident,
        },
        action=(
            f"region {region} reset to generator defaults ({npcs} NPCs, {features} features); "
            "all dynamic state cleared"
            + (f"; previous file kept in {qkey}" if qkey else "")
            + (f"; players {removed} respawn at the spawn point" if removed else "")
        ),
    )
    # Last: the region serves again only once the rebuild is durable and recorded.
    await reactivate(store, rx, ry)
    log.warning(
        "%s: rebuilt from generator defaults (%d NPCs, %d features, tick %d); incident %s",
        key,
        npcs,
        features,
        old_state["new_last_processed_tick"],
        inc.id,
    )
    return RebuildResult(
        region=region,
        file=key,
        last_processed_tick=old_state["new_last_processed_tick"],
        generation=old_state["new_generation"],
        chunks=nchunks,
        npcs=npcs,
        features=features,
        quarantine=qkey,
        players_removed=removed,
        was_inactive=was is not None,
        incident=inc.id,
    )


async def _drop_players(store: BlobStore, regions: set[tuple[int, int]] | None) -> list[str]:
    """Remove players placed in ``regions`` (None: all) from ``players.idx``; their ids."""
    try:
        blob = await store.get(PLAYERS_KEY)
    except NotFound:
        return []
    index = _decode_players(blob.data)
    if index is None:
        # A damaged hint: the runtime already ignores it and rebuilds it by scanning.
        await store.delete(PLAYERS_KEY)
        return []
    gone = sorted(p for p, r in index.items() if regions is None or r in regions)
    if not gone:
        return []
    keep = {p: r for p, r in index.items() if p not in gone}
    if keep:
        await store.put_atomic(PLAYERS_KEY, _encode_players(keep))
    else:
        await store.delete(PLAYERS_KEY)
    return gone


def _bad_regions_blocking(items: Sequence[tuple[str, bytes]]) -> dict[str, str]:
    bad: dict[str, str] = {}
    for key, data in items:
        coords = parse_region_key(key)
        if coords is None:
            continue
        try:
            decode_region(data, rx=coords[0], ry=coords[1], path=key)
        except (StreamerError, ValueError) as exc:
            bad[key] = str(exc)
    return bad


def _is_region(key: str) -> bool:
    coords = parse_region_key(key)
    return coords is not None and region_key(*coords) == key


async def regenerate_world(
    store: BlobStore,
    manifest: WorldManifest,
    *,
    incidents: IncidentLog,
    keep: int = 5,
) -> RegenerateResult:
    """Drop every piece of dynamic state; the world regenerates from its seed.

    Precondition: the caller holds the ``WorldLock``.

    :raises SnapshotError: the pre-regenerate snapshot could not be taken; nothing was
        deleted.
    :raises StorageError: a deletion failed part-way; run it again to finish.
    """
    regions = [k for k in await store.list("regions/") if _is_region(k)]
    quarantined: dict[str, str] = {}
    for i in range(0, len(regions), _BATCH):
        batch = regions[i : i + _BATCH]
        items = [
            (k, b.data)
            for k, b in zip(batch, await store.get_many(batch), strict=True)
            if b is not None
        ]
        bad = await anyio.to_thread.run_sync(_bad_regions_blocking, items)
        for key in sorted(bad):
            # A verified snapshot refuses damaged files: set them aside first, so the
            # snapshot can hold everything else and salvage can still read these.
            quarantined[key] = await quarantine_copy(store, key)
            await store.delete(key)
    # Damaged journal segments are copied as-is into the snapshot (it verifies regions and
    # the manifest only), so nothing else needs setting aside.
    snap = await create_snapshot(store, keep=keep, reason="pre-regenerate")
    # Before anything is dropped: the regenerated world descends from no snapshot, so the
    # recovery ladder must never bring back a region of the state given up here.
    await write_lineage(store, [])
    # Ticks start over with the regions: what the old journal dropped says nothing about
    # the new world, and would report losses that never happened (a new epoch begins at
    # the next open). Before anything is dropped, so a crash in between leaves no old
    # record beside new ticks (without one, a restore reports "unknown", never a wrong loss).
    await store.delete(DROPS_KEY)

    journal = segment_keys(await store.list("journal/"))
    for key in journal:
        await store.delete(key)
    players = await _drop_players(store, None)
    regions = [k for k in await store.list("regions/") if _is_region(k)]
    for key in regions:
        await store.delete(key)
    cleared = len(await load_inactive_quiet(store))
    await store.delete(INACTIVE_KEY)
    inc = await incidents.record(
        "world_regenerated",
        details={
            "snapshot": snap.id,
            "quarantined": quarantined,
            "regions_removed": len(regions) + len(quarantined),
            "journal_segments_removed": len(journal),
            "players_removed": len(players),
            "inactive_cleared": cleared,
            "seed": manifest.seed,
            "generator": f"{manifest.generator} v{manifest.generator_version}",
        },
        action=(
            f"world regenerated from seed {manifest.seed}: all dynamic state dropped; the "
            f"previous world is snapshot {snap.id} (`streamer restore` brings it back)"
            + (
                f"; damaged files kept in quarantine: {sorted(quarantined.values())}"
                if quarantined
                else ""
            )
            + "; notify players"
        ),
    )
    log.warning(
        "world regenerated from seed %d; previous state in snapshot %s", manifest.seed, snap.id
    )
    return RegenerateResult(
        snapshot=snap.id,
        quarantined=quarantined,
        regions_removed=len(regions) + len(quarantined),
        journal_segments_removed=len(journal),
        players_removed=len(players),
        inactive_cleared=cleared,
        incident=inc.id,
    )


async def load_inactive_quiet(store: BlobStore) -> dict[tuple[int, int], Any]:
    """The inactive list, or empty if it is damaged (regenerate clears it either way)."""
    try:
        return dict(await load_inactive(store))
    except StreamerError:
        return {}
