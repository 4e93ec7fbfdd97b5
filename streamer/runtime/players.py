"""``players.idx``: which region each player character is in.

Format: the msgpack map ``{player_id: [rx, ry]}`` followed by 8 bytes, the little-endian
xxh3_64 of the map bytes. It is a hint, rebuildable by scanning regions: the authority is
the character record in its chunk. The runtime keeps the index in memory, updates it as
deltas are applied, and writes it (atomically) after flushes that changed it.
"""

from __future__ import annotations

import struct
from typing import TypeAlias

import msgspec

from streamer.errors import ChecksumMismatch, MalformedFile
from streamer.format.checksum import hex64, xxh3

__all__ = ["PLAYERS_KEY", "PlayerIndex", "decode_players", "encode_players"]

PLAYERS_KEY = "players.idx"
RegionKey: TypeAlias = tuple[int, int]

_TRAILER = struct.Struct("<Q")
_DECODER = msgspec.msgpack.Decoder(dict[str, tuple[int, int]])
_ENCODER = msgspec.msgpack.Encoder(order="sorted")


def encode_players(index: dict[str, RegionKey]) -> bytes:
    body = _ENCODER.encode(index)
    return body + _TRAILER.pack(xxh3(body))


def decode_players(data: bytes, *, path: str = PLAYERS_KEY) -> dict[str, RegionKey]:
    """:raises ChecksumMismatch, MalformedFile: the index is damaged (rebuild it by scan)."""
    if len(data) < _TRAILER.size:
        raise MalformedFile(
            f"player index is {len(data)} bytes, shorter than its trailer", path=path
        )
    body, (expected,) = data[: -_TRAILER.size], _TRAILER.unpack(data[-_TRAILER.size :])
    actual = xxh3(body)
    if actual != expected:
        raise ChecksumMismatch(
            "player index checksum mismatch",
            path=path,
            expected=hex64(expected),
            actual=hex64(actual),
        )
    try:
        return dict(_DECODER.decode(body))
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise MalformedFile(f"player index does not decode: {exc}", path=path) from None


class PlayerIndex:
    """In-memory player → region map with a dirty flag for the next write."""

    def __init__(self, initial: dict[str, RegionKey] | None = None) -> None:
        self._regions: dict[str, RegionKey] = dict(initial or {})
        # entity id → player id, learned from applied upserts, so removals can be indexed.
        self._entities: dict[str, str] = {}
        self.dirty = False
        self.version = 0

    def get(self, player_id: str) -> RegionKey | None:
        return self._regions.get(player_id)

    def placed(self, entity_id: str, player_id: str, region: RegionKey) -> None:
        self._entities[entity_id] = player_id
        if self._regions.get(player_id) != region:
            self._regions[player_id] = region
            self._touch()

    def removed(self, entity_id: str, region: RegionKey) -> None:
        player_id = self._entities.get(entity_id)
        if player_id is not None and self._regions.get(player_id) == region:
            del self._regions[player_id]
            self._touch()

    def forget(self, player_id: str) -> None:
        if self._regions.pop(player_id, None) is not None:
            self._touch()

    def snapshot(self) -> tuple[int, bytes]:
        return self.version, encode_players(self._regions)

    def written(self, version: int) -> None:
        if version == self.version:
            self.dirty = False

    def _touch(self) -> None:
        self.dirty = True
        self.version += 1

    def __len__(self) -> int:
        return len(self._regions)
