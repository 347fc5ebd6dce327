"""Request and response models of the ``/v1/videos`` API, wire-compatible with OpenAI's.

Field names and types follow the ``openai`` SDK's ``Video``, ``VideoCreateParams``,
``VideoDeleteResponse`` and cursor page. Farm extensions (``seed``, ``steps``, ``priority``, ``audio``,
``scheduler``) are optional request fields that OpenAI clients can send with ``extra_body``.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, field_validator, model_validator
from starlette.datastructures import UploadFile
from starlette.requests import Request

from farm.api.errors import InvalidRequest, UnsupportedMediaType, from_pydantic
from farm.render.registry import CACHE_KINDS, CacheSetting, parse_cache
from farm.render.tiers import OPENAI_SECONDS, OPENAI_SIZES

if TYPE_CHECKING:
    from farm.render.registry import ModelSpec
    from farm.render.tiers import ModelAlias

Priority = Literal["interactive", "bulk"]
Scheduler = Literal["unipc", "flow-euler"]
# "cancelled" is a farm extension: OpenAI's clients treat an unknown status as final.
Status = Literal["queued", "in_progress", "completed", "failed", "cancelled"]
Variant = Literal["video", "thumbnail", "spritesheet"]
Order = Literal["asc", "desc"]

VARIANTS: tuple[str, ...] = ("video", "thumbnail", "spritesheet")
_WHOLE = re.compile(r"^\s*-?[0-9]{1,20}\s*$")


def _whole_number(name: str, value: Any) -> Any:
    """Accept ints and decimal strings (multipart sends every field as a string); reject the rest."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, str) and _WHOLE.match(value):
        return int(value)
    if isinstance(value, float) and value.is_integer():  # JSON Schema counts 4.0 as an integer
        return int(value)
    raise ValueError(f"{name}: must be a whole number, got {value!r}")


def _flag(name: str, value: Any) -> Any:
    """Accept booleans, and multipart's "true"/"false" (any case); reject the rest (1, "0", "yes"),
    which JSON Schema's boolean does not allow either."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"{name}: must be true or false, got {value!r}")


# Clients send seconds as "4" (the SDK's type) or 4; the schema says so.
_SecondsField = Annotated[
    int,
    WithJsonSchema({
        "anyOf": [{"type": "integer", "minimum": 1}, {"type": "string", "pattern": r"^[0-9]{1,9}$"}],
        "description": "Clip duration in whole seconds, as a string ('4') or an integer.",
    }),
]


_Characters = Annotated[list[Annotated[str, Field(min_length=1, max_length=64)]] | None, Field(max_length=4)]
_CHARACTERS_DOC = ("Farm extension: ids of cameos (characters) the video uses, besides those the prompt names as "
                   "@name; multipart sends them comma-separated. Each needs its owner's consent (else 403 "
                   "cameo_consent_required); the clip renders from the first one's reference frame.")


# extra_body "cache": "off", a kind's name, or {"kind", "threshold"}; inlined (the create schema drops $defs).
_CacheField = Annotated[
    CacheSetting | None,
    WithJsonSchema({
        "anyOf": [
            {"type": "string", "enum": list(CACHE_KINDS)},
            {"type": "object", "additionalProperties": False, "properties": {
                "kind": {"type": "string", "enum": list(CACHE_KINDS)},
                "threshold": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}}},
            {"type": "null"},
        ],
        "description": "Farm extension: cache acceleration of the denoiser's forwards (diffusers' hooks), overriding "
                       "the model's default: 'off', or {'kind': 'first_block', 'threshold': 0.05}. The cache lives "
                       "within one shard (each shard starts empty); a cached clip drifts a little from an uncached one.",
    }),
]


def _cache_setting(value: Any) -> Any:
    """``parse_cache``, plus the multipart form of an object (its JSON text)."""
    if value is None or isinstance(value, CacheSetting):
        return value
    if isinstance(value, str) and value.strip().startswith("{"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"cache: {value[:80]!r} is not a JSON object") from None
    return parse_cache(value)


def _comma_list(value: Any) -> Any:
    """A form field's "char_a,char_b" as a list (an empty part stays, to be refused); JSON lists pass."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",")]
    return value


class ImageReference(BaseModel):
    """The JSON form of ``input_reference`` (multipart: ``input_reference[file_id]`` or
    ``input_reference[image_url]``): exactly one of an uploaded file's id or an image URL
    (``farm.api.image_refs``)."""

    model_config = ConfigDict(extra="forbid")

    file_id: str | None = Field(default=None, min_length=1, max_length=64,
                                description="Id of the caller's file uploaded with POST /v1/files, purpose 'vision' "
                                "or 'user_data'.")
    image_url: str | None = Field(default=None, min_length=1, description="An http(s) URL the gateway fetches "
                                  "(public addresses only, within serve.image_url_* limits) or a base64 data URL.")

    @model_validator(mode="after")
    def _exactly_one(self) -> "ImageReference":
        if (self.file_id is None) == (self.image_url is None):
            raise ValueError("input_reference: give exactly one of file_id or image_url")
        return self


class CreateVideoRequest(BaseModel):
    """``POST /v1/videos``: as JSON or as multipart/form-data (what the SDK sends)."""

    model_config = ConfigDict(extra="forbid", title="CreateVideoRequest")

    prompt: str = Field(
        min_length=1, description="What to render; any language the text encoder covers.",
        # Documents what _prompt enforces (a pydantic pattern would word its error less clearly).
        json_schema_extra={"pattern": r"^[^\x00]*\S[^\x00]*$"},
    )
    model: str | None = Field(default=None, description="Model id or alias (GET /v1/models lists both); defaults to "
                              "the farm's first model.")
    seconds: _SecondsField | None = Field(default=None, description="Clip duration; defaults to the model's first.")
    size: str | None = Field(
        default=None, pattern=r"^[0-9]{1,5}x[0-9]{1,5}$",
        description="Output resolution 'WIDTHxHEIGHT'; defaults to the model's first size.",
    )
    input_reference: ImageReference | None = Field(
        default=None, description="An image that guides generation (multipart: a file part).",
    )
    seed: int | None = Field(
        default=None, ge=0, le=2**63 - 1, description="Farm extension: random seed; random when omitted.",
    )
    steps: int | None = Field(
        default=None, ge=1, le=10_000, description="Farm extension: denoising steps; the model's default when omitted.",
    )
    priority: Priority = Field(
        default="interactive", description="Farm extension: 'bulk' jobs yield to 'interactive' ones.",
    )
    scheduler: Scheduler | None = Field(
        default=None, description="Farm extension: the denoising solver; omitted, the model's default "
        "('unipc' for Wan, 'flow-euler' for LTX-2, which runs only that).",
    )
    audio: bool | None = Field(
        default=None, description="Farm extension: whether the clip carries an audio track. Omitted, a model "
        "that makes audio (GET /v1/models `audio`) adds one and other models do not; true on a model without "
        "audio is a 400.",
    )
    characters: _Characters = Field(default=None, description=_CHARACTERS_DOC)
    cache: _CacheField = Field(default=None)

    @field_validator("cache", mode="before")
    @classmethod
    def _cache(cls, value: Any) -> Any:
        return _cache_setting(value)

    @field_validator("characters", mode="before")
    @classmethod
    def _character_ids(cls, value: Any) -> Any:
        return _comma_list(value)

    @field_validator("seconds", "seed", "steps", mode="before")
    @classmethod
    def _numbers(cls, value: Any, info: Any) -> Any:
        return _whole_number(info.field_name, value)

    @field_validator("audio", mode="before")
    @classmethod
    def _audio(cls, value: Any) -> Any:
        return _flag("audio", value)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt: must not be empty or only whitespace")
        if "\x00" in value:  # PostgreSQL text cannot hold NUL
            raise ValueError("prompt: must not contain NUL characters")
        return value


class RemixVideoRequest(BaseModel):
    """``POST /v1/videos/{id}/remix``: a new prompt over the source video's settings."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, description="The new prompt; model, size, seconds, steps and seed are the source's.")
    strength: float | None = Field(
        default=None, description="Farm extension: how far the remix may move from the source's frames, in (0, 1] "
        "(the share of the schedule run from the noised source); default 0.6.")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        return CreateVideoRequest._prompt(value)


class VideoError(BaseModel):
    """Why a video failed."""

    code: str | None = Field(default=None, description="A machine-readable error code.")
    message: str | None = Field(default=None, description="A human-readable description.")


class UsageLine(BaseModel):
    """Accelerator-seconds on one pool and kind of device."""

    pool: str = Field(description="The pool: a denoiser pool (model:expert), 'decode' or 'finish'.")
    device: str = Field(description="The kind of device the replicas ran on: 'cpu', 'cuda'.")
    seconds: float = Field(description="Replica wall time, summed over the stages that ran there.")


class VideoUsage(BaseModel):
    """Farm extension: the replica time a video used so far (each completed stage counted once)."""

    accelerator_seconds: float = Field(description="The sum over every pool and device.")
    by_pool: list[UsageLine] = Field(description="Seconds per pool and device kind.")


class MappedFrom(BaseModel):
    """The OpenAI size or duration a request asked for, where its tier renders another (farm.render.tiers)."""

    size: str | None = Field(default=None, description="The size asked for; the video's `size` is what renders.")
    seconds: str | None = Field(default=None, description="The duration asked for; `seconds` is what renders.")


class VideoObject(BaseModel):
    """One video job, the ``Video`` object of the OpenAI API plus farm extensions."""

    id: str = Field(description="Unique identifier for the video job.")
    object: Literal["video"] = "video"
    created_at: int = Field(description="Unix seconds when the job was created.")
    completed_at: int | None = Field(default=None, description="Unix seconds when the job finished, if it has.")
    expires_at: int | None = Field(default=None, description="Unix seconds when the assets expire, if set.")
    error: VideoError | None = Field(default=None, description="Why generation failed, if it did.")
    model: str = Field(description="The model asked for: an alias (e.g. 'sora-2') as sent, else the model's id.")
    progress: int = Field(ge=0, le=100, description="Approximate completion percentage.")
    prompt: str | None = Field(default=None, description="The prompt of the job.")
    remixed_from_video_id: str | None = Field(default=None, description="Source video of a remix.")
    seconds: str = Field(description="Clip duration in seconds.")
    size: str = Field(description="Resolution 'WIDTHxHEIGHT'.")
    status: Status = Field(description="queued, in_progress, completed, failed or (farm extension) cancelled.")
    priority: Priority | None = Field(default=None, description="Farm extension: scheduling class.")
    seed: int | None = Field(default=None, description="Farm extension: the seed the clip renders with.")
    cancel_requested: bool | None = Field(default=None, description="Farm extension: a cancel was asked for.")
    queue_position: int | None = Field(
        default=None, ge=0, description="Farm extension: jobs of its model that start before it (0: next); null once "
        "it has started on a replica, or when unknown.")
    estimated_completion_at: int | None = Field(
        default=None, description="Farm extension: Unix seconds when it should complete, from the scheduler's queue "
        "and measured stage costs; null when finished or before its model's stages were measured.")
    usage: VideoUsage | None = Field(default=None, description="Farm extension: replica-seconds used so far.")
    visibility: Literal["private", "shared", "unlisted"] | None = Field(
        default=None, description="Farm extension: who besides its owner may see it: 'private' (a draft), 'shared' "
        "(named accounts) or 'unlisted' (anyone with a live link).")
    expired: bool | None = Field(
        default=None, description="Farm extension: true from expires_at on; its content then answers 404 "
        "video_expired and its objects are removed from storage. status is unchanged.")
    served_model: str | None = Field(
        default=None, description="Farm extension: the served model that renders it (`model` may be an alias).")
    mapped_from: MappedFrom | None = Field(
        default=None, description="Farm extension: what the request asked where an alias's mapping changed it "
        "(`size` and `seconds` say what renders); null when nothing was mapped.")


class VideoList(BaseModel):
    """A cursor page of videos; pass ``last_id`` as ``after`` for the next one."""

    object: Literal["list"] = "list"
    data: list[VideoObject]
    first_id: str | None = Field(description="Id of the first video on this page.")
    last_id: str | None = Field(description="Id of the last video on this page.")
    has_more: bool = Field(description="Whether more videos follow this page.")


class VideoDeleted(BaseModel):
    """Confirmation that a video and its stored assets are gone."""

    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool = True


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    models: list[str] = Field(description="Ids of the models this gateway accepts.")


# -- reading the create request off the wire -------------------------------------------------

_FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


async def read_create_request(request: Request, max_file_bytes: int) -> tuple[CreateVideoRequest, bytes | None]:
    """Parse a JSON or form body; also returns an uploaded ``input_reference`` file's bytes.

    A file is read up to one byte past ``max_file_bytes``, enough for the caller to refuse it.
    """
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    upload: bytes | None = None
    if media in _FORM_TYPES:
        data: Any = {}
        async with request.form(max_files=4, max_fields=64) as form:
            for key, value in form.multi_items():
                if key.startswith("characters[") and isinstance(value, str):  # the SDK sends a list as characters[]
                    listed = data.setdefault("characters", [])
                    if not isinstance(listed, list):
                        raise InvalidRequest("characters: given more than once", param="characters")
                    listed.append(value)
                    continue
                if key in data:
                    raise InvalidRequest(f"{key}: given more than once", param=key)
                if key.startswith("input_reference[") and isinstance(value, str):
                    # The SDK sends {"file_id": …} / {"image_url": …} as input_reference[file_id] etc.
                    reference, part = data.setdefault("input_reference", {}), key[len("input_reference["):-1]
                    if upload is not None or not isinstance(reference, dict) or part in reference:
                        raise InvalidRequest("input_reference: given more than once", param="input_reference")
                    reference[part] = value
                    continue
                if isinstance(value, UploadFile):
                    if key != "input_reference":
                        raise InvalidRequest(f"{key}: file uploads are only accepted for input_reference", param=key)
                    if upload is not None or "input_reference" in data:
                        raise InvalidRequest("input_reference: given more than once", param="input_reference")
                    # The SDK sends a reference image as a file part.
                    upload = await value.read(max_file_bytes + 1)
                    continue
                data[key] = value
    elif media and media != "application/json" and not media.endswith("+json"):
        raise UnsupportedMediaType(f"Content-Type {media!r} is not accepted; send application/json or "
                                   "multipart/form-data")
    else:
        raw = await request.body()
        try:
            data = json.loads(raw) if raw else None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise InvalidRequest(f"request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    try:
        return CreateVideoRequest.model_validate(data), upload
    except ValidationError as exc:
        raise from_pydantic(exc, allowed=tuple(CreateVideoRequest.model_fields)) from None


def create_body_schemas(models: Sequence[ModelSpec], max_prompt_chars: int,
                        aliases: Sequence[ModelAlias] = ()) -> dict[str, Any]:
    """OpenAPI components for the create body (JSON and multipart), with this farm's allowed values
    (an alias's tier offers a subset of its model's, plus OpenAI's values when it maps them)."""
    body = CreateVideoRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = body.pop("$defs", {})
    props = body["properties"]
    null = {"type": "null"}  # JSON may send null for "the default"
    takes_image = any(m.takes_image for m in models)
    if takes_image:  # inlined: the components hold no ImageReference of their own
        props["input_reference"] = {"anyOf": [defs["ImageReference"], null],
                                    "description": "An image that guides generation, for a model that renders from one "
                                    "(GET /v1/models: input_types): JSON {file_id} or {image_url}; multipart a file "
                                    "part, or input_reference[file_id] / input_reference[image_url] fields."}
    else:  # refused with a clear 400 when sent, not advertised
        del props["input_reference"]
    mapping = any(a.mapping == "map" for a in aliases)
    sizes = sorted({s for m in models for s in m.sizes} | (set(OPENAI_SIZES) if mapping else set()))
    seconds = sorted({s for m in models for s in m.seconds} | (set(OPENAI_SECONDS) if mapping else set()))
    props["prompt"]["maxLength"] = max_prompt_chars
    for option in props["steps"]["anyOf"]:
        if option.get("type") == "integer":
            option["maximum"] = max(m.max_steps for m in models)
    props["model"] = {"anyOf": [{"type": "string", "enum": [m.id for m in models] + [a.id for a in aliases]}, null],
                      "description": props["model"]["description"]}
    props["size"] = {"anyOf": [{"type": "string", "enum": sizes}, null], "description": props["size"]["description"]}
    props["seconds"] = {
        "anyOf": [{"type": "integer", "enum": seconds}, {"type": "string", "enum": [str(s) for s in seconds]}, null],
        "description": props["seconds"]["description"],
    }
    form = copy.deepcopy(body)
    form["title"] = "CreateVideoForm"
    for name, prop in form["properties"].items():
        # A form field cannot be null, only absent: "null" would arrive as a string.
        options = [o for o in prop.get("anyOf", ()) if o.get("type") != "null"]
        if options:
            rest = {k: v for k, v in prop.items() if k not in ("anyOf", "default")}
            form["properties"][name] = rest | (options[0] if len(options) == 1 else {"anyOf": options})
    if takes_image:  # what the SDK sends: the image as a file part
        form["properties"]["input_reference"] = {"type": "string", "format": "binary",
                                                 "description": props["input_reference"]["description"]}
    return {"CreateVideoRequest": body, "CreateVideoForm": form}
