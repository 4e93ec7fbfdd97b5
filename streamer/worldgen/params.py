"""Generator parameters: validated by msgspec, stored in the world manifest as a plain dict.

Heights and moistures are on a 0..1023 scale (10 bits) after the noise octaves are summed and
normalised; every threshold below is in those units.

The manifest stores *every* field (:func:`params_to_dict` never omits defaults), so changing a
default here never changes an existing world. A new field must get a default that reproduces the
old output exactly, or the change needs a ``GENERATOR_VERSION`` bump.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Final

import msgspec

from streamer.errors import ConfigError

Level = Annotated[int, msgspec.Meta(ge=0, le=1024)]
PerMille = Annotated[int, msgspec.Meta(ge=0, le=1000)]
ScaleLog2 = Annotated[int, msgspec.Meta(ge=0, le=15)]
Octaves = Annotated[int, msgspec.Meta(ge=1, le=8)]


class GeneratorParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Knobs of the terrain generator. Ranges are enforced by :func:`params_from_dict`."""

    #: log2 of the coarsest height octave's lattice cell, in tiles (9: continents ~512 tiles).
    height_scale_log2: ScaleLog2 = 9
    #: Height octaves; each halves the cell size and the amplitude of the previous one.
    height_octaves: Octaves = 6
    #: log2 of the coarsest moisture octave's lattice cell, in tiles.
    moisture_scale_log2: ScaleLog2 = 9
    #: Moisture octaves.
    moisture_octaves: Octaves = 4
    #: Heights below this are water.
    sea_level: Level = 455
    #: Water deeper than this below ``sea_level`` is deep water.
    deep_water_depth: Level = 90
    #: Land up to this far above ``sea_level`` is beach sand.
    beach_height: Level = 10
    #: Heights from here up are hills.
    hill_level: Level = 640
    #: Heights from here up are mountains (not walkable).
    mountain_level: Level = 705
    #: Heights from here up are snow (not walkable).
    snow_level: Level = 780
    #: Lowland drier than this is desert.
    desert_moisture: Level = 350
    #: Lowland at least this wet is forest.
    forest_moisture: Level = 530
    #: Lowland at least this wet and within ``swamp_height`` of sea level is swamp.
    swamp_moisture: Level = 660
    #: How far above ``sea_level`` swamps reach.
    swamp_height: Level = 30
    #: Trees per 1000 forest tiles.
    tree_density_pm: PerMille = 40
    #: Ore veins per 1000 hill tiles.
    ore_density_pm: PerMille = 10
    #: Reeds per 1000 swamp tiles and cacti per 1000 desert tiles.
    plant_density_pm: PerMille = 10
    #: NPCs spawned on walkable land per region (fewer if the region has less walkable land).
    npcs_per_region: Annotated[int, msgspec.Meta(ge=0, le=4096)] = 16


DEFAULT_PARAMS: Final = GeneratorParams()

_PATH_RE = re.compile(r"at `\$((?:\.\w+|\[\d+\])*)`")

# (key, must be >= this key): ordering the classification relies on.
_ORDERING: Final = (
    ("hill_level", "sea_level"),
    ("mountain_level", "hill_level"),
    ("snow_level", "mountain_level"),
    ("forest_moisture", "desert_moisture"),
    ("swamp_moisture", "forest_moisture"),
)


def _check_relations(p: GeneratorParams, source: str | None) -> None:
    for key, lower in _ORDERING:
        if getattr(p, key) < getattr(p, lower):
            raise ConfigError(
                f"must be >= {lower} ({getattr(p, lower)}), got {getattr(p, key)}",
                path=source,
                key=key,
            )
    for field in ("height", "moisture"):
        scale = getattr(p, f"{field}_scale_log2")
        octaves = getattr(p, f"{field}_octaves")
        if octaves > scale + 1:
            raise ConfigError(
                f"at most {field}_scale_log2 + 1 = {scale + 1} octaves fit "
                f"(the finest lattice cell would be under one tile), got {octaves}",
                path=source,
                key=f"{field}_octaves",
            )


def params_from_dict(d: Mapping[str, Any], *, source: str | None = None) -> GeneratorParams:
    """Validate a plain dict (as stored in the manifest) into :class:`GeneratorParams`.

    Missing keys take their defaults. ``source`` (e.g. the manifest path) prefixes the message.

    :raises ConfigError: unknown key, wrong type, out-of-range value or inconsistent thresholds;
        ``.key`` names the offending field.
    """
    if not isinstance(d, Mapping):
        raise ConfigError(
            f"generator params must be a mapping, got {type(d).__name__}", path=source
        )
    try:
        params = msgspec.convert(dict(d), GeneratorParams, strict=True)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        unknown = re.search(r"unknown field `([^`]+)`", msg)
        if unknown:
            raise ConfigError(
                "unknown generator parameter", path=source, key=unknown.group(1)
            ) from None
        match = _PATH_RE.search(msg)
        key = match.group(1).lstrip(".") if match else None
        detail = _PATH_RE.sub("", msg).strip().rstrip("-").strip()
        raise ConfigError(detail, path=source, key=key) from None
    _check_relations(params, source)
    return params


def params_to_dict(params: GeneratorParams) -> dict[str, int]:
    """Every field, defaults included, so a later change of a default never alters a world."""
    return msgspec.structs.asdict(params)


def validate_params(params: GeneratorParams) -> GeneratorParams:
    """Re-check a directly constructed instance (msgspec checks ranges only when converting)."""
    return params_from_dict(params_to_dict(params))
