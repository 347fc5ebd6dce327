"""Chaos testing: faults an operator injects into the denoiser on purpose (``render.faults``).

A fault rides the real code path: it is applied as a forward pre-hook on the loaded
transformer (PyTorch's own extension point), so a ``nan`` fault turns the model's input
into NaN and the denoising loop, the scheduler and the non-finite-latents guard all run
as they would for a model that really diverged; an ``oom`` fault raises
``torch.OutOfMemoryError`` from inside the forward pass, where CUDA would; a ``slow`` fault
sleeps ``delay_s`` before every forward pass (a straggling or throttled GPU: the numbers are
unchanged, the shard just takes longer).

    render:
      faults:
        - {kind: nan, prompt_contains: "chaos-nan"}
        - {kind: oom, prompt_contains: "chaos-oom"}
        - {kind: slow, prompt_contains: "chaos-slow", delay_s: 0.2}

Leave the list empty in production: a matching prompt then never renders.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import torch


class FaultInjection(BaseModel):
    """One injected fault: what breaks, and for which jobs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["nan", "oom", "slow"] = Field(
        description="'nan': the transformer's input becomes NaN (the shard ends with non-finite latents); "
        "'oom': the transformer raises torch.OutOfMemoryError; 'slow': every forward pass first sleeps "
        "delay_s (same result, later)."
    )
    delay_s: float = Field(default=0.2, gt=0.0, le=60.0, description="Seconds a 'slow' fault adds per forward pass.")
    prompt_contains: str = Field(
        min_length=1, description="The fault fires on every shard of jobs whose prompt contains this text."
    )

    def matches(self, prompt: str) -> bool:
        return self.prompt_contains in prompt


def matching(faults: Iterable[FaultInjection | Mapping], prompt: str) -> list[FaultInjection]:
    """The faults that fire for a job with ``prompt``."""
    found = [FaultInjection.model_validate(f) for f in faults]
    return [f for f in found if f.matches(prompt)]


@contextmanager
def injected(experts: Mapping[str, "torch.nn.Module"], faults: Iterable[FaultInjection]) -> Iterator[None]:
    """Apply ``faults`` to every expert for the duration of the block; hooks are removed after."""
    import time

    import torch

    faults = list(faults)
    handles = []

    def hook(module, args, kwargs):
        for fault in faults:
            if fault.kind == "slow":
                time.sleep(fault.delay_s)
            if fault.kind == "oom":
                raise torch.OutOfMemoryError(
                    f"simulated out of memory (render.faults: prompt contains {fault.prompt_contains!r})"
                )
            if fault.kind == "nan":
                kwargs = dict(kwargs)
                kwargs["hidden_states"] = torch.full_like(kwargs["hidden_states"], float("nan"))
        return args, kwargs

    try:
        if faults:
            for model in experts.values():
                handles.append(model.register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
