"""The model families the render layer serves, by the name ``ModelSpec.family`` gives.

- ``wan`` — Wan 2.1 / 2.2 text-to-video (one expert, or two split at ``boundary_ratio``);
- ``wan-i2v`` — Wan 2.1 image-to-video (CLIP image encoder, 36-channel transformer), and Wan 2.2 A14B I2V;
- ``wan-ti2v`` — Wan 2.2 TI2V image-to-video (the 5B layout): the image's latents are the first frame;
- ``wan-v2v`` — Wan video-to-video (remix, edit, extend) on a served ``wan`` model: latent init from the
  source clip at a strength;
- ``ltx2`` — LTX-2 text-to-video with synchronized audio (video and audio latents denoised together).

See :mod:`farm.render.families.base` for what a family provides.
"""

from __future__ import annotations

from farm.render.families.base import DecodedClip, Family, FrameDecoder, JobEncoder, StepContext
from farm.render.families.ltx2 import LTX2AudioVideo
from farm.render.families.wan import WanTextToVideo
from farm.render.families.wan_i2v import WanImageToVideo
from farm.render.families.wan_ti2v import WanFirstFrameImageToVideo
from farm.render.families.wan_v2v import WanVideoToVideo

FAMILIES: dict[str, Family] = {
    family.name: family for family in (WanTextToVideo(), WanImageToVideo(), WanFirstFrameImageToVideo(), WanVideoToVideo(),
                                    LTX2AudioVideo())
}

__all__ = ["FAMILIES", "DecodedClip", "Family", "FrameDecoder", "JobEncoder", "StepContext", "get_family"]


def get_family(name: str) -> Family:
    """The family called ``name``; ValueError lists the known ones."""
    family = FAMILIES.get(name)
    if family is None:
        raise ValueError(f"family: {name!r} is not known; allowed: {', '.join(sorted(FAMILIES))}")
    return family
