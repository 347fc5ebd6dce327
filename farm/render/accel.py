"""Faster denoiser forwards: diffusers' cache hooks around a shard, and torch.compile at replica start.

Two doors, both called by :class:`~farm.render.engine.DenoiserStage` (and usable by any loop that
calls the experts):

- :func:`cache_for` — ``with cache_for(experts, setting) as stats: <run a shard>`` enables diffusers'
  own cache hooks (``CacheMixin.enable_cache``) on the experts for the shard and removes them after
  it, whatever happens inside. The hooks are built fresh on entry, so every shard starts with an
  empty cache: nothing one job cached can reach another job's forward, and a shard re-run after a
  crash computes exactly what the first run did. The price is that a cache only helps *within* a
  shard: the first forward of every shard (per guidance pass, cond and uncond) always runs every
  block, so short shards (``render.shard_steps``) skip less. ``stats`` counts the shard's lookups
  (transformer forwards that asked the cache) and hits (forwards whose remaining blocks were skipped).
- :func:`compile_blocks` and :func:`warm_up` — regional ``torch.compile`` of the transformer blocks
  (``compile_repeated_blocks``: the blocks repeat, so one compiled graph serves all of them) with
  dynamic shapes, and one forward on a dummy input of the model's first size and duration: that one
  compile serves every size, duration and batch size, so no request pays it (measured on the tiny
  model: 16 s at replica start, then no recompile at 128x128, 256x256 or 128x96).

The settings are typed in :mod:`farm.render.registry` (``CacheSetting``, ``ModelSpec.cache``,
``ModelSpec.compile``), which the gateway validates against without importing torch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from farm.render.registry import CacheSetting, ModelSpec

log = logging.getLogger(__name__)

OFF = CacheSetting(kind="off")


@dataclass
class CacheStats:
    """One shard's cache counts: ``lookups`` forwards asked the cache, ``hits`` of them reused it."""

    kind: str = "off"
    lookups: int = 0
    hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    def add(self, other: "CacheStats") -> None:
        self.lookups += other.lookups
        self.hits += other.hits


def resolve(default: CacheSetting, asked: CacheSetting | None) -> CacheSetting:
    """The setting a shard runs with: the job's own when it named one (``"off"`` included), else the model's."""
    return default if asked is None else asked


def _diffusers_config(setting: CacheSetting):
    from diffusers import FirstBlockCacheConfig

    if setting.kind == "first_block":
        return FirstBlockCacheConfig(threshold=setting.threshold)
    raise ValueError(f"cache: kind {setting.kind!r} has no diffusers hook here")


def _count_first_block(model: torch.nn.Module, stats: CacheStats) -> None:
    """Count FirstBlockCache's decisions: its head-block hook asks ``_should_compute_remaining_blocks``
    once per forward (False: the remaining blocks are skipped), so wrapping that one method of this
    shard's hook instance counts every lookup and hit without touching diffusers."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK

    heads = [
        HookRegistry.check_if_exists_or_initialize(module).get_hook(_FBC_LEADER_BLOCK_HOOK)
        for module in model.modules()
        if getattr(module, "_diffusers_hook", None) is not None
    ]
    heads = [hook for hook in heads if hook is not None]
    if len(heads) != 1:
        raise RuntimeError(f"FirstBlockCache: expected one head-block hook on {type(model).__name__}, found {len(heads)}")
    head = heads[0]
    decide = head._should_compute_remaining_blocks

    def counted(residual: torch.Tensor) -> bool:
        compute = decide(residual)
        stats.lookups += 1
        stats.hits += 0 if compute else 1
        return compute

    head._should_compute_remaining_blocks = counted  # this instance only; it is dropped with the hooks


@contextmanager
def cache_for(
    experts: Mapping[str, torch.nn.Module] | torch.nn.Module, setting: CacheSetting | None
) -> Iterator[CacheStats]:
    """Enable ``setting``'s cache hooks on every expert for the body of the ``with``, then remove them.

    Yields the shard's :class:`CacheStats` (all experts together). ``None`` or ``"off"`` touches no
    model and counts nothing. A model that already has a cache enabled is refused (RuntimeError):
    its hooks would carry another shard's state into this one.
    """
    setting = setting or OFF
    stats = CacheStats(kind=setting.kind)
    if setting.kind == "off":
        yield stats
        return
    models = list(experts.values()) if isinstance(experts, Mapping) else [experts]
    for model in models:
        if getattr(model, "is_cache_enabled", False):
            raise RuntimeError(f"cache: {type(model).__name__} already has a cache enabled; one shard at a time")
    enabled: list[torch.nn.Module] = []
    try:
        for model in models:
            model.enable_cache(_diffusers_config(setting))
            enabled.append(model)
            _count_first_block(model, stats)
        yield stats
    finally:
        # Removing the hooks drops their state with them: the next shard starts empty.
        for model in enabled:
            model.disable_cache()


# Compilation ----------------------------------------------------------------------
def compile_blocks(model: torch.nn.Module) -> torch.nn.Module:
    """Regional ``torch.compile`` of ``model``'s repeated transformer blocks, in place; returns ``model``.

    The model itself stays an ``nn.Module`` of its own class, so diffusers' cache hooks and
    ``cache_context`` still apply to it.
    """
    # Dynamic shapes: one graph for every size, duration and batch (a static graph per shape would
    # recompile on each new one, and torch stops recompiling after a few, falling back to eager).
    model.compile_repeated_blocks(dynamic=True)
    return model


def dummy_inputs(model: torch.nn.Module, latent_shape: tuple[int, ...], text_tokens: int) -> dict:
    """A forward's keyword arguments of the right shapes and dtype, on the model's device (values random)."""
    cfg = model.config
    device, dtype = next(model.parameters()).device, model.dtype
    generator = torch.Generator().manual_seed(0)
    batch, _, frames, height, width = latent_shape
    hidden = torch.randn((batch, cfg.in_channels, frames, height, width), generator=generator)
    text = torch.randn((batch, text_tokens, cfg.text_dim), generator=generator)
    return {
        "hidden_states": hidden.to(device, dtype),
        "timestep": torch.full((batch,), 999.0, device=device),
        "encoder_hidden_states": text.to(device, dtype),
        "return_dict": False,
    }


@torch.inference_mode()
def warm_up(model: torch.nn.Module, latent_shape: tuple[int, ...], text_tokens: int) -> float:
    """One forward on a dummy input (what compiles a compiled model); returns its seconds."""
    import time

    started = time.perf_counter()
    model(**dummy_inputs(model, latent_shape, text_tokens))
    return time.perf_counter() - started


def prepare_experts(spec: ModelSpec, experts: Mapping[str, torch.nn.Module], latent_shape: tuple[int, ...]) -> None:
    """What a denoiser replica does at start for ``spec.compile``: compile each expert's blocks, then warm
    it with one forward at ``latent_shape`` (the model's first size and duration)."""
    if not spec.compile:
        return
    for name, model in experts.items():
        compile_blocks(model)
        seconds = warm_up(model, latent_shape, spec.max_sequence_length)
        log.info("compiled %s/%s; warm-up forward %.1f s", spec.id, name, seconds)
