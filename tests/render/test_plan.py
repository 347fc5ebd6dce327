"""The torch-free shard planner: what the dispatcher cuts a job into, without the render stack."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from farm.render import denoise
from farm.render.plan import HIGH_NOISE_EXPERT as HIGH
from farm.render.plan import LOW_NOISE_EXPERT as LOW
from farm.render.plan import ShardPlan, StepLayout, expert_for_timestep, plan_shards

PROPS = settings(max_examples=300, derandomize=True, deadline=None)


def test_plan_imports_no_torch():
    code = (
        "import farm.render.plan, sys; "
        "heavy = [m for m in ('torch', 'diffusers', 'numpy', 'transformers') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_denoise_reexports_the_same_types():
    assert denoise.ShardPlan is ShardPlan
    assert (denoise.HIGH_NOISE_EXPERT, denoise.LOW_NOISE_EXPERT) == (HIGH, LOW)


def _two_expert(high: int, low: int) -> StepLayout:
    return StepLayout(high + low, (HIGH,) * high + (LOW,) * low)


def test_one_expert_cuts_by_step_count():
    layout = StepLayout(8, (HIGH,) * 8)
    assert plan_shards(layout, 0, None) == [ShardPlan(0, 8, HIGH)]
    assert plan_shards(layout, 0, 3) == [ShardPlan(0, 3, HIGH), ShardPlan(3, 6, HIGH), ShardPlan(6, 8, HIGH)]
    assert plan_shards(layout, 5, 2) == [ShardPlan(5, 7, HIGH), ShardPlan(7, 8, HIGH)]
    assert plan_shards(layout, 8, 2) == []  # finished: nothing left


def test_two_experts_always_cut_at_the_boundary():
    layout = _two_expert(7, 1)
    assert plan_shards(layout, 0) == [ShardPlan(0, 7, HIGH), ShardPlan(7, 8, LOW)]
    assert plan_shards(layout, 0, 3) == [
        ShardPlan(0, 3, HIGH), ShardPlan(3, 6, HIGH), ShardPlan(6, 7, HIGH), ShardPlan(7, 8, LOW),
    ]


def test_bad_inputs_name_the_value():
    layout = StepLayout(4, (HIGH,) * 4)
    with pytest.raises(ValueError, match="shard_steps must be ≥ 1, got 0"):
        plan_shards(layout, 0, 0)
    with pytest.raises(ValueError, match="step_index 5 is outside"):
        plan_shards(layout, 5, 2)
    with pytest.raises(ValueError, match="one expert name per step"):
        StepLayout(3, (HIGH, HIGH))
    with pytest.raises(ValueError, match="must be a tuple"):
        StepLayout(2, [HIGH, HIGH])


def test_expert_rule_matches_wan():
    assert expert_for_timestep(999.0, None) == HIGH
    assert expert_for_timestep(875.0, 875.0) == HIGH  # t ≥ boundary: high-noise
    assert expert_for_timestep(874.9, 875.0) == LOW
    assert StepLayout.from_timesteps([999, 900, 875, 500], 875.0).experts == (HIGH, HIGH, HIGH, LOW)


@PROPS
@given(
    owners=st.lists(st.sampled_from([HIGH, LOW]), min_size=0, max_size=40),
    cap=st.one_of(st.none(), st.integers(1, 10)),
    data=st.data(),
)
def test_plans_tile_the_rest_with_maximal_single_expert_ranges(owners, cap, data):
    layout = StepLayout(len(owners), tuple(owners))
    start = data.draw(st.integers(0, len(owners)))
    plans = plan_shards(layout, start, cap)
    position = start
    for plan in plans:
        assert plan.start == position < plan.end
        assert {owners[i] for i in range(plan.start, plan.end)} == {plan.expert}
        if cap is not None:
            assert plan.end - plan.start <= cap
        # Cut only where needed: the cap, the end, or a change of expert.
        at_cap = cap is not None and plan.end - plan.start == cap
        assert at_cap or plan.end == len(owners) or owners[plan.end] != plan.expert
        position = plan.end
    assert position == len(owners)


@pytest.mark.parametrize("cap", [None, 1, 3])
def test_denoise_plan_shards_delegates_to_the_layout(tiny_spec_2x, cap):
    import torch

    from farm.render.engine import initial_state
    from farm.render.registry import validate_request

    params = validate_request(tiny_spec_2x, prompt="a fox", size="64x64", seconds=1, steps=8, seed=3)
    dummy = denoise.Conditioning(torch.zeros(1, 4, 32), None)  # planning never reads it
    state = initial_state(tiny_spec_2x, params, dummy)
    layout = denoise.layout_of(state)
    assert layout.num_steps == 8 and set(layout.experts) == {HIGH, LOW}
    assert layout.experts == tuple(denoise.expert_for_step(state, i) for i in range(8))
    assert denoise.plan_shards(state, cap) == plan_shards(layout, 0, cap)
    later = replace(state, step_index=5)
    assert denoise.plan_shards(later, cap) == plan_shards(layout, 5, cap)
