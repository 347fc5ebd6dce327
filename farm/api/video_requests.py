"""The checks a video request passes, in one place: ``POST /v1/videos`` and every line of a batch.

Each raises :class:`~farm.api.errors.InvalidRequest` naming the field and what is allowed, so a
batch line that fails lands in the batch's error file with the same message, type, param and
code the same body would get as a request of its own.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from farm.api.errors import InvalidRequest, from_pydantic
from farm.api.schemas import CreateVideoRequest, ImageReference
from farm.api.uploads import CheckedImage, UploadLimits, check_image, decode_data_url
from farm.render.registry import find_model, validate_request

if TYPE_CHECKING:
    from farm.render.registry import ModelSpec, RenderParams

_PARAM_PREFIX = re.compile(r"^([a-z_]+):")


@dataclass(frozen=True)
class CheckedVideo:
    """A create body that passed every check: what the job store's ``create`` takes."""

    model: str
    prompt: str
    size: str
    seconds: int
    priority: str
    params: dict[str, Any]  # seed (drawn when absent), steps, scheduler


def param_of(message: str) -> str | None:
    """Our checks word errors 'field: what is wrong'."""
    match = _PARAM_PREFIX.match(message)
    return match.group(1) if match else None


def find_spec(models: list[ModelSpec], model_id: str | None) -> ModelSpec:
    try:
        return find_model(models, model_id)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="model", code="model_not_found") from None


def check_reference(spec: ModelSpec, upload: bytes | None, reference: ImageReference | None,
                    limits: UploadLimits) -> CheckedImage | None:
    """A reference image is checked first (format, size, pixels), so a bad one is named as such; then it
    is returned for a model that takes images (``spec.takes_image``) and refused for one that renders
    from text only. A model that takes images needs one: its absence is refused too."""
    if upload is None and reference is not None:
        if reference.image_url is None:
            raise InvalidRequest("input_reference.file_id: this farm takes no file ids for images; send the image "
                                 "as a file part or a base64 data URL", param="input_reference.file_id")
        upload = decode_data_url(reference.image_url, limits, "input_reference.image_url")
    if upload is None:
        if spec.takes_image:
            raise InvalidRequest(f"input_reference: model {spec.id!r} renders from an image and needs one; send it "
                                 "as a file part or a base64 data URL", param="input_reference",
                                 code="missing_required_parameter")
        return None
    checked = check_image(upload, limits)
    if not spec.takes_image:
        raise InvalidRequest(f"input_reference is not supported by model {spec.id!r}: it renders from text only",
                             param="input_reference", code="unsupported_parameter")
    return checked


def check_render(spec: ModelSpec, prompt: str, size: str, seconds: int, extra: dict[str, Any],
                 max_prompt_chars: int) -> tuple[RenderParams, dict[str, Any]]:
    """The model's limits; returns the render parameters and the params to store (a random seed is
    drawn when none was asked for, and recorded, so a rerun reproduces the clip)."""
    if len(prompt) > max_prompt_chars:
        raise InvalidRequest(f"prompt: {len(prompt)} characters is too long; allowed: at most {max_prompt_chars}",
                             param="prompt")
    seed = extra.get("seed")
    seed = seed if seed is not None else secrets.randbelow(2**63)
    try:
        params = validate_request(spec, prompt=prompt, size=size, seconds=seconds, steps=extra.get("steps"),
                                  seed=seed, scheduler=extra.get("scheduler") or "unipc")
    except ValueError as exc:
        raise InvalidRequest(str(exc), param=param_of(str(exc))) from None
    return params, {**extra, "seed": params.seed, "steps": params.steps, "scheduler": params.scheduler}


def check_create_body(data: Any, models: list[ModelSpec], *, max_prompt_chars: int,
                      upload_limits: UploadLimits) -> CheckedVideo:
    """A JSON create body (a batch line's ``body``), checked as ``POST /v1/videos`` checks one."""
    if not isinstance(data, dict):
        raise InvalidRequest(f"request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    try:
        body = CreateVideoRequest.model_validate(data)
    except ValidationError as exc:
        raise from_pydantic(exc, allowed=tuple(CreateVideoRequest.model_fields)) from None
    spec = find_spec(models, body.model)
    if spec.takes_image:  # a batch line has nowhere to keep its image before its job exists
        raise InvalidRequest(f"model: {spec.id!r} renders from an image, which batch lines cannot carry; create "
                             "its videos with POST /v1/videos", param="model", code="unsupported_parameter")
    check_reference(spec, None, body.input_reference, upload_limits)
    size = body.size or spec.sizes[0]
    seconds = body.seconds if body.seconds is not None else spec.seconds[0]
    extra = {"seed": body.seed, "steps": body.steps, "scheduler": body.scheduler}
    params, stored = check_render(spec, body.prompt, size, seconds, extra, max_prompt_chars)
    return CheckedVideo(model=spec.id, prompt=params.prompt, size=size, seconds=seconds, priority=body.priority,
                        params=stored)
