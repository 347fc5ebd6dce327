"""``GET /v1/models`` and ``GET /v1/models/{id}``: the names this farm accepts, as the openai SDK reads them.

OpenAI's ``Model`` (``id``, ``object``, ``created``, ``owned_by``) in OpenAI's list shape, so
``client.models.list()`` and ``retrieve()`` parse it unchanged, plus what a request for each name
may ask (farm extensions, kept by the SDK as extra fields): sizes, durations, steps, whether clips
carry audio, which inputs it conditions on, and for an alias (a tier) the served model behind it
and its mapping rule (``farm.render.tiers``). Served models come first, the default one first.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel, Field

from farm.api.errors import ErrorResponse, NotFound
from farm.render.registry import ModelSpec
from farm.render.tiers import ModelAlias

OWNER = "videofarm"


class ModelObject(BaseModel):
    """One name a create request may send as ``model``."""

    id: str = Field(description="The name to send as `model`: a served model's id or an alias (a tier).")
    object: Literal["model"] = "model"
    created: int = Field(description="Unix seconds when this gateway started serving it.")
    owned_by: str = Field(description=f"Who serves it: always {OWNER!r}.")
    sizes: list[str] = Field(description="Farm extension: sizes a request may ask for; the first is the default.")
    seconds: list[str] = Field(description="Farm extension: durations a request may ask for (as the `seconds` "
                               "field takes them); the first is the default.")
    default_steps: int = Field(description="Farm extension: denoising steps when the request names none.")
    max_steps: int = Field(description="Farm extension: the largest `steps` a request may ask for.")
    audio: bool = Field(description="Farm extension: whether its clips carry an audio track.")
    input_types: list[str] = Field(description="Farm extension: what a request may condition on: 'text', "
                                   "'image' (input_reference), 'video' (remix, edit, extend).")
    alias_of: str | None = Field(default=None, description="Farm extension: for an alias, the served model "
                                 "that renders it; null for a served model.")
    mapping: Literal["map", "refuse"] | None = Field(
        default=None, description="Farm extension: for an alias, what an OpenAI size or duration it does not "
        "serve gets ('map': the nearest it serves, recorded in the video's `mapped_from`; 'refuse': a 400); "
        "null for a served model, which never maps.")


class ModelList(BaseModel):
    """Every name this farm accepts (OpenAI's list shape; not paginated)."""

    object: Literal["list"] = "list"
    data: list[ModelObject]


def model_objects(models: Sequence[ModelSpec], aliases: Sequence[ModelAlias], created: int) -> list[dict[str, Any]]:
    """The ``model`` objects of every served model, then of every alias, with their limits."""
    specs = {m.id: m for m in models}

    def shown(limits: ModelSpec, served: ModelSpec, alias: ModelAlias | None) -> dict[str, Any]:
        return {"id": limits.id, "object": "model", "created": created, "owned_by": OWNER,
                "sizes": list(limits.sizes), "seconds": [str(s) for s in limits.seconds],
                "default_steps": limits.default_steps, "max_steps": limits.max_steps,
                # What the render stack can do is the served model's, whatever the tier.
                "audio": served.audio, "input_types": list(served.input_types),
                "alias_of": served.id if alias else None, "mapping": alias.mapping if alias else None}

    return ([shown(m, m, None) for m in models]
            + [shown(a.limits(specs[a.model]), specs[a.model], a) for a in aliases])


def add_model_routes(app: FastAPI, models: Sequence[ModelSpec], aliases: Sequence[ModelAlias]) -> None:
    """The two routes; behind the same API-key gate as every non-public route."""
    objects = {o["id"]: o for o in model_objects(models, aliases, int(time.time()))}

    @app.get("/v1/models", response_model=ModelList, summary="List the models and aliases served here",
             operation_id="listModels")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": list(objects.values())}

    @app.get("/v1/models/{model_id}", response_model=ModelObject, summary="Retrieve a model or an alias",
             operation_id="retrieveModel",
             responses={404: {"model": ErrorResponse, "description": "No model or alias of that name."}})
    async def retrieve_model(model_id: str) -> dict[str, Any]:
        found = objects.get(model_id)
        if found is None:
            raise NotFound(f"model {model_id!r} is not served here; available: {', '.join(objects)}",
                           param="model", code="model_not_found")
        return found
