"""The model registry: which models the farm serves and what each one accepts.

Pure pydantic, no torch: the gateway validates requests against it without
importing the render stack.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_SIZE = re.compile(r"^([1-9][0-9]{0,5})x([1-9][0-9]{0,5})$")  # ASCII digits (\d takes any script), no zeros


# The families whose encoder takes a reference image (farm.render.families names them; this module
# stays torch-free for the gateway).
IMAGE_FAMILIES = frozenset({"wan-i2v"})
WAN_I2V_TEXT_TOKENS = 512
# The job param (set by the gateway) naming the object-store key of the job's reference image.
REFERENCE_KEY_PARAM = "input_reference_key"


def parse_size(size: str) -> tuple[int, int]:
    """``"WxH"`` → ``(width, height)``; raises ValueError naming the value."""
    match = _SIZE.match(size.strip()) if isinstance(size, str) else None
    if not match:
        raise ValueError(f"size must look like WIDTHxHEIGHT (e.g. 128x128), got {size!r}")
    return int(match.group(1)), int(match.group(2))


class ModelSpec(BaseModel):
    """One servable model: where its weights are and which requests it accepts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(description="The model name clients send, e.g. 'wan-tiny' or 'wan2.1-t2v-1.3b'.")
    path: str = Field(
        description="A local folder saved with save_pretrained, or a hub repo id such as "
        "'Wan-AI/Wan2.1-T2V-1.3B-Diffusers' (needs network access on the workers)."
    )
    family: Literal["wan", "wan-i2v"] = Field(
        default="wan",
        description="Model family (farm.render.families), which decides the encoder, the denoising step and the "
        "decoder: 'wan' is Wan 2.1/2.2 text-to-video; 'wan-i2v' is Wan 2.1 image-to-video (a reference image "
        "conditions the clip; needs max_sequence_length 512).",
    )
    experts: Literal[1, 2] = Field(
        default=1, description="1, or 2 for Wan 2.2 A14B-style high-noise/low-noise experts (one pool each)."
    )
    fps: int = Field(default=16, ge=1, le=60, description="Frames per second of the output clip.")
    sizes: list[str] = Field(description="Allowed output sizes as 'WIDTHxHEIGHT'.")
    seconds: list[int] = Field(description="Allowed clip durations in whole seconds.")
    default_steps: int = Field(default=30, ge=1, le=200, description="Denoising steps when the request names none.")
    max_steps: int = Field(default=100, ge=1, le=500, description="Largest step count a request may ask for.")
    guidance_scale: float = Field(default=5.0, ge=0.0, description="Classifier-free guidance scale (high-noise expert).")
    guidance_scale_2: float | None = Field(
        default=None, ge=0.0, description="Guidance for the low-noise expert of two-expert models; None reuses guidance_scale."
    )
    negative_prompt: str = Field(default="", description="Negative prompt used for classifier-free guidance.")
    max_sequence_length: int = Field(default=512, ge=8, le=1024, description="Text tokens the encoder sees.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="Weights dtype; bfloat16 on GPUs, float32 on CPU."
    )

    @field_validator("sizes")
    @classmethod
    def _check_sizes(cls, sizes: list[str]) -> list[str]:
        if not sizes:
            raise ValueError("sizes must list at least one WIDTHxHEIGHT")
        for size in sizes:
            width, height = parse_size(size)
            # VAE downsamples 8x, the transformer patches 2x2: both sides must be multiples of 16.
            if width % 16 or height % 16:
                raise ValueError(f"size {size!r}: width and height must be multiples of 16")
        return sizes

    @model_validator(mode="after")
    def _check_frames(self) -> "ModelSpec":
        if not self.seconds:
            raise ValueError("seconds must list at least one duration")
        for seconds in self.seconds:
            # Wan's VAE compresses time 4x: frame counts must be 4k+1.
            if seconds < 1 or (seconds * self.fps) % 4:
                raise ValueError(
                    f"seconds={seconds} at fps={self.fps} gives {seconds * self.fps + 1} frames; "
                    "seconds*fps must be a positive multiple of 4"
                )
        if self.family in IMAGE_FAMILIES and self.max_sequence_length != WAN_I2V_TEXT_TOKENS:
            # Wan 2.1 I2V's cross-attention splits image tokens from text tokens by assuming 512 of the latter.
            raise ValueError(
                f"max_sequence_length={self.max_sequence_length}: family {self.family!r} needs {WAN_I2V_TEXT_TOKENS}"
            )
        if self.default_steps > self.max_steps:
            raise ValueError(f"default_steps={self.default_steps} exceeds max_steps={self.max_steps}")
        return self

    def num_frames(self, seconds: int) -> int:
        return seconds * self.fps + 1

    @property
    def takes_image(self) -> bool:
        """True when the model's family conditions on a reference image (``input_reference``)."""
        return self.family in IMAGE_FAMILIES

    # What a family can take and make; derived, not configured, so `GET /v1/models` cannot claim
    # more than the render stack does. A family that conditions on images or makes audio says so here.
    @property
    def input_types(self) -> tuple[str, ...]:
        """What a request may condition on: text, plus an image for an image-to-video family."""
        return ("text", "image") if self.takes_image else ("text",)

    @property
    def audio(self) -> bool:
        """Whether clips carry an audio track: no family served today makes one."""
        return False


def find_model(models: list[ModelSpec], model_id: str | None) -> ModelSpec:
    """Look a model up by id (None: the default, the first); ValueError lists the served ids."""
    if model_id is None:
        return models[0]
    for spec in models:
        if spec.id == model_id:
            return spec
    raise ValueError(f"model: {model_id!r} is not served here; available: {', '.join(m.id for m in models)}")


class RenderParams(BaseModel):
    """A validated request for one clip, independent of transport (CLI, HTTP)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(min_length=1, description="What to render; any language the tokenizer covers.")
    width: int
    height: int
    seconds: int
    steps: int
    seed: int = Field(ge=0, lt=2**63)
    scheduler: Literal["unipc", "flow-euler"] = Field(
        default="unipc", description="'unipc' is the model's own multistep solver; 'flow-euler' is flow-matching Euler."
    )
    reference_key: str | None = Field(
        default=None,
        description="Object-store key of the job's reference image (image-to-video models), stored by the "
        "gateway under the job's prefix, or a cameo's reference frame under characters/<id>/; None for "
        "text-to-video.",
    )


def validate_request(
    spec: ModelSpec, *, prompt: str, size: str, seconds: int, steps: int | None, seed: int, scheduler: str = "unipc"
) -> RenderParams:
    """Check a request against a model's limits; ValueError names the field and what is allowed."""
    if not prompt or not prompt.strip():
        raise ValueError("prompt: must not be empty")
    if size not in spec.sizes:
        raise ValueError(f"size: {size!r} is not supported by model {spec.id!r}; allowed: {', '.join(spec.sizes)}")
    if seconds not in spec.seconds:
        allowed = ", ".join(str(s) for s in spec.seconds)
        raise ValueError(f"seconds: {seconds} is not supported by model {spec.id!r}; allowed: {allowed}")
    steps = spec.default_steps if steps is None else steps
    if not 1 <= steps <= spec.max_steps:
        raise ValueError(f"steps: {steps} is out of range; allowed: 1..{spec.max_steps}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed: {seed} is out of range; allowed: 0..2**63-1")
    if scheduler not in ("unipc", "flow-euler"):
        raise ValueError(f"scheduler: {scheduler!r} is not known; allowed: unipc, flow-euler")
    width, height = parse_size(size)
    return RenderParams(
        prompt=prompt.strip(), width=width, height=height, seconds=seconds, steps=steps, seed=seed, scheduler=scheduler
    )
