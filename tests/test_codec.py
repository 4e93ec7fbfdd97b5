"""ChunkCodec: fast and slow decode paths, errors at the boundary, packed tiles."""

from __future__ import annotations

import random
from typing import Any

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamer.errors import MalformedFile, MigrationFailed, StreamerError, UnknownSchemaVersion
from streamer.schema import ChunkCodec, apply_tiles, pack_tiles, unpack_tiles
from streamer.schema.migrations import REGISTRY
from streamer.schema.records import (
    Character,
    ChunkRecord,
    Feature,
    ItemStack,
    Society,
    Structure,
)
from tests.test_records_roundtrip import chunks

ENCODINGS = ["msgpack", "json"]
WHERE = "regions/r.0.0.region#chunk(3,-4)"


def _encode_plain(encoding: str, obj: Any) -> bytes:
    """Encode without the codec, to build payloads the codec would never write itself."""
    if encoding == "msgpack":
        return msgspec.msgpack.encode(obj)
    return msgspec.json.encode(obj)


def _sample_chunk() -> ChunkRecord:
    idx = np.arange(0, 4000, 20)
    ti, tv = pack_tiles(idx, idx * 3 % 65536)
    return ChunkRecord(
        cx=3,
        cy=-4,
        generator="default",
        generator_version=2,
        base_fingerprint=2**64 - 1,
        tile_idx=ti,
        tile_val=tv,
        characters=[Character(id="c1", x=200, y=-250, given_name="Bo")],
        structures=[Structure(id="s1", kind="hut", x=201, y=-251)],
        features=[Feature(id="f1", kind="tree", x=202, y=-252, amount=4)],
        societies=[Society(id="so1", name="Guild", x=203, y=-253, relations={"so2": 5})],
    )


def _old_chunk_raw(codec: ChunkCodec) -> dict[str, Any]:
    """A stored chunk holding a v1 character, a v2 character and a v1 society."""
    raw = codec.decode_raw(codec.encode(_sample_chunk()), where=WHERE)
    raw["characters"] = [
        {
            "type": "character",
            "schemaVersion": 1,
            "id": "old1",
            "x": 1,
            "y": 2,
            "name": "Ada Lovelace",
            "inventory": {"wood": 3, "axe": 1, "lint": 0},
        },
        {
            "type": "character",
            "schemaVersion": 2,
            "id": "old2",
            "x": 3,
            "y": 4,
            "given_name": "Cy",
            "family_name": "",
            "inventory": {"gem": 2},
        },
    ]
    raw["societies"] = [
        {"type": "society", "schemaVersion": 1, "id": "so1", "name": "G", "x": 0, "y": 0,
         "members": ["old1"], "allies": ["so2"]},
    ]  # fmt: skip
    raw["record_versions"] = {"character": 1, "structure": 1, "feature": 1, "society": 1}
    return raw


@pytest.fixture(params=ENCODINGS)
def codec(request: pytest.FixtureRequest) -> ChunkCodec:
    return ChunkCodec(request.param)


def _forbid_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the registry must not be consulted on the fast path")

    monkeypatch.setattr(REGISTRY, "upgrade_chunk", boom)
    monkeypatch.setattr(REGISTRY, "upgrade", boom)


# -- fast path --------------------------------------------------------------------------


def test_fast_path_for_current_chunk(codec: ChunkCodec, monkeypatch: pytest.MonkeyPatch) -> None:
    rec = _sample_chunk()
    payload = codec.encode(rec)
    _forbid_registry(monkeypatch)
    decoded = codec.decode(payload, where=WHERE)
    assert decoded.upgraded is False
    assert decoded.record == msgspec.structs.replace(
        rec, record_versions={"character": 3, "structure": 1, "feature": 1, "society": 2}
    )


def test_encode_fills_record_versions_without_mutating(codec: ChunkCodec) -> None:
    rec = _sample_chunk()
    raw = codec.decode_raw(codec.encode(rec), where=WHERE)
    assert raw["record_versions"] == {"character": 3, "structure": 1, "feature": 1, "society": 2}
    assert rec.record_versions == {}
    empty = ChunkRecord(cx=0, cy=0, generator="g", generator_version=1, base_fingerprint=0)
    assert codec.decode_raw(codec.encode(empty), where=WHERE)["record_versions"] == {}


# -- slow path --------------------------------------------------------------------------


def _check_upgraded(rec: ChunkRecord) -> None:
    assert [c.id for c in rec.characters] == ["old1", "old2"]
    c1, c2 = rec.characters
    assert (c1.schemaVersion, c1.given_name, c1.family_name) == (3, "Ada", "Lovelace")
    assert c1.inventory == [ItemStack("axe", 1), ItemStack("wood", 3)]
    assert (c2.schemaVersion, c2.given_name, c2.inventory) == (3, "Cy", [ItemStack("gem", 2)])
    assert rec.societies == [
        Society(id="so1", name="G", x=0, y=0, members=["old1"], relations={"so2": 100})
    ]
    assert rec.record_versions == {"character": 3, "structure": 1, "feature": 1, "society": 2}
    # Untouched parts survive the slow path intact, bytes included (base64 in JSON).
    sample = _sample_chunk()
    assert (rec.tile_idx, rec.tile_val) == (sample.tile_idx, sample.tile_val)
    assert rec.structures == sample.structures
    assert rec.base_fingerprint == 2**64 - 1


def test_slow_path_upgrades_old_nested_records(codec: ChunkCodec) -> None:
    payload = _encode_plain(codec.encoding, _old_chunk_raw(codec))
    decoded = codec.decode(payload, where=WHERE)
    assert decoded.upgraded is True
    _check_upgraded(decoded.record)
    # Written back, it is current and takes the fast path.
    again = codec.decode(codec.encode(decoded.record), where=WHERE)
    assert again.upgraded is False
    assert again.record == decoded.record


def test_lying_record_versions_still_upgrades(codec: ChunkCodec) -> None:
    # record_versions claims everything is current; the nested versions say otherwise. A typed
    # decode would silently drop `allies`: the post-check must send this to the slow path.
    raw = _old_chunk_raw(codec)
    raw["record_versions"] = {"character": 3, "structure": 1, "feature": 1, "society": 2}
    decoded = codec.decode(_encode_plain(codec.encoding, raw), where=WHERE)
    assert decoded.upgraded is True
    _check_upgraded(decoded.record)


def test_missing_record_versions_still_upgrades(codec: ChunkCodec) -> None:
    raw = _old_chunk_raw(codec)
    del raw["record_versions"]
    decoded = codec.decode(_encode_plain(codec.encoding, raw), where=WHERE)
    assert decoded.upgraded is True
    _check_upgraded(decoded.record)


def test_stale_record_versions_is_reported_for_rewrite(codec: ChunkCodec) -> None:
    raw = codec.decode_raw(codec.encode(_sample_chunk()), where=WHERE)
    raw["record_versions"]["character"] = 1
    decoded = codec.decode(_encode_plain(codec.encoding, raw), where=WHERE)
    assert decoded.upgraded is True
    assert decoded.record.record_versions["character"] == 3
    assert decoded.record.characters == _sample_chunk().characters


def test_raw_helpers(codec: ChunkCodec) -> None:
    raw = _old_chunk_raw(codec)
    up, changed = REGISTRY.upgrade_chunk(raw, where=WHERE)
    assert changed
    payload = codec.encode_raw(up, where=WHERE)
    decoded = codec.decode(payload, where=WHERE)
    assert decoded.upgraded is False
    _check_upgraded(decoded.record)
    # encode_raw never writes old records: it upgrades them first.
    assert codec.decode(codec.encode_raw(raw), where=WHERE).record == decoded.record
    with pytest.raises(MalformedFile, match="invalid chunk record"):
        codec.encode_raw(dict(up, cx="three"), where=WHERE)


# -- errors -----------------------------------------------------------------------------


def test_newer_chunk_is_refused(codec: ChunkCodec) -> None:
    raw = codec.decode_raw(codec.encode(_sample_chunk()), where=WHERE)
    raw["schemaVersion"] = 2
    with pytest.raises(UnknownSchemaVersion) as ei:
        codec.decode(_encode_plain(codec.encoding, raw), where=WHERE)
    assert ei.value.where == WHERE
    assert ei.value.schema_version == 2


def test_newer_nested_record_is_refused(codec: ChunkCodec) -> None:
    raw = codec.decode_raw(codec.encode(_sample_chunk()), where=WHERE)
    raw["characters"][0]["schemaVersion"] = 4
    raw["characters"][0]["shiny_new_field"] = 1
    with pytest.raises(UnknownSchemaVersion) as ei:
        codec.decode(_encode_plain(codec.encoding, raw), where=WHERE)
    assert (ei.value.record_id, ei.value.record_type) == ("c1", "character")


def test_unknown_nested_type_in_record_versions_is_refused(codec: ChunkCodec) -> None:
    raw = codec.decode_raw(codec.encode(_sample_chunk()), where=WHERE)
    raw["record_versions"]["vehicle"] = 1
    raw["vehicles"] = [{"type": "vehicle", "schemaVersion": 1, "id": "v"}]
    with pytest.raises(UnknownSchemaVersion, match="vehicle"):
        codec.decode(_encode_plain(codec.encoding, raw), where=WHERE)


def test_failed_migration_names_record(codec: ChunkCodec) -> None:
    raw = _old_chunk_raw(codec)
    raw["characters"][0]["name"] = 12
    with pytest.raises(MigrationFailed) as ei:
        codec.decode(_encode_plain(codec.encoding, raw), where=WHERE)
    err = ei.value
    assert (err.record_id, err.record_type, err.schema_version) == ("old1", "character", 1)
    assert err.where == WHERE


def _valid_raw(codec: ChunkCodec) -> dict[str, Any]:
    return codec.decode_raw(codec.encode(_sample_chunk()), where=WHERE)


MALFORMED_RAW: list[tuple[str, Any]] = [
    ("not a map", [1, 2, 3]),
    ("scalar", 7),
    ("wrong tag", {"type": "region", "schemaVersion": 1}),
    ("no version", {"type": "chunk"}),
    ("missing fields", {"type": "chunk", "schemaVersion": 1}),
    ("unequal tiles", "unequal"),
    ("odd tiles", "odd"),
    ("wrong field type", "cx"),
    ("nested junk", "nested"),
]


@pytest.mark.parametrize(("label", "obj"), MALFORMED_RAW, ids=[m[0] for m in MALFORMED_RAW])
def test_malformed_payloads(codec: ChunkCodec, label: str, obj: Any) -> None:
    if obj == "unequal":
        # bytes values: msgspec writes them as bin (msgpack) or base64 text (JSON).
        obj = dict(_valid_raw(codec), tile_val=b"\x00\x00")
    elif obj == "odd":
        obj = dict(_valid_raw(codec), tile_idx=b"\x00", tile_val=b"\x00")
    elif obj == "cx":
        obj = dict(_valid_raw(codec), cx="three")
    elif obj == "nested":
        obj = dict(_valid_raw(codec), features=[{"type": "feature", "schemaVersion": 1}])
    with pytest.raises(MalformedFile) as ei:
        codec.decode(_encode_plain(codec.encoding, obj), where=WHERE)
    assert ei.value.path == WHERE
    assert WHERE in str(ei.value)


@pytest.mark.parametrize("payload", [b"", b"\xc1", b"{", b"\x81\xa4type", b"null", b"\xff" * 9])
def test_garbage_bytes(codec: ChunkCodec, payload: bytes) -> None:
    with pytest.raises(MalformedFile, match=r"regions/r\.0\.0\.region"):
        codec.decode(payload, where=WHERE)


def test_deep_nesting(codec: ChunkCodec) -> None:
    # Deeper than msgspec will decode: MalformedFile, not RecursionError.
    bomb = b"\x91" * 100_000 + b"\x00" if codec.encoding == "msgpack" else b"[" * 100_000
    with pytest.raises(MalformedFile):
        codec.decode(bomb, where=WHERE)
    # Deep but decodable junk inside an old record still migrates (the copy before the steps
    # must not be the weak link).
    deep: Any = 0
    for _ in range(900):
        deep = [deep]
    raw = _old_chunk_raw(codec)
    raw["characters"][0]["junk"] = deep
    assert codec.decode(_encode_plain(codec.encoding, raw), where=WHERE).upgraded


def test_unknown_encoding() -> None:
    with pytest.raises(ValueError, match="unknown encoding"):
        ChunkCodec("xml")  # type: ignore[arg-type]


def test_encode_refuses_bad_tiles(codec: ChunkCodec) -> None:
    rec = msgspec.structs.replace(_sample_chunk(), tile_val=b"\x00")
    with pytest.raises(ValueError, match="even lengths"):
        codec.encode(rec)


# -- fuzz: only StreamerError may escape decode -----------------------------------------


def _decode_must_only_raise_ours(codec: ChunkCodec, payload: bytes) -> None:
    try:
        decoded = codec.decode(payload, where=WHERE)
    except StreamerError:
        return
    assert isinstance(decoded.record, ChunkRecord)


@pytest.mark.parametrize("encoding", ENCODINGS)
@settings(deadline=None, max_examples=300)
@given(payload=st.binary(max_size=512))
def test_fuzz_random_bytes(encoding: Any, payload: bytes) -> None:
    _decode_must_only_raise_ours(ChunkCodec(encoding), payload)


@pytest.mark.parametrize("encoding", ENCODINGS)
@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_mutated_payloads(encoding: Any, data: st.DataObject) -> None:
    codec = ChunkCodec(encoding)
    base = data.draw(st.sampled_from([codec.encode(_sample_chunk()), _old_payload(encoding)]))
    buf = bytearray(base)
    for _ in range(data.draw(st.integers(1, 8))):
        op = data.draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        pos = data.draw(st.integers(0, max(len(buf) - 1, 0)))
        if op == "flip" and buf:
            buf[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set" and buf:
            buf[pos] = data.draw(st.integers(0, 255))
        elif op == "insert":
            buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=4))
        elif op == "delete" and buf:
            del buf[pos : pos + data.draw(st.integers(1, 4))]
        elif op == "truncate":
            del buf[pos:]
    _decode_must_only_raise_ours(codec, bytes(buf))


def _old_payload(encoding: Any) -> bytes:
    codec = ChunkCodec(encoding)
    return _encode_plain(encoding, _old_chunk_raw(codec))


# Plain data shaped roughly like records, with junk anywhere: exercises the registry and the
# migration steps on inputs a bit flip would never reach (wrong types, giant ints, deep lists).
junk = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=6)
    | st.binary(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
versions = st.integers(-1, 5) | st.just(10**4000) | junk
record_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["character", "society", "feature", "structure", "chunk", "x"])},
    optional={
        "schemaVersion": versions,
        "id": st.text(max_size=4) | junk,
        "x": st.integers(-5, 5),
        "y": st.integers(-5, 5),
        "name": st.text(max_size=8) | junk,
        "kind": st.text(max_size=4),
        "inventory": st.dictionaries(st.text(max_size=4), st.integers(-3, 3) | junk) | junk,
        "allies": st.lists(st.text(max_size=4)) | junk,
        "members": st.lists(st.text(max_size=4)),
    },
)
chunk_like = st.fixed_dictionaries(
    {"type": st.just("chunk") | junk, "schemaVersion": versions},
    optional={
        "cx": st.integers(-5, 5) | junk,
        "cy": st.integers(-5, 5),
        "generator": st.text(max_size=4),
        "generator_version": st.integers(0, 3),
        "base_fingerprint": st.integers(0, 2**64 - 1),
        "tile_idx": st.binary(max_size=8),
        "tile_val": st.binary(max_size=8),
        "characters": st.lists(record_like, max_size=3) | junk,
        "structures": st.lists(record_like, max_size=2),
        "features": st.lists(record_like, max_size=2),
        "societies": st.lists(record_like, max_size=2) | junk,
        "record_versions": st.dictionaries(st.sampled_from(["character", "society", "q"]), versions)
        | junk,
    },
)


@pytest.mark.parametrize("encoding", ENCODINGS)
@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(obj=chunk_like)
def test_fuzz_structured(encoding: Any, obj: dict[str, Any]) -> None:
    codec = ChunkCodec(encoding)
    try:
        payload = _encode_plain(encoding, obj)
    except (OverflowError, TypeError, ValueError):
        return  # not representable in this encoding (e.g. NaN or a huge int in msgpack)
    _decode_must_only_raise_ours(codec, payload)


@pytest.mark.parametrize("encoding", ENCODINGS)
@settings(deadline=None, max_examples=30)
@given(rec=chunks())
def test_fuzz_valid_chunks_roundtrip_fast(encoding: Any, rec: ChunkRecord) -> None:
    codec = ChunkCodec(encoding)
    assert codec.decode(codec.encode(rec), where=WHERE).upgraded is False


@pytest.mark.slow
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_fuzz_mutations_torture(encoding: Any) -> None:
    """100k random mutations per encoding (run with --torture)."""
    codec = ChunkCodec(encoding)
    bases = [codec.encode(_sample_chunk()), _old_payload(encoding)]
    rnd = random.Random(20240601)
    for _ in range(100_000):
        buf = bytearray(rnd.choice(bases))
        for _ in range(rnd.randint(1, 6)):
            pos = rnd.randrange(len(buf)) if buf else 0
            op = rnd.random()
            if op < 0.4 and buf:
                buf[pos] = rnd.randrange(256)
            elif op < 0.6 and buf:
                buf[pos] ^= 1 << rnd.randrange(8)
            elif op < 0.8:
                buf[pos:pos] = rnd.randbytes(rnd.randint(1, 3))
            elif buf:
                del buf[pos : pos + rnd.randint(1, 4)]
        _decode_must_only_raise_ours(codec, bytes(buf))


# -- packed tiles -----------------------------------------------------------------------


def test_pack_unpack_apply() -> None:
    idx = np.array([0, 5, 64, 4095])
    val = np.array([7, 65535, 1, 2])
    ib, vb = pack_tiles(idx, val)
    assert len(ib) == len(vb) == 8
    assert ib[:4] == b"\x00\x00\x05\x00"  # little-endian uint16
    i, v = unpack_tiles(ib, vb, where=WHERE)
    assert i.dtype == np.dtype("<u2")
    assert list(i) == [0, 5, 64, 4095]
    assert list(v) == [7, 65535, 1, 2]
    assert not i.flags.writeable
    base = np.arange(4096, dtype=np.uint16).reshape(64, 64)
    base_copy = base.copy()
    out = apply_tiles(base, i, v)
    assert not out.flags.writeable
    assert np.array_equal(base, base_copy)
    assert (out[0, 0], out[0, 5], out[1, 0], out[63, 63]) == (7, 65535, 1, 2)
    assert out[0, 1] == 1


def test_pack_empty() -> None:
    assert pack_tiles(np.array([], dtype=np.int64), np.array([], dtype=np.int64)) == (b"", b"")
    i, v = unpack_tiles(b"", b"", where=WHERE)
    assert i.size == v.size == 0


@pytest.mark.parametrize(
    ("idx", "val", "match"),
    [
        ([1, 1], [0, 0], "sorted and unique"),
        ([2, 1], [0, 0], "sorted and unique"),
        ([4096], [0], "out of range"),
        ([-1], [0], "out of range"),
        ([1, 2], [0], "equal length"),
        ([[1]], [[1]], "1-D"),
        ([1], [65536], "uint16"),
        ([1], [-1], "uint16"),
        ([1.0], [1.0], "integers"),
    ],
)
def test_pack_validation(idx: Any, val: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pack_tiles(np.array(idx), np.array(val))


@pytest.mark.parametrize(
    ("ib", "vb", "match"),
    [
        (b"\x01\x00", b"\x01\x00\x02\x00", "equal, even"),
        (b"\x01", b"\x01", "equal, even"),
        (b"\x00\x10", b"\x00\x00", "outside the chunk"),  # 4096
        (b"\x02\x00\x01\x00", b"\x00\x00\x00\x00", "sorted and unique"),
        (b"\x01\x00\x01\x00", b"\x00\x00\x00\x00", "sorted and unique"),
    ],
)
def test_unpack_validation(ib: bytes, vb: bytes, match: str) -> None:
    with pytest.raises(MalformedFile, match=match) as ei:
        unpack_tiles(ib, vb, where=WHERE)
    assert ei.value.path == WHERE


def test_apply_validation() -> None:
    idx = np.array([1], dtype=np.uint16)
    with pytest.raises(ValueError, match="64x64"):
        apply_tiles(np.zeros((32, 32), dtype=np.uint16), idx, idx)
    with pytest.raises(ValueError, match="equal length"):
        apply_tiles(np.zeros((64, 64), dtype=np.uint16), idx, np.array([1, 2], dtype=np.uint16))
    with pytest.raises(ValueError, match="out of range"):
        big = np.array([4096], dtype=np.uint16)
        apply_tiles(np.zeros((64, 64), dtype=np.uint16), big, idx)


@settings(deadline=None)
@given(
    overrides=st.dictionaries(st.integers(0, 4095), st.integers(0, 0xFFFF), max_size=300),
    seed=st.integers(0, 2**32 - 1),
)
def test_tiles_property(overrides: dict[int, int], seed: int) -> None:
    keys = sorted(overrides)
    ib, vb = pack_tiles(np.array(keys, dtype=np.int64), np.array([overrides[k] for k in keys]))
    i, v = unpack_tiles(ib, vb, where=WHERE)
    base = np.random.default_rng(seed).integers(0, 65536, (64, 64), dtype=np.uint16)
    out = apply_tiles(base, i, v)
    expected = base.copy()
    for k, t in overrides.items():
        expected[k // 64, k % 64] = t
    assert np.array_equal(out, expected)


def _screened(encoding: str, *chars: Character) -> tuple[ChunkCodec, ChunkRecord, dict[str, Any]]:
    """A codec, a current chunk holding ``chars``, and that chunk as plain data to alter."""
    codec = ChunkCodec(encoding)  # type: ignore[arg-type]
    rec = ChunkRecord(
        cx=0, cy=0, generator="g", generator_version=1, base_fingerprint=1, characters=list(chars)
    )
    raw = msgspec.to_builtins(rec, builtin_types=(bytes,) if encoding == "msgpack" else ())
    return codec, rec, raw


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
def test_refuse_unknown_versions_sees_a_newer_record_behind_current_ones(encoding: str) -> None:
    """``record_versions`` holds minimums, so a v99 record beside a v3 one must be found by
    looking at every record, which the screening peek does."""
    from streamer.schema.records import CURRENT_VERSIONS

    codec, rec, raw = _screened(encoding, Character(id="now", x=1, y=1))
    assert codec.refuse_unknown_versions(codec.encode(rec), where="w") is True  # current
    future = dict(raw["characters"][0], id="later", schemaVersion=99)
    raw["characters"].append(future)
    raw["record_versions"] = {"character": CURRENT_VERSIONS["character"]}
    enc = msgspec.msgpack.encode if encoding == "msgpack" else msgspec.json.encode
    with pytest.raises(UnknownSchemaVersion) as info:
        codec.refuse_unknown_versions(enc(raw), where="regions/r.0.0.region chunk (0, 0)")
    assert (info.value.record_id, info.value.schema_version) == ("later", 99)
    assert "regions/r.0.0.region" in str(info.value)
    # A malformed record_versions (decode() would call the chunk malformed) hides nothing.
    raw["record_versions"] = {"character": "three"}
    with pytest.raises(UnknownSchemaVersion):
        codec.refuse_unknown_versions(enc(raw), where="w")
    # decode() reports garbage; here it is only "not known current".
    assert codec.refuse_unknown_versions(b"\xff garbage", where="w") is False


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
def test_refuse_unknown_versions_tells_whether_decode_would_upgrade(encoding: str) -> None:
    """Its answer is what ``decode`` does: True exactly when nothing would be upgraded (the
    region loader trusts it to skip a flush's upgrade check)."""
    from streamer.schema.records import CURRENT_VERSIONS

    codec, _, raw = _screened(encoding, Character(id="a", x=1, y=1), Character(id="b", x=2, y=1))
    enc = msgspec.msgpack.encode if encoding == "msgpack" else msgspec.json.encode
    old_char = CURRENT_VERSIONS["character"] - 1
    variants = {
        "current": raw,
        "old chunk": dict(raw, schemaVersion=raw["schemaVersion"] - 1),
        "one old record": dict(
            raw,
            characters=[raw["characters"][0], dict(raw["characters"][1], schemaVersion=old_char)],
        ),
        "old record_versions": dict(raw, record_versions={"character": old_char}),
        "not a chunk": dict(raw, type="society"),
    }
    said_current = set()
    for name, variant in variants.items():
        payload = enc(variant)
        try:
            upgraded = codec.decode(payload, where="w").upgraded
        except StreamerError:
            upgraded = True  # not decodable as current either
        answer = codec.refuse_unknown_versions(payload, where="w")
        assert answer is (not upgraded), name
        if answer:
            said_current.add(name)
    assert said_current == {"current"}
