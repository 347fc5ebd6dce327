"""Budget settings: the ``budgets`` section of the farm's settings."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from farm.sched.budget import BudgetRule


class BudgetSettings(BaseModel):
    """Daily accelerator budgets (accelerator-seconds per UTC day, per account).

    An account's limit is the operator's override for it, else its tier's (both set through
    ``POST /v1/admin/accounts/{id}/budget``), else ``default_daily_seconds``; null is unlimited."""

    model_config = ConfigDict(extra="forbid")

    default_daily_seconds: float | None = Field(
        default=None, ge=0, allow_inf_nan=False,
        description="Accelerator-seconds per UTC day for an account with no tier and no override; null: unlimited.",
    )
    tiers: dict[str, Annotated[float, Field(ge=0, allow_inf_nan=False)] | None] = Field(
        default_factory=dict,
        description="Named tiers the operator may put accounts in: tier → accelerator-seconds per UTC day "
        "(null: unlimited).",
    )

    def rule(self) -> BudgetRule:
        return BudgetRule(self.default_daily_seconds, dict(self.tiers))
