"""Settings of the content policy (the ``policy`` section of the farm's settings)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class PolicySettings(BaseModel):
    """Which moderation rules every create passes, and how fresh each process's registry is."""

    model_config = ConfigDict(extra="forbid")

    rules: list[Literal["opt_out", "public_figure", "cameo_consent"]] = Field(
        default=["opt_out", "public_figure", "cameo_consent"], description=(
            "Built-in rules every create (POST /v1/videos, remix, batch lines) passes, in order: opt_out refuses "
            "prompts naming a registered work or character, public_figure those naming a protected person (unless "
            "a consenting cameo of that person is used), cameo_consent those using a cameo (@name or "
            "characters) without its owner's consent (403). Without cameo_consent, POST /v1/videos and remix "
            "still refuse such a use when the job is stored, with the same 403; batch lines do not."))
    moderators: list[str] = Field(default=[], description=(
        "Import paths (package.module:attribute) of the operator's own moderators, asked after the rules, in "
        "order: each a class or factory called with no arguments that returns an object with "
        "check(farm.policy.moderation.ModerationRequest) -> Decision."))
    refresh_s: float = Field(default=2.0, ge=0, le=300, description=(
        "How often each gateway replica and the batch runner read the registry's version: a registered, changed "
        "or deleted name takes effect everywhere within this many seconds (at once on the gateway that took the "
        "change). 0: read it on every create."))

    @field_validator("moderators")
    @classmethod
    def _paths(cls, value: list[str]) -> list[str]:
        for path in value:
            module, sep, attribute = path.partition(":")
            if not sep or not module or not attribute:
                raise ValueError(f"policy.moderators: {path!r} is not an import path; write package.module:attribute")
        return value


class CameoSettings(BaseModel):
    """Limits on the videos cameos (characters) are made from, and what is kept of them."""

    model_config = ConfigDict(extra="forbid")

    max_video_mb: float = Field(default=64.0, gt=0, description=(
        "Largest source video accepted by POST /v1/videos/characters, in MiB (the request body may be 1 MiB more)."))
    max_video_seconds: float = Field(default=60.0, gt=0, description="Longest source video accepted, in seconds.")
    max_video_pixels: int = Field(default=1920 * 1080, ge=1, description="Most pixels a source video frame may have.")
    frames: int = Field(default=4, ge=1, le=16, description=(
        "Reference frames kept per cameo, evenly spaced over its video; renders start from the middle one."))
    frame_max_side: int = Field(default=512, ge=16, le=4096, description=(
        "Reference frames are scaled down to at most this many pixels on their longer side."))

    def limits(self):  # -> farm.api.cameo_media.CameoLimits
        from farm.api.cameo_media import CameoLimits

        return CameoLimits(max_bytes=int(self.max_video_mb * 1024 * 1024), max_seconds=self.max_video_seconds,
                           max_pixels=self.max_video_pixels, frames=self.frames, frame_max_side=self.frame_max_side)
