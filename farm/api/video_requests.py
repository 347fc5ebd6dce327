"""The checks a video request passes, in one place: ``POST /v1/videos`` and every line of a batch.

Each raises :class:`~farm.api.errors.InvalidRequest` naming the field and what is allowed, so a
batch line that fails lands in the batch's error file with the same message, type, param and
code the same body would get as a request of its own. The content policy (``moderate``) runs
last, on a request that passed every other check.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from farm.api.errors import InvalidRequest, from_pydantic
from farm.api.image_refs import is_data_url
from farm.api.schemas import CreateVideoRequest, ImageReference
from farm.api.uploads import CheckedImage, UploadLimits, check_image, decode_data_url
from farm.render.registry import CacheSetting, parse_cache, validate_request
from farm.render.tiers import Placement, Target, place, resolve

if TYPE_CHECKING:
    from collections.abc import Sequence

    from farm.policy.moderation import ModerationRequest, Moderator
    from farm.render.registry import ModelSpec, RenderParams
    from farm.render.tiers import ModelAlias

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


class ContentPolicyViolation(InvalidRequest):
    """A moderator refused the request (not a render failure): 400 ``content_policy_violation`` on
    ``prompt``, or the status, code and param the decision names (403 ``cameo_consent_required``)."""

    default_code = "content_policy_violation"

    def __init__(self, message: str, *, rule: str, kind: str, status: int = 400, code: str | None = None,
                 param: str | None = "prompt") -> None:
        super().__init__(message, param=param, code=code)
        self.rule, self.kind, self.status_code = rule, kind, status


def moderate(moderator: Moderator | None, request: ModerationRequest) -> None:
    """Ask the moderator (blocking: call it off the event loop); a refusal raises ContentPolicyViolation."""
    if moderator is None:
        return
    decision = moderator.check(request)
    if not decision.allowed:
        raise ContentPolicyViolation(decision.message or f"prompt: refused by the content policy ({decision.rule})",
                                     rule=decision.rule or "unnamed", kind=decision.kind or "unknown",
                                     status=decision.status, code=decision.code, param=decision.param)


def param_of(message: str) -> str | None:
    """Our checks word errors 'field: what is wrong'."""
    match = _PARAM_PREFIX.match(message)
    return match.group(1) if match else None


def find_target(models: Sequence[ModelSpec], aliases: Sequence[ModelAlias], name: str | None) -> Target:
    """A request's ``model``: a served model's id or an alias (a tier); 400 ``model_not_found`` lists both."""
    try:
        return resolve(models, aliases, name)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="model", code="model_not_found") from None


def place_request(target: Target, size: str | None, seconds: int | None) -> Placement:
    """Where the request renders (``farm.render.tiers.place``): a tier's defaults or its mapping of
    OpenAI's sizes and durations; a value it cannot map is a 400 naming the field and the allowed ones."""
    try:
        return place(target, size, seconds)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param=param_of(str(exc))) from None


def tier_params(target: Target, placement: Placement) -> dict[str, Any]:
    """What a job records of its tier: the alias asked for (the video object's ``model``) and what a
    mapping changed (``mapped_from``); nothing for a request that named a served model."""
    out: dict[str, Any] = {}
    if target.alias is not None:
        out["requested_model"] = target.name
    if placement.mapped_from:
        out["mapped_from"] = dict(placement.mapped_from)
    return out


def text_only(spec: ModelSpec) -> InvalidRequest:
    """The refusal of an image for a model that renders from text only."""
    return InvalidRequest(f"input_reference is not supported by model {spec.id!r}: it renders from text only",
                          param="input_reference", code="unsupported_parameter")


def check_reference(spec: ModelSpec, upload: bytes | None, reference: ImageReference | None,
                    limits: UploadLimits) -> CheckedImage | None:
    """A reference image is checked first (format, size, pixels), so a bad one is named as such; then it
    is returned for a model that takes images (``spec.takes_image``) and refused for one that renders
    from text only. A model that takes images needs one: its absence is refused too.

    ``upload`` is the image's bytes (a file part, or what a file id or URL held: the caller read them,
    ``farm.api.image_refs``); a ``reference`` here is read only when it is a data URL. A file id or a
    remote URL left unread is refused: for a text-only model as such, before anything is fetched."""
    if upload is None and reference is not None:
        if reference.image_url is None or not is_data_url(reference.image_url):
            if not spec.takes_image:
                raise text_only(spec)
            raise InvalidRequest("input_reference: file ids and image URLs are read by POST /v1/videos only; send "
                                 "the image as a base64 data URL here", param="input_reference",
                                 code="unsupported_parameter")
        upload = decode_data_url(reference.image_url, limits, "input_reference.image_url")
    if upload is None:
        if spec.takes_image:
            raise InvalidRequest(f"input_reference: model {spec.id!r} renders from an image and needs one; send it "
                                 "as a file part, a file_id or an image_url", param="input_reference",
                                 code="missing_required_parameter")
        return None
    checked = check_image(upload, limits)
    if not spec.takes_image:
        raise text_only(spec)
    return checked


def cache_param(cache: CacheSetting | None) -> dict[str, Any]:
    """The job param of a request's ``cache`` (a plain dict), or nothing when the request named none: a
    body without one keeps the params, and the Idempotency-Key fingerprint, it had before the field existed."""
    return {} if cache is None else {"cache": cache.model_dump()}


def check_render(spec: ModelSpec, prompt: str, size: str, seconds: int, extra: dict[str, Any],
                 max_prompt_chars: int) -> tuple[RenderParams, dict[str, Any]]:
    """The model's limits; returns the render parameters and the params to store (a random seed is
    drawn when none was asked for, and recorded, so a rerun reproduces the clip; ``audio`` is recorded
    for a model that makes audio: the request's choice, else on)."""
    if len(prompt) > max_prompt_chars:
        raise InvalidRequest(f"prompt: {len(prompt)} characters is too long; allowed: at most {max_prompt_chars}",
                             param="prompt")
    seed = extra.get("seed")
    seed = seed if seed is not None else secrets.randbelow(2**63)
    try:
        params = validate_request(spec, prompt=prompt, size=size, seconds=seconds, steps=extra.get("steps"),
                                  seed=seed, scheduler=extra.get("scheduler"), audio=extra.get("audio"))
    except ValueError as exc:
        raise InvalidRequest(str(exc), param=param_of(str(exc))) from None
    if extra.get("cache") is not None:  # the model's default otherwise, resolved where the model runs
        try:
            params = params.model_copy(update={"cache": parse_cache(extra["cache"])})
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="cache") from None
    stored = {**extra, "seed": params.seed, "steps": params.steps, "scheduler": params.scheduler}
    stored.pop("audio", None)
    if spec.audio:  # recorded where a model makes audio; a model without it never has any (params unchanged)
        stored["audio"] = params.audio
    return params, stored


def check_create_body(data: Any, models: list[ModelSpec], *, max_prompt_chars: int,
                      upload_limits: UploadLimits, aliases: Sequence[ModelAlias] = (),
                      moderator: Moderator | None = None, owner: str | None = None) -> CheckedVideo:
    """A JSON create body (a batch line's ``body``, ``owner``'s), checked as ``POST /v1/videos`` checks
    one (an alias resolves and maps the same way, and the content policy is asked)."""
    if not isinstance(data, dict):
        raise InvalidRequest(f"request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    try:
        body = CreateVideoRequest.model_validate(data)
    except ValidationError as exc:
        raise from_pydantic(exc, allowed=tuple(CreateVideoRequest.model_fields)) from None
    target = find_target(models, aliases, body.model)
    if target.spec.takes_image:  # a batch line has nowhere to keep its image before its job exists
        raise InvalidRequest(f"model: {target.spec.id!r} renders from an image, which batch lines cannot carry; "
                             "create its videos with POST /v1/videos", param="model", code="unsupported_parameter")
    check_reference(target.limits, None, body.input_reference, upload_limits)
    placement = place_request(target, body.size, body.seconds)
    extra = {"seed": body.seed, "steps": body.steps, "scheduler": body.scheduler,
             "audio": body.audio} | cache_param(body.cache)
    params, stored = check_render(target.limits, body.prompt, placement.size, placement.seconds, extra,
                                  max_prompt_chars)
    if moderator is not None:
        from farm.policy.moderation import ModerationRequest

        moderate(moderator, ModerationRequest(params.prompt, owner, target.spec.id, "batch",
                                              characters=tuple(body.characters or ())))
    return CheckedVideo(model=target.spec.id, prompt=params.prompt, size=placement.size, seconds=placement.seconds,
                        priority=body.priority, params=stored | tier_params(target, placement))
