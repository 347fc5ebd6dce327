"""Webhook delivery settings: the ``webhooks`` section of the farm's settings."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from farm.webhooks.guard import parse_allow_hosts


class WebhookSettings(BaseModel):
    """How webhook events are delivered, retried, and which destinations are allowed."""

    model_config = ConfigDict(extra="forbid")

    allow_hosts: list[str] = Field(
        default_factory=list,
        description="Destinations exempt from the SSRF guard: CIDRs ('10.0.0.0/8', '127.0.0.1/32', 'fd00::/8') "
        "and host names ('hooks.internal', or '*.corp.example' for its subdomains). Everything else must "
        "resolve to a public unicast address.",
    )
    max_attempts: int = Field(
        default=8, ge=1, le=100, description="Attempts per delivery before it is marked failed."
    )
    backoff_base_s: float = Field(
        default=60.0, gt=0, description="Delay after the first failed attempt; it doubles with each further one."
    )
    backoff_cap_s: float = Field(default=3600.0, gt=0, description="Longest delay between two attempts.")
    timeout_s: float = Field(
        default=10.0, gt=0, le=300, description="Deadline of one attempt: DNS, connect, every redirect, response headers."
    )
    max_redirects: int = Field(
        default=3, ge=0, le=10, description="Redirect hops followed per attempt; each hop passes the SSRF guard again."
    )
    concurrency: int = Field(default=16, ge=1, le=1024, description="Deliveries in flight at once per deliverer.")
    poll_s: float = Field(default=1.0, gt=0, description="How often the deliverer looks for new events and due retries.")
    settle_s: float = Field(
        default=30.0, ge=0,
        description="Events younger than this are re-read on every poll (duplicates are ignored): on PostgreSQL "
        "an event's transaction may commit after a later one's, and the fan-out cursor must not skip it.",
    )
    max_endpoints_per_account: int = Field(default=20, ge=1, description="Webhook endpoints one account may register.")

    @field_validator("allow_hosts")
    @classmethod
    def _parse_allow_hosts(cls, value: list[str]) -> list[str]:
        parse_allow_hosts(value)  # raises ValueError naming the bad entry
        return value

    @model_validator(mode="after")
    def _cap_not_below_base(self) -> WebhookSettings:
        if self.backoff_cap_s < self.backoff_base_s:
            raise ValueError(
                f"backoff_cap_s ({self.backoff_cap_s}) must be at least backoff_base_s ({self.backoff_base_s})"
            )
        return self
