"""The region-load screen refuses what ``decode`` would refuse as from a newer release,
``record_versions`` included (review: /tmp/review_mig/screen_gap.py)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from streamer.errors import UnknownSchemaVersion
from streamer.format.region import encode_region
from streamer.runtime.regionstate import region_state_from_bytes
from streamer.schema.codec import ChunkCodec
from streamer.schema.records import CURRENT_VERSIONS

WHERE = "regions/r.0.0.region chunk (0, 0)"


def chunk(**extra: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "type": "chunk",
        "schemaVersion": CURRENT_VERSIONS["chunk"],
        "cx": 0,
        "cy": 0,
        "generator": "g",
        "generator_version": 1,
        "base_fingerprint": 1,
    }
    raw.update(extra)
    return raw


def encode(encoding: str, raw: dict[str, Any]) -> bytes:
    return msgspec.msgpack.encode(raw) if encoding == "msgpack" else msgspec.json.encode(raw)


# What a newer release writes after adding a nested list of a new record type.
VEHICLES = {
    "vehicles": [{"type": "vehicle", "schemaVersion": 1, "id": "v1"}],
    "record_versions": {"vehicle": 1},
}


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
def test_a_chunk_listing_an_unknown_nested_type_is_refused(encoding: str) -> None:
    codec = ChunkCodec(encoding)  # type: ignore[arg-type]
    with pytest.raises(UnknownSchemaVersion, match="'vehicle'") as info:
        codec.refuse_unknown_versions(encode(encoding, chunk(**VEHICLES)), where=WHERE)
    assert WHERE in str(info.value)


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
def test_the_region_holding_it_refuses_to_load_as_a_whole(encoding: str) -> None:
    codec = ChunkCodec(encoding)  # type: ignore[arg-type]
    good = codec.encode(codec.decode(encode(encoding, chunk()), where="w").record)
    payloads = {(0, 0): good, (1, 0): encode(encoding, chunk(cx=1, **VEHICLES))}
    data = encode_region(
        rx=0,
        ry=0,
        last_processed_tick=1,
        generation=1,
        writer="x",
        encoding=encoding,  # type: ignore[arg-type]
        chunks=payloads,
        region_size=8,
    )
    with pytest.raises(UnknownSchemaVersion, match=r"'vehicle'.*chunk \(1, 0\)"):
        region_state_from_bytes(data, (0, 0))


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
@pytest.mark.parametrize(
    "record_versions",
    [
        {"vehicle": 1},
        {"character": CURRENT_VERSIONS["character"] + 1},
        {"society": CURRENT_VERSIONS["society"], "vehicle": 7},
        {"character": 2**40},
    ],
)
def test_the_screen_refuses_exactly_what_decode_refuses_as_newer(
    encoding: str, record_versions: dict[str, int]
) -> None:
    codec = ChunkCodec(encoding)  # type: ignore[arg-type]
    payload = encode(encoding, chunk(record_versions=record_versions))
    with pytest.raises(UnknownSchemaVersion):
        codec.decode(payload, where=WHERE)
    with pytest.raises(UnknownSchemaVersion):
        codec.refuse_unknown_versions(payload, where=WHERE)


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
@pytest.mark.parametrize(
    "record_versions",
    [{}, {"character": 1}, {"character": "three"}, ["character"]],
)
def test_known_old_or_malformed_record_versions_pass_the_screen(
    encoding: str, record_versions: Any
) -> None:
    """Not the screen's to refuse: decode upgrades the old and reports the malformed."""
    codec = ChunkCodec(encoding)  # type: ignore[arg-type]
    payload = encode(encoding, chunk(record_versions=record_versions))
    codec.refuse_unknown_versions(payload, where=WHERE)


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
@pytest.mark.parametrize(
    ("extra", "current"),
    [
        ({}, True),
        ({"record_versions": {}}, True),
        ({"record_versions": {"character": CURRENT_VERSIONS["character"]}}, True),
        ({"record_versions": {"character": CURRENT_VERSIONS["character"] - 1}}, False),
        ({"record_versions": {"character": True}}, False),
        ({"record_versions": {"character": "three"}}, False),
        ({"record_versions": ["character"]}, False),
    ],
    ids=["missing", "empty", "current", "old", "bool", "str", "list"],
)
def test_the_screen_says_current_exactly_when_decode_current_takes_it(
    encoding: str, extra: dict[str, Any], current: bool
) -> None:
    """The screen's answer lets a flush skip a chunk's upgrade: it must agree with
    ``decode_current`` (which would decode the chunk without upgrading it)."""
    codec = ChunkCodec(encoding)  # type: ignore[arg-type]
    payload = encode(encoding, chunk(**extra))
    assert codec.refuse_unknown_versions(payload, where=WHERE) is current
    assert (codec.decode_current(payload, where=WHERE) is not None) is current
