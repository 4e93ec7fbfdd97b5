"""The child of ``tests/test_sigkill.py``: submits delta batches until it is SIGKILLed.

    python -m tests.helpers.sigkill_child WORLD_DIR

Protocol (one line each, stdout flushed after every line):

- child → ``R``: imports done, waiting (the parent pre-spawns the next child while it verifies
  the previous one, so interpreter start-up is off the critical path).
- parent → ``<start_tick> <rng_seed>`` on stdin: open the world and go.
- child → ``O``: the world is open (recovery done) and the entities were located.
- child → ``I <json>``: the next batch (a JSON list of deltas), written *before* ``submit``.
- child → ``A``: that ``submit`` returned, i.e. the batch is acknowledged (durable).

The child decides entity moves from what it reads in the world after recovery, so it
"continues from where the world is" whatever the previous kill left. Ticks strictly increase
from ``start_tick``; the parent passes one above every tick any earlier child announced.

The workload module is shared with the parent (tile positions, entity ids, the config),
and imports only what the child needs.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import anyio
import msgspec

from streamer.config import Config, RuntimeSettings, StorageSettings
from streamer.coords import chunk_of
from streamer.runtime.world import World, open_world
from streamer.schema.deltas import AnyDelta, EntityMove, EntityUpsert, TileSet
from streamer.schema.records import Character

#: One anchor per region of interest (region size 8 → 512 tiles), negative coordinates too;
#: two anchors share region (0, 0) in different chunks.
ANCHORS: tuple[tuple[int, int], ...] = (
    (1, 1),
    (70, 3),
    (-5, -7),
    (600, -3),
    (-600, 700),
    (520, 520),
    (-70, 40),
    (33, -520),
)
#: Tracked tiles: three per anchor, all in the anchor's chunk.
TILES: tuple[tuple[int, int], ...] = tuple(
    (ax + dx, ay + dy) for ax, ay in ANCHORS for dx, dy in ((0, 0), (1, 0), (0, 1))
)
#: Where entities may stand (one spot per anchor, in the anchor's chunk).
SPOTS: tuple[tuple[int, int], ...] = tuple((ax + 5, ay + 5) for ax, ay in ANCHORS)
ENTITIES: tuple[str, ...] = ("kill-e0", "kill-e1", "kill-e2", "kill-e3")
#: Every chunk the workload can touch: reading these finds every tracked tile and entity.
CHUNKS: tuple[tuple[int, int], ...] = tuple(sorted({chunk_of(x, y) for x, y in TILES + SPOTS}))

BATCH_ENCODER = msgspec.json.Encoder()
BATCH_DECODER = msgspec.json.Decoder(list[AnyDelta])

#: A child that is somehow never killed stops by itself after this many batches.
MAX_BATCHES = 5000


def child_config() -> Config:
    """Durable and busy: fsync on, sync acks, flushes every few ms, 4 KiB journal segments."""
    return Config(
        runtime=RuntimeSettings(
            durability="sync",
            flush_interval_ms=5,
            journal_segment_bytes=4096,
            load_workers=2,
        ),
        storage=StorageSettings(fsync=True, io_threads=4),
    )


async def locate_entities(world: World) -> dict[str, Character]:
    """Our entities as the world holds them (scans :data:`CHUNKS`)."""
    found: dict[str, Character] = {}
    for cx, cy in CHUNKS:
        for c in (await world.chunk(cx, cy)).entities:
            if c.id in ENTITIES:
                if c.id in found:
                    raise AssertionError(f"entity {c.id} exists twice: {found[c.id]} and {c}")
                found[c.id] = c
    return found


def make_batch(rng: random.Random, tick: int, where: dict[str, Character]) -> list[AnyDelta]:
    """A random batch at ``tick``; updates ``where`` to the state after it."""
    batch: list[AnyDelta] = []
    for x, y in rng.sample(TILES, rng.randint(1, 6)):
        batch.append(TileSet(tick=tick, x=x, y=y, tile=rng.randint(1000, 60000)))
    for eid in ENTITIES:
        if eid not in where:
            x, y = SPOTS[ENTITIES.index(eid) * 2]
            ch = Character(id=eid, x=x, y=y, hp=1)
            batch.append(EntityUpsert(tick=tick, character=ch))
            where[eid] = ch
    roll = rng.random()
    if roll < 0.45:
        # Moves, often two in one batch and across regions (remove + upsert, one frame).
        for eid in rng.sample(ENTITIES, 1 if roll < 0.3 else 2):
            cur = where[eid]
            tx, ty = rng.choice(SPOTS)
            batch.append(
                EntityMove(tick=tick, entity_id=eid, from_x=cur.x, from_y=cur.y, to_x=tx, to_y=ty)
            )
            where[eid] = msgspec.structs.replace(cur, x=tx, y=ty)
    elif roll < 0.6:
        eid = rng.choice(ENTITIES)
        ch = msgspec.structs.replace(where[eid], hp=rng.randint(1, 10_000))
        batch.append(EntityUpsert(tick=tick, character=ch))
        where[eid] = ch
    return batch


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def run(path: Path, start_tick: int, seed: int) -> None:
    rng = random.Random(seed)
    async with open_world(path, child_config()) as world:
        where = await locate_entities(world)
        _say("O")
        for i in range(MAX_BATCHES):
            batch = make_batch(rng, start_tick + i, where)
            _say("I " + BATCH_ENCODER.encode(batch).decode())
            await world.submit(batch)
            _say("A")
            if rng.random() < 0.05:
                await world.flush()  # the sealing flush, besides the timer's routine ones


def main(argv: list[str]) -> int:
    path = Path(argv[1])
    _say("R")
    go = sys.stdin.readline().split()
    if len(go) != 2:
        return 2  # the parent closed stdin: not needed after all
    anyio.run(run, path, int(go[0]), int(go[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
