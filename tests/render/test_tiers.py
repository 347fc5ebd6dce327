"""The tier mapping rule (farm.render.tiers), on the real tiers of deployments/gpu.yaml and the embedded ones."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from farm.builders import resolve_settings
from farm.cluster import read_deployment
from farm.config import embedded_aliases
from farm.render.registry import ModelSpec
from farm.render.tiers import (
    OPENAI_SECONDS, OPENAI_SIZES, ModelAlias, check_aliases, nearest_seconds, nearest_size, place, resolve,
)
from farm.render.tiny import tiny_spec

ROOT = Path(__file__).resolve().parents[2]
TINY = [tiny_spec("/m/wan-tiny", 1), tiny_spec("/m/wan-tiny-2x", 2)]


def gpu():
    settings = resolve_settings(read_deployment(ROOT / "deployments" / "gpu.yaml").args)
    return settings.models, settings.model_aliases


@pytest.mark.parametrize(("name", "asked", "rendered"), [
    # OpenAI's 9:16 default onto the 1.3B's 480x832: the only portrait size.
    ("sora-2", ("720x1280", 4), ("480x832", 4)),
    ("sora-2", ("1792x1024", 12), ("832x480", 5)),
    # The pro tier serves 720x1280 itself; 1024x1792 (0.571) is within 5 % of both 720x1280 (0.5625)
    # and 480x832 (0.577): the nearer area wins, so it is not shrunk to 480p.
    ("sora-2-pro", ("720x1280", 4), ("720x1280", 4)),
    ("sora-2-pro", ("1024x1792", 8), ("720x1280", 5)),
    ("sora-2-pro", ("1792x1024", 4), ("1280x720", 4)),
])
def test_gpu_tiers_map_openai_values_by_orientation_ratio_then_area(name, asked, rendered) -> None:
    models, aliases = gpu()
    placed = place(resolve(models, aliases, name), *asked)
    assert (placed.size, placed.seconds) == rendered
    expected = {k: str(v) for k, v, w in zip(("size", "seconds"), asked, rendered) if v != w}
    assert placed.mapped_from == expected


def test_a_model_id_or_a_refusing_tier_never_maps() -> None:
    models, aliases = gpu()
    assert place(resolve(models, aliases, "wan2.1-t2v-1.3b"), "720x1280", 8).mapped_from == {}
    assert place(resolve(models, aliases, "wan2.1-t2v-1.3b"), "720x1280", 8).size == "720x1280"  # left to refuse
    refusing = [a.model_copy(update={"mapping": "refuse"}) for a in aliases]
    assert place(resolve(models, refusing, "sora-2"), "720x1280", 8).mapped_from == {}
    # Values outside OpenAI's sets stay as asked (validate_request refuses them), under `map` too.
    assert place(resolve(models, aliases, "sora-2"), "1920x1080", 7).mapped_from == {}


def test_an_orientation_the_tier_lacks_is_refused_naming_the_allowed_sizes() -> None:
    landscape_only = [ModelAlias(id="wide", model="wan-tiny", sizes=["128x96", "128x128"])]
    with pytest.raises(ValueError, match=r"size: '720x1280' is portrait and model 'wide' has no portrait size to map "
                                         r"it to; allowed: 128x96, 128x128"):
        place(resolve(TINY, landscape_only, "wide"), "720x1280", None)


@given(st.sampled_from(OPENAI_SIZES), st.sampled_from(OPENAI_SECONDS), st.sampled_from(["sora-2", "sora-2-pro"]))
def test_embedded_tiers_map_every_openai_default_to_something_they_serve(size, seconds, name) -> None:
    target = resolve(TINY, embedded_aliases(), name)
    placed = place(target, size, seconds)
    assert placed.size in target.limits.sizes and placed.seconds in target.limits.seconds
    w, h = (int(x) for x in placed.size.split("x"))
    asked_w, asked_h = (int(x) for x in size.split("x"))
    assert (w > h) == (asked_w > asked_h)  # orientation kept
    assert placed.mapped_from.get("size") == (None if placed.size == size else size)


def test_nearest_duration_prefers_the_shorter_on_a_tie() -> None:
    assert nearest_seconds(8, [4, 12]) == 4 and nearest_seconds(8, [5, 10]) == 10 and nearest_seconds(12, [2, 4]) == 4
    assert nearest_size("720x1280", ["128x128"]) is None


def test_aliases_are_checked_against_the_models_they_name() -> None:
    spec = TINY[0]
    for alias, needle in [
        (ModelAlias(id="sora-2", model="wan-huge"), "'sora-2' maps to model 'wan-huge', which is not in models"),
        (ModelAlias(id="wan-tiny", model="wan-tiny"), "'wan-tiny' is also a model id"),
        (ModelAlias(id="s", model="wan-tiny", sizes=["720x1280"]), r"sizes \['720x1280'\] are not served by model"),
        (ModelAlias(id="s", model="wan-tiny", seconds=[8]), r"seconds \[8\] are not served"),
        (ModelAlias(id="s", model="wan-tiny", max_steps=51), "max_steps=51 exceeds model 'wan-tiny'"),
        (ModelAlias(id="s", model="wan-tiny", default_steps=60), "default_steps=60 exceeds max_steps=50"),
    ]:
        with pytest.raises(ValueError, match=needle):
            check_aliases([spec], [alias])
    with pytest.raises(ValueError, match="listed more than once"):
        check_aliases([spec], [ModelAlias(id="s", model="wan-tiny")] * 2)
    with pytest.raises(ValueError, match="is not served here; available: wan-tiny, wan-tiny-2x, sora-2, sora-2-pro"):
        resolve(TINY, embedded_aliases(), "sora-3")


def test_a_tier_narrows_its_model_under_its_own_name() -> None:
    target = resolve(TINY, embedded_aliases(), "sora-2-pro")
    assert isinstance(target.limits, ModelSpec) and target.spec.id == "wan-tiny-2x"
    assert (target.limits.id, target.limits.default_steps, target.limits.max_steps) == ("sora-2-pro", 16, 50)
    assert target.limits.path == target.spec.path and target.limits.experts == 2
