"""Expiry settings: the ``expiry`` section of the farm's settings (``farm.jobs.expiry``)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from farm.jobs.expiry import MAX_LIFETIME_S, MIN_LIFETIME_S, LifetimeRule
from farm.jobs.job import DEFAULT_EXPIRES_IN_S

_Lifetime = Annotated[int, Field(ge=1, le=MAX_LIFETIME_S)]


class ExpirySettings(BaseModel):
    """How long finished clips are kept, and the reaper that removes them afterwards.

    A clip's lifetime is the operator's override for its account (``POST
    /v1/admin/accounts/{id}/lifetime``), else its account tier's (``tiers``; the tier set with
    the account's budget), else ``default_lifetime_s``; it counts from the job's completion and is
    fixed when the job is created."""

    model_config = ConfigDict(extra="forbid")

    min_lifetime_s: _Lifetime = Field(
        default=MIN_LIFETIME_S,
        description="The shortest lifetime in seconds this farm allows: for default_lifetime_s, every tier, and an "
        "operator's per-account override (a shorter one is refused with a 400 naming lifetime_s).",
    )
    default_lifetime_s: _Lifetime = Field(
        default=DEFAULT_EXPIRES_IN_S,
        description="Seconds a clip's assets are kept after it completes, for an account with no override and no "
        "tier listed in `tiers` (default 7 days). Afterwards content answers 404 video_expired and the reaper "
        "deletes its objects.",
    )
    tiers: dict[str, _Lifetime] = Field(
        default_factory=dict,
        description="Lifetime in seconds per account tier (the tier of `budgets.tiers` an operator put the account "
        "in); tiers not listed use default_lifetime_s.",
    )
    reaper_poll_s: float = Field(
        default=60.0, gt=0, le=86_400,
        description="How often the leading dispatcher's reaper looks for expired clips to remove from S3.",
    )
    reaper_batch: int = Field(
        default=100, ge=1, le=10_000,
        description="Most expired clips the reaper removes per turn (the rest wait for the next turn).",
    )

    @model_validator(mode="after")
    def _not_below_the_floor(self) -> "ExpirySettings":
        short = {"default_lifetime_s": self.default_lifetime_s, **{f"tiers.{k}": v for k, v in self.tiers.items()}}
        for name, seconds in short.items():
            if seconds < self.min_lifetime_s:
                raise ValueError(f"expiry.{name} ({seconds} s) is below expiry.min_lifetime_s ({self.min_lifetime_s} s)")
        return self

    def rule(self) -> LifetimeRule:
        return LifetimeRule(float(self.default_lifetime_s), {k: float(v) for k, v in self.tiers.items()},
                            min_s=self.min_lifetime_s)
