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
IMAGE_FAMILIES = frozenset({"wan-i2v", "wan-ti2v"})
WAN_I2V_TEXT_TOKENS = 512  # Wan 2.1 I2V's image cross-attention (family wan-i2v) needs exactly this many
# The job param (set by the gateway) naming the object-store key of the job's reference image.
REFERENCE_KEY_PARAM = "input_reference_key"
# The families whose served model also renders video-to-video (remix, edit, extend): Wan V2V loads the
# same saved text-to-video model (farm.render.families.wan_v2v).
VIDEO_FAMILIES = frozenset({"wan"})
# The job param naming what a remix, edit or extension derives from:
# {"video_id": source id or None for an upload, "key": the source MP4's object key, "action": ...}.
DERIVED_FROM_PARAM = "derived_from"
# How far a derived clip may move from its source when the request names no `strength`: the share of the
# schedule that runs from the noised source (see check_strength).
DEFAULT_STRENGTH = {"remix": 0.6, "edit": 0.6, "extend": 0.7}
# The families whose clips carry a synchronized audio track (LTX-2 denoises audio latents with the video).
AUDIO_FAMILIES = frozenset({"ltx2"})
# Per family: the side multiple the VAE and patching need, the frame-count multiple of its VAE's temporal
# compression (frames = seconds × fps + 1 = k × multiple + 1), and the schedulers its loop runs (the first
# is a request's default). LTX-2 compresses 32× in space and 8× in time and runs flow-matching Euler only;
# Wan 2.2 TI2V-5B's VAE compresses 16× and its transformer patches 2×2.
_SIDE_MULTIPLE = {"ltx2": 32, "wan-ti2v": 32}
_FRAME_MULTIPLE = {"ltx2": 8}
_SCHEDULERS = {"ltx2": ("flow-euler",)}
_WAN_SCHEDULERS = ("unipc", "flow-euler")


# Cache kinds the denoiser applies through diffusers' own hooks (farm.render.accel); "off" runs every block.
CACHE_KINDS = ("off", "first_block")


class CacheSetting(BaseModel):
    """Cache acceleration for a model's forwards (diffusers' hooks, applied per shard by farm.render.accel).

    ``first_block`` is diffusers' FirstBlockCache: each forward runs the first transformer block, and
    when its residual moved less than ``threshold`` (relative mean absolute change) since the last full
    forward of the same pass (cond / uncond), the remaining blocks are skipped and their cached residual
    reused. The cache lives within one shard only: every shard starts with an empty cache.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["off", "first_block"] = Field(
        default="off", description="'off' runs every block of every forward; 'first_block' is diffusers' "
        "FirstBlockCache (skip the remaining blocks when the first block's residual barely moved).")
    threshold: float = Field(
        default=0.05, gt=0.0, le=1.0, description="first_block: the relative change of the first block's residual "
        "under which the remaining blocks are skipped; higher skips more and drifts more. Ignored for 'off'.")


def parse_cache(value: object) -> CacheSetting:
    """A request's ``cache``: ``"off"``, or ``{"kind": ..., "threshold": ...}``; ValueError naming the field
    and what is allowed (no torch: the gateway calls it)."""
    allowed = ('allowed: ' + ", ".join(f'"{k}"' for k in CACHE_KINDS) + ', or an object {"kind": one of '
               + ", ".join(CACHE_KINDS)
               + ', "threshold": a number in (0, 1]}')
    if value == "off":
        return CacheSetting(kind="off")
    if isinstance(value, str) and value in CACHE_KINDS:
        return CacheSetting(kind=value)
    if not isinstance(value, dict):
        raise ValueError(f"cache: {value!r} is not a cache setting; {allowed}")
    unknown = sorted(set(value) - set(CacheSetting.model_fields))
    if unknown:
        raise ValueError(f"cache: unknown field(s) {', '.join(map(repr, unknown))}; {allowed}")
    kind, threshold = value.get("kind", "off"), value.get("threshold", 0.05)
    if kind not in CACHE_KINDS:
        raise ValueError(f"cache: kind {kind!r} is not known; {allowed}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold <= 1.0:
        raise ValueError(f"cache: threshold {threshold!r} is out of range; {allowed}")
    return CacheSetting(kind=kind, threshold=float(threshold))


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
    family: Literal["wan", "wan-i2v", "wan-ti2v", "ltx2"] = Field(
        default="wan",
        description="Model family (farm.render.families), which decides the encoder, the denoising step and the "
        "decoder: 'wan' is Wan 2.1/2.2 text-to-video; 'wan-i2v' is Wan 2.1 image-to-video and Wan 2.2 A14B "
        "I2V (a reference image conditions the clip; needs max_sequence_length 512); 'wan-ti2v' is Wan 2.2 "
        "TI2V image-to-video (the image's latents are the first frame; sizes multiples of 32); 'ltx2' is "
        "LTX-2 text-to-video with synchronized audio (sizes multiples of 32, seconds × fps a multiple of 8, "
        "flow-matching Euler).",
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
    audio_guidance_scale: float | None = Field(
        default=None, ge=0.0,
        description="LTX-2 only: classifier-free guidance scale of the audio latents; None reuses guidance_scale.",
    )
    negative_prompt: str = Field(default="", description="Negative prompt used for classifier-free guidance.")
    max_sequence_length: int = Field(default=512, ge=8, le=1024, description="Text tokens the encoder sees.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="Weights dtype; bfloat16 on GPUs, float32 on CPU."
    )
    cache: CacheSetting = Field(
        default_factory=CacheSetting,
        description="Cache acceleration of this model's denoiser forwards when a request names none (its "
        "extra_body 'cache' overrides it); default off. Applied per shard: each shard starts with an empty cache.",
    )
    compile: bool = Field(
        default=False,
        description="torch.compile the transformer blocks (regional compilation, dynamic shapes) when a denoiser "
        "replica starts, and warm them with one forward at the model's first size and duration; the one compile "
        "serves every size, so no request pays it.",
    )
    vae_kernels: Literal["fast", "stock"] = Field(
        default="fast",
        description="The VAE decoder's kernels on CPU: 'fast' runs its convolutions through oneDNN and its RMS norm "
        "as sqrt(sum(x*x)) (farm/render/cpu_kernels.py; the same arithmetic, pixels differ by rounding); 'stock' "
        "keeps diffusers' modules as they are. On CUDA the VAE is always stock.",
    )
    vae_tiling: bool = Field(
        default=False,
        description="Decode the video VAE in overlapping spatial tiles (diffusers' enable_tiling with its own tile "
        "sizes: 256 pixels for Wan, 512 for LTX-2), so one decode's peak memory follows the tile, not the frame: for large frames "
        "on a GPU. Frames within one tile decode as without it; larger ones differ slightly where tiles blend.",
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
    def _check_family_shapes(self) -> "ModelSpec":
        # Families whose VAE compresses more than Wan's: LTX-2 needs sides of 32k and 8k + 1 frames.
        side = _SIDE_MULTIPLE.get(self.family)
        for size in self.sizes if side else ():
            width, height = parse_size(size)
            if width % side or height % side:
                raise ValueError(f"size {size!r}: family {self.family!r} needs width and height multiples of {side}")
        frames = _FRAME_MULTIPLE.get(self.family)
        for seconds in self.seconds if frames else ():
            if (seconds * self.fps) % frames:
                raise ValueError(f"seconds={seconds} at fps={self.fps}: family {self.family!r} needs seconds*fps "
                                 f"to be a multiple of {frames}")
        if self.audio_guidance_scale is not None and self.family not in AUDIO_FAMILIES:
            raise ValueError(f"audio_guidance_scale: family {self.family!r} makes no audio; leave it unset")
        return self

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
        if self.family == "wan-i2v" and self.max_sequence_length != WAN_I2V_TEXT_TOKENS:
            # Wan 2.1 I2V's cross-attention splits image tokens from text tokens by assuming 512 of the latter.
            raise ValueError(
                f"max_sequence_length={self.max_sequence_length}: family {self.family!r} needs {WAN_I2V_TEXT_TOKENS}"
            )
        if self.compile and (self.family in IMAGE_FAMILIES or self.family in AUDIO_FAMILIES):
            # The warm-up forward (farm.render.accel.warm_up) is Wan-shaped: no image embeddings to pass,
            # no audio stream.
            raise ValueError(f"compile: not supported for family {self.family!r}; allowed for: wan")
        if self.default_steps > self.max_steps:
            raise ValueError(f"default_steps={self.default_steps} exceeds max_steps={self.max_steps}")
        return self

    def num_frames(self, seconds: int) -> int:
        return seconds * self.fps + 1

    @property
    def takes_image(self) -> bool:
        """True when the model's family conditions on a reference image (``input_reference``)."""
        return self.family in IMAGE_FAMILIES

    @property
    def takes_video(self) -> bool:
        """True when the model also renders video-to-video (remix, edit, extend from a source clip)."""
        return self.family in VIDEO_FAMILIES

    # What a family can take and make; derived, not configured, so `GET /v1/models` cannot claim
    # more than the render stack does. A family that conditions on images or makes audio says so here.
    @property
    def input_types(self) -> tuple[str, ...]:
        """What a request may condition on: text, plus an image for an image-to-video family, plus a
        video (remix, edit, extend) for a family that also renders video-to-video."""
        return ("text",) + (("image",) if self.takes_image else ()) + (("video",) if self.takes_video else ())

    @property
    def audio(self) -> bool:
        """Whether clips carry an audio track: LTX-2 (``ltx2``) makes one; the Wan families do not."""
        return self.family in AUDIO_FAMILIES

    @property
    def schedulers(self) -> tuple[str, ...]:
        """The ``scheduler`` values a request may name; the first is the default."""
        return _SCHEDULERS.get(self.family, _WAN_SCHEDULERS)


def check_strength(strength: float, steps: int) -> float:
    """A video-to-video ``strength``: in (0, 1], and enough for at least one step.

    The rule (``WanVideoToVideoPipeline``'s): of ``steps`` scheduled steps, the last
    ``int(steps × strength)`` run, starting from the source's latents noised to the first of them; so
    1.0 keeps nothing of the source but its noise level's share, and a strength whose
    ``int(steps × strength)`` is 0 would run no step at all (the pipeline then silently returns
    nothing): it is refused. ValueError naming ``strength`` and what is allowed.
    """
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
        raise ValueError(f"strength: {strength!r} is out of range; allowed: a number in (0, 1]")
    if int(steps * strength) < 1:
        raise ValueError(f"strength: {strength} of {steps} steps runs no step (int(steps*strength) = 0); allowed: "
                         f"at least {1 / steps:.4g} for {steps} steps")
    return float(strength)


def find_model(models: list[ModelSpec], model_id: str | None) -> ModelSpec:
    """Look a model up by id (None: the default, the first); ValueError lists the served ids."""
    if model_id is None:
        return models[0]
    for spec in models:
        if spec.id == model_id:
            return spec
    raise ValueError(f"model: {model_id!r} is not served here; available: {', '.join(m.id for m in models)}")


class DerivedFrom(BaseModel):
    """The source of a remix, edit or extension, as the job's params carry it (``derived_from``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    video_id: str | None = Field(
        description="Id of the farm video the job derives from; None for an uploaded source clip."
    )
    key: str = Field(min_length=1, description="Object-store key of the source MP4 in the farm's bucket.")
    action: Literal["remix", "edit", "extend"] = Field(description="How the new clip derives from the source.")


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
    derived_from: DerivedFrom | None = Field(
        default=None,
        description="The source clip of a remix, edit or extension; the finisher reads it from the object "
        "store and records it as the manifest's parentOf ingredient. None for a clip made from scratch.",
    )
    source_key: str | None = Field(
        default=None,
        description="Object-store key of the source MP4 of a remix, edit or extension (video-to-video); None "
        "for a clip rendered from text or an image.",
    )
    strength: float | None = Field(
        default=None, gt=0.0, le=1.0,
        description="Video-to-video strength (farm.render.registry.check_strength): the share of the schedule "
        "run from the noised source; set exactly when source_key is.",
    )
    source_frames: Literal["clip", "last"] = Field(
        default="clip",
        description="What of the source conditions the render: 'clip' is the whole source resampled to the "
        "clip's frame count (remix, edit); 'last' is its final frame held for the whole clip (extend).",
    )
    audio: bool = Field(
        default=False,
        description="Whether the finished clip carries the model's audio track (AAC); only for a model whose "
        "ModelSpec.audio is true (validate_request refuses it elsewhere).",
    )
    stitch_seconds: int | None = Field(
        default=None, ge=1,
        description="Extensions: the finisher prepends this many seconds of the source (resampled to "
        "seconds × fps + 1 frames) to the new frames, dropping the new part's first frame, which "
        "stands where the source's last is; None renders the clip alone.",
    )
    cache: CacheSetting | None = Field(
        default=None,
        description="The request's cache acceleration (extra_body 'cache'); None uses the model's default "
        "(ModelSpec.cache).",
    )


def validate_request(
    spec: ModelSpec, *, prompt: str, size: str, seconds: int, steps: int | None, seed: int,
    scheduler: str | None = None, audio: bool | None = None,
) -> RenderParams:
    """Check a request against a model's limits; ValueError names the field and what is allowed.

    ``scheduler`` None is the model's default (``spec.schedulers[0]``); ``audio`` None is the model's
    capability (on for a model with audio, off otherwise), and ``audio=True`` on a model without audio
    is refused.
    """
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
    scheduler = spec.schedulers[0] if scheduler is None else scheduler
    if scheduler not in spec.schedulers:
        raise ValueError(f"scheduler: {scheduler!r} is not supported by model {spec.id!r}; allowed: "
                         f"{', '.join(spec.schedulers)}")
    if audio is not None and not isinstance(audio, bool):
        raise ValueError(f"audio: {audio!r} is not a boolean; allowed: true, false")
    if audio and not spec.audio:
        raise ValueError(f"audio: model {spec.id!r} makes no audio track; allowed: false (or leave it out)")
    width, height = parse_size(size)
    return RenderParams(
        prompt=prompt.strip(), width=width, height=height, seconds=seconds, steps=steps, seed=seed, scheduler=scheduler,
        audio=spec.audio if audio is None else audio,
    )
