"""Model aliases (tiers): the names a client ported from OpenAI sends, mapped to served models.

``sora-2`` and ``sora-2-pro`` are not models this farm has; each is an alias of a served model
(:class:`~farm.render.registry.ModelSpec`) with the tier's own limits: which of the model's sizes
and durations it offers (the first of each is the default), its default and largest step count,
and what happens to OpenAI's own sizes and durations it does not serve (``mapping``):

- ``map``: a size from OpenAI's set (the SDK's ``VideoSize``) that the tier does not serve renders
  at the tier's size of the same orientation (portrait, landscape, square) with the nearest aspect
  ratio (ratios within 5 % of the nearest count as equal), then the nearest area, then the one
  listed first; with no size of that orientation it is refused. A duration from OpenAI's set
  (``VideoSeconds``) that the tier does not serve renders at its nearest duration (a tie: the
  shorter). The job records what was asked (``mapped_from``) beside what renders.
- ``refuse``: such a request gets a 400 listing what the tier allows, like any other value.

Values outside OpenAI's sets are never mapped, and a request that names a served model itself
(``wan-tiny``) gets exactly that model's limits. Pure pydantic, no torch: the gateway imports it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from farm.render.registry import ModelSpec, parse_size

# What the openai SDK's VideoSize and VideoSeconds literals allow (openai 2.x).
OPENAI_SIZES: tuple[str, ...] = ("720x1280", "1280x720", "1024x1792", "1792x1024")
OPENAI_SECONDS: tuple[int, ...] = (4, 8, 12)
# Aspect ratios this close to the nearest one count as equally near; area then decides, so
# 1024x1792 (0.571) goes to 720x1280 (0.5625) rather than to a smaller 480x832 (0.577).
_RATIO_TOLERANCE = math.log(1.05)


class ModelAlias(BaseModel):
    """A model name clients send, rendered by a served model within the tier's own limits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, description="The name clients send as `model`, e.g. 'sora-2' or 'sora-2-pro'.")
    model: str = Field(description="The served model (an id in `models`) that renders it, on that model's pools.")
    sizes: list[str] | None = Field(
        default=None, min_length=1,
        description="Sizes the tier offers, each one its model serves; the first is the default when a request "
        "names none. Null: the model's own.",
    )
    seconds: list[int] | None = Field(
        default=None, min_length=1,
        description="Durations the tier offers, each one its model serves; the first is the default. Null: the "
        "model's own.",
    )
    default_steps: int | None = Field(
        default=None, ge=1, le=500, description="Denoising steps when the request names none; null: the model's.")
    max_steps: int | None = Field(
        default=None, ge=1, le=500,
        description="Largest step count a request may ask for, at most the model's; null: the model's.")
    mapping: Literal["map", "refuse"] = Field(
        default="map",
        description="What an OpenAI size (720x1280, 1280x720, 1024x1792, 1792x1024) or duration (4, 8, 12) the "
        "tier does not serve gets. 'map': the tier's size of the same orientation with the nearest aspect ratio "
        "(within 5 %), then the nearest area; the nearest duration (a tie: the shorter); the video object says "
        "what was asked in `mapped_from` and what renders in `size`/`seconds`. 'refuse': a 400 listing what the "
        "tier allows. Other values are never mapped.",
    )

    def limits(self, spec: ModelSpec) -> ModelSpec:
        """``spec`` narrowed to this tier, under the alias's name (so errors name what the client sent)."""
        return spec.model_copy(update={
            "id": self.id,
            "sizes": list(self.sizes or spec.sizes),
            "seconds": list(self.seconds or spec.seconds),
            "default_steps": self.default_steps or spec.default_steps,
            "max_steps": self.max_steps or spec.max_steps,
        })


def check_aliases(models: Sequence[ModelSpec], aliases: Sequence[ModelAlias]) -> None:
    """Each alias names a served model and stays within its limits; ValueError names the alias."""
    specs = {m.id: m for m in models}
    seen: set[str] = set()
    for alias in aliases:
        where = f"aliases: {alias.id!r}"
        if alias.id in specs:
            raise ValueError(f"{where} is also a model id; an alias needs a name of its own")
        if alias.id in seen:
            raise ValueError(f"{where} is listed more than once")
        seen.add(alias.id)
        spec = specs.get(alias.model)
        if spec is None:
            raise ValueError(f"{where} maps to model {alias.model!r}, which is not in models; known: "
                             f"{', '.join(sorted(specs))}")
        unserved = [s for s in alias.sizes or () if s not in spec.sizes]
        if unserved:
            raise ValueError(f"{where}: sizes {unserved} are not served by model {spec.id!r}; it serves "
                             f"{', '.join(spec.sizes)}")
        unserved_s = [s for s in alias.seconds or () if s not in spec.seconds]
        if unserved_s:
            raise ValueError(f"{where}: seconds {unserved_s} are not served by model {spec.id!r}; it serves "
                             f"{', '.join(str(s) for s in spec.seconds)}")
        if alias.max_steps is not None and alias.max_steps > spec.max_steps:
            raise ValueError(f"{where}: max_steps={alias.max_steps} exceeds model {spec.id!r}'s max_steps="
                             f"{spec.max_steps}")
        limits = alias.limits(spec)
        if limits.default_steps > limits.max_steps:
            raise ValueError(f"{where}: default_steps={limits.default_steps} exceeds max_steps={limits.max_steps}")


@dataclass(frozen=True)
class Target:
    """What a request's ``model`` resolved to."""

    name: str  # what the video object's `model` says: the name sent, or the default model's id
    spec: ModelSpec  # the served model that renders it (its id is the job's model, its pools run it)
    limits: ModelSpec  # what the name accepts: the model's own limits, or the tier's
    alias: ModelAlias | None = None


@dataclass(frozen=True)
class Placement:
    """The size and duration that will render, and what was asked where they differ."""

    size: str
    seconds: int
    mapped_from: dict[str, str] = field(default_factory=dict)  # field → the value asked, as the wire writes it


def resolve(models: Sequence[ModelSpec], aliases: Sequence[ModelAlias], name: str | None) -> Target:
    """A model id or an alias (None: the default model, the first); ValueError lists every name."""
    if name is None:
        return Target(models[0].id, models[0], models[0])
    for spec in models:
        if spec.id == name:
            return Target(name, spec, spec)
    for alias in aliases:
        if alias.id == name:
            spec = next(m for m in models if m.id == alias.model)  # check_aliases made sure it is there
            return Target(name, spec, alias.limits(spec), alias)
    names = [m.id for m in models] + [a.id for a in aliases]
    raise ValueError(f"model: {name!r} is not served here; available: {', '.join(names)}")


def place(target: Target, size: str | None, seconds: int | None) -> Placement:
    """The size and duration a request renders at: its own, the tier's defaults where it named none, or
    (an alias that maps) the tier's nearest to an OpenAI value it does not serve. Values it does not
    map are returned as asked, for ``validate_request`` to refuse with the allowed list."""
    limits, mapped = target.limits, {}
    maps = target.alias is not None and target.alias.mapping == "map"
    if size is None:
        size = limits.sizes[0]
    elif maps and size not in limits.sizes and size in OPENAI_SIZES:
        near = nearest_size(size, limits.sizes)
        if near is None:
            raise ValueError(f"size: {size!r} is {_orientation(size)} and model {target.name!r} has no "
                             f"{_orientation(size)} size to map it to; allowed: {', '.join(limits.sizes)}")
        mapped["size"], size = size, near
    if seconds is None:
        seconds = limits.seconds[0]
    elif maps and seconds not in limits.seconds and seconds in OPENAI_SECONDS:
        mapped["seconds"], seconds = str(seconds), nearest_seconds(seconds, limits.seconds)
    return Placement(size, seconds, mapped)


def nearest_size(asked: str, offered: Sequence[str]) -> str | None:
    """The offered size of ``asked``'s orientation nearest in aspect ratio, then in area; None if none."""
    width, height = parse_size(asked)
    same = [s for s in offered if _orientation(s) == _orientation(asked)]
    if not same:
        return None

    def ratio_gap(size: str) -> float:
        w, h = parse_size(size)
        return abs(math.log((w / h) / (width / height)))

    best = min(ratio_gap(s) for s in same)
    close = [s for s in same if ratio_gap(s) <= best + _RATIO_TOLERANCE]

    def area_gap(size: str) -> float:
        w, h = parse_size(size)
        return abs(math.log((w * h) / (width * height)))

    return min(close, key=lambda s: (area_gap(s), offered.index(s)))


def nearest_seconds(asked: int, offered: Sequence[int]) -> int:
    """The offered duration nearest to ``asked``; of two equally near, the shorter."""
    return min(offered, key=lambda s: (abs(s - asked), s))


def _orientation(size: str) -> str:
    width, height = parse_size(size)
    return "portrait" if height > width else "landscape" if width > height else "square"


__all__ = ["OPENAI_SECONDS", "OPENAI_SIZES", "ModelAlias", "Placement", "Target", "check_aliases",
           "nearest_seconds", "nearest_size", "place", "resolve"]
