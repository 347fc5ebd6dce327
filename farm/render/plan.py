"""Shard planning: which step ranges a job's denoising is cut into, and which expert owns each.

Torch-free on purpose (no torch, diffusers or numpy): the dispatcher and the scheduling
policy plan shards from a :class:`StepLayout` without importing the render stack. The
layout of a live state comes from :func:`farm.render.denoise.layout_of`; it is plain data
(an int and a tuple of strings), so it can also be stored with a job and read back::

    layout = StepLayout(num_steps=8, experts=("transformer",) * 7 + ("transformer_2",))
    plan_shards(layout, step_index=0, shard_steps=3)
    # [ShardPlan(0, 3, 'transformer'), ShardPlan(3, 6, 'transformer'),
    #  ShardPlan(6, 7, 'transformer'), ShardPlan(7, 8, 'transformer_2')]
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

HIGH_NOISE_EXPERT = "transformer"
LOW_NOISE_EXPERT = "transformer_2"


def expert_for_timestep(timestep: float, boundary_timestep: float | None) -> str:
    """The expert that owns a step at ``timestep``, by Wan 2.2's rule.

    One-expert models (``boundary_timestep`` None) always use ``transformer``; two-expert
    models use ``transformer`` for high-noise steps (t ≥ boundary) and ``transformer_2``
    for the rest, as ``WanPipeline.__call__`` does.
    """
    if boundary_timestep is None or timestep >= boundary_timestep:
        return HIGH_NOISE_EXPERT
    return LOW_NOISE_EXPERT


@dataclass(frozen=True)
class ShardPlan:
    """One step range ``[start, end)`` and the expert that owns it."""

    start: int
    end: int
    expert: str


@dataclass(frozen=True)
class StepLayout:
    """A job's whole schedule as the planner sees it: ``experts[i]`` owns step ``i``.

    Raises ValueError when ``num_steps`` is negative or ``experts`` does not name exactly
    one expert per step.
    """

    num_steps: int
    experts: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.num_steps < 0:
            raise ValueError(f"num_steps must be ≥ 0, got {self.num_steps}")
        if not isinstance(self.experts, tuple):
            raise ValueError(f"experts must be a tuple of expert names, got {type(self.experts).__name__}")
        if len(self.experts) != self.num_steps:
            raise ValueError(
                f"experts has {len(self.experts)} entries but num_steps is {self.num_steps}: "
                "it needs exactly one expert name per step"
            )

    @classmethod
    def from_timesteps(cls, timesteps: Iterable[float], boundary_timestep: float | None) -> "StepLayout":
        """The layout of a schedule, each step's owner chosen by :func:`expert_for_timestep`."""
        experts = tuple(expert_for_timestep(float(t), boundary_timestep) for t in timesteps)
        return cls(num_steps=len(experts), experts=experts)


def plan_shards(layout: StepLayout, step_index: int, shard_steps: int | None = None) -> list[ShardPlan]:
    """Cut steps ``[step_index, num_steps)`` into ranges of at most ``shard_steps`` steps.

    A range never spans two experts: it always ends where the owning expert changes.
    ``shard_steps=None`` means no cap, so a one-expert job is one shard and a two-expert job
    two. A finished job (``step_index == num_steps``) has no shards left. Raises ValueError
    for ``shard_steps < 1`` or a ``step_index`` outside ``[0, num_steps]``.
    """
    if shard_steps is not None and shard_steps < 1:
        raise ValueError(f"shard_steps must be ≥ 1, got {shard_steps}")
    if not 0 <= step_index <= layout.num_steps:
        raise ValueError(f"step_index {step_index} is outside [0, {layout.num_steps}]")
    plans: list[ShardPlan] = []
    start = step_index
    while start < layout.num_steps:
        expert = layout.experts[start]
        limit = layout.num_steps if shard_steps is None else min(layout.num_steps, start + shard_steps)
        end = start + 1
        while end < limit and layout.experts[end] == expert:
            end += 1
        plans.append(ShardPlan(start, end, expert))
        start = end
    return plans
