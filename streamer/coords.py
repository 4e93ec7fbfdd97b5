"""Tile, chunk and region coordinates. Floor division throughout, so negatives work."""

from __future__ import annotations

CHUNK_SIZE = 64


def chunk_of(x: int, y: int) -> tuple[int, int]:
    return x // CHUNK_SIZE, y // CHUNK_SIZE


def region_of_chunk(cx: int, cy: int, region_size: int) -> tuple[int, int]:
    return cx // region_size, cy // region_size


def region_of_tile(x: int, y: int, region_size: int) -> tuple[int, int]:
    return (x // CHUNK_SIZE) // region_size, (y // CHUNK_SIZE) // region_size


def local_index(x: int, y: int) -> int:
    """Index of tile ``(x, y)`` inside its chunk: ``ly * 64 + lx``."""
    return (y % CHUNK_SIZE) * CHUNK_SIZE + (x % CHUNK_SIZE)


def region_chunks(rx: int, ry: int, region_size: int) -> list[tuple[int, int]]:
    """All chunk coordinates of a region, row by row."""
    x0, y0 = rx * region_size, ry * region_size
    return [(x0 + i, y0 + j) for j in range(region_size) for i in range(region_size)]
