"""Every record and delta type survives encode → decode unchanged, in msgpack and JSON.

The strategies here are shared with ``test_codec.py``.
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamer.schema import ChunkCodec, pack_tiles
from streamer.schema.deltas import (
    AnyDelta,
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
from streamer.schema.records import (
    Character,
    ChunkRecord,
    Feature,
    ItemStack,
    Society,
    Structure,
)

ENCODINGS = ["msgpack", "json"]

i64 = st.integers(-(2**63), 2**63 - 1)
small = st.integers(-(2**31), 2**31 - 1)
ids = st.text(max_size=12)
opt_ids = st.none() | ids

item_stacks = st.builds(ItemStack, item=st.text(max_size=8), count=small)

characters = st.builds(
    Character,
    id=ids,
    x=i64,
    y=i64,
    player_id=opt_ids,
    given_name=st.text(max_size=10),
    family_name=st.text(max_size=10),
    hp=small,
    inventory=st.lists(item_stacks, max_size=4),
    society_id=opt_ids,
)
structures = st.builds(
    Structure,
    id=ids,
    kind=st.text(max_size=8),
    x=i64,
    y=i64,
    w=small,
    h=small,
    owner=opt_ids,
    hp=small,
)
features = st.builds(Feature, id=ids, kind=st.text(max_size=8), x=i64, y=i64, amount=small)
societies = st.builds(
    Society,
    id=ids,
    name=st.text(max_size=10),
    x=i64,
    y=i64,
    members=st.lists(ids, max_size=4),
    relations=st.dictionaries(ids, small, max_size=4),
)


@st.composite
def packed_tiles(draw: st.DrawFn, max_size: int = 300) -> tuple[bytes, bytes]:
    idx = sorted(draw(st.sets(st.integers(0, 4095), max_size=max_size)))
    val = draw(st.lists(st.integers(0, 0xFFFF), min_size=len(idx), max_size=len(idx)))
    return pack_tiles(np.array(idx, dtype=np.int64), np.array(val, dtype=np.int64))


@st.composite
def chunks(draw: st.DrawFn) -> ChunkRecord:
    tile_idx, tile_val = draw(packed_tiles())
    return ChunkRecord(
        cx=draw(small),
        cy=draw(small),
        generator=draw(st.text(max_size=8)),
        generator_version=draw(small),
        base_fingerprint=draw(st.integers(0, 2**64 - 1)),
        tile_idx=tile_idx,
        tile_val=tile_val,
        characters=draw(st.lists(characters, max_size=3)),
        structures=draw(st.lists(structures, max_size=3)),
        features=draw(st.lists(features, max_size=3)),
        societies=draw(st.lists(societies, max_size=2)),
    )


def expected_record_versions(rec: ChunkRecord) -> dict[str, int]:
    out: dict[str, int] = {}
    for tag, items in (
        ("character", rec.characters),
        ("structure", rec.structures),
        ("feature", rec.features),
        ("society", rec.societies),
    ):
        if items:
            out[tag] = min(r.schemaVersion for r in items)
    return out


deltas: st.SearchStrategy[Any] = st.one_of(
    st.builds(TileSet, tick=i64, x=i64, y=i64, tile=st.integers(0, 0xFFFF)),
    st.builds(EntityUpsert, tick=i64, character=characters),
    st.builds(EntityRemove, tick=i64, entity_id=ids, x=i64, y=i64),
    st.builds(EntityMove, tick=i64, entity_id=ids, from_x=i64, from_y=i64, to_x=i64, to_y=i64),
    st.builds(FeatureAdd, tick=i64, feature=features),
    st.builds(FeatureRemove, tick=i64, feature_id=ids, x=i64, y=i64),
    st.builds(StructureUpsert, tick=i64, structure=structures),
    st.builds(StructureRemove, tick=i64, structure_id=ids, x=i64, y=i64),
    st.builds(SocietyUpdate, tick=i64, society=societies),
)

AnyRecord = Character | Structure | Feature | Society | ChunkRecord


def _roundtrip(encoding: str, value: Any, typ: Any) -> Any:
    if encoding == "msgpack":
        return msgspec.msgpack.Decoder(typ).decode(msgspec.msgpack.Encoder().encode(value))
    return msgspec.json.Decoder(typ).decode(msgspec.json.Encoder().encode(value))


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize(
    ("typ", "strategy"),
    [
        (Character, characters),
        (Structure, structures),
        (Feature, features),
        (Society, societies),
        (ChunkRecord, chunks()),
    ],
    ids=["character", "structure", "feature", "society", "chunk"],
)
@settings(deadline=None, max_examples=50)
@given(data=st.data())
def test_record_roundtrip(encoding: str, typ: Any, strategy: Any, data: st.DataObject) -> None:
    rec = data.draw(strategy)
    assert _roundtrip(encoding, rec, typ) == rec
    # Through the tagged union too: `type` alone must pick the right class.
    back = _roundtrip(encoding, rec, AnyRecord)
    assert type(back) is typ
    assert back == rec


@pytest.mark.parametrize("encoding", ENCODINGS)
@settings(deadline=None)
@given(rec=chunks())
def test_chunk_roundtrip_through_codec(encoding: Any, rec: ChunkRecord) -> None:
    codec = ChunkCodec(encoding)
    decoded = codec.decode(codec.encode(rec), where="test")
    assert decoded.upgraded is False
    assert decoded.record == msgspec.structs.replace(
        rec, record_versions=expected_record_versions(rec)
    )
    # Raw path agrees with the typed one.
    raw = codec.decode_raw(codec.encode(rec), where="test")
    assert codec.decode(codec.encode_raw(raw), where="test").record == decoded.record


@pytest.mark.parametrize("encoding", ENCODINGS)
@settings(deadline=None)
@given(delta=deltas)
def test_delta_roundtrip(encoding: str, delta: Any) -> None:
    assert _roundtrip(encoding, delta, AnyDelta) == delta


@pytest.mark.parametrize("encoding", ENCODINGS)
@settings(deadline=None, max_examples=30)
@given(batch=st.lists(deltas, max_size=8))
def test_delta_batch_roundtrip(encoding: str, batch: list[Any]) -> None:
    assert _roundtrip(encoding, batch, list[AnyDelta]) == batch
