"""Property-based tests (hypothesis) for what the gateway accepts and how it refuses.

- ``CreateVideoRequest``: any JSON object either validates or becomes one 400 naming a field;
  valid requests round-trip; ``seconds`` takes "4" and 4 alike; the prompt rules.
- ``farm/api/errors.py``: every error body encodes, every class has its status and type.
- ``farm.render.registry``: ``parse_size`` and ``validate_request`` accept what a model offers
  and refuse the rest with a ValueError naming the field.
- The gateway end to end, API keys required (TestClient, real SQLite store, real SeaweedFS for Range downloads):
  random create bodies get 200/400/404/413/415/422/429, never a 5xx, and every 4xx has the OpenAI
  error shape.
"""

from __future__ import annotations

import json
import math
import re
import string
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from farm.api import errors
from farm.api.errors import APIError, from_pydantic, from_validation_errors
from farm.api.schemas import CreateVideoRequest, VideoObject
from farm.render.registry import ModelSpec, RenderParams, parse_size, validate_request

# derandomize: CI sees the same examples every run; a failure reproduces from the test alone.
PROPS = settings(max_examples=300, derandomize=True, deadline=None)
# The gateway's examples reuse one app per test (function-scoped fixtures are deliberate).
E2E = settings(max_examples=150, derandomize=True, deadline=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

FIELDS = tuple(CreateVideoRequest.model_fields)
WHOLE = re.compile(r"^\s*-?[0-9]{1,20}\s*$")
ERROR_KEYS = {"message", "type", "param", "code"}
# FastAPI's location roots: errors.py strips them from FastAPI's locs, never from a body key of that name.
LOC_ROOTS = {"body", "query", "path", "header", "cookie", "form"}

# -- strategies ------------------------------------------------------------------------------

# Any text a Python str can hold, lone surrogates included (json.loads produces them from "\ud800").
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)
json_scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                | any_text)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(any_text, inner, max_size=3), max_leaves=8)

# A visible character somewhere, no NUL: what the prompt rules accept.
prompts = st.builds(lambda a, c, b: a + c + b, st.text(max_size=30), st.characters(categories=("L", "N", "P", "S")),
                    st.text(max_size=30)).filter(lambda s: "\x00" not in s)
valid_sizes = st.sampled_from(["128x128", "96x160", "64x64"])
number_like = (st.integers() | st.integers(-10**6, 10**6).map(str) | st.floats()
               | st.sampled_from(["4", " 4 ", "4.0", "04", "-0", "1e3", "four", "", "0x10", "٤"]))
field_values: dict[str, st.SearchStrategy[Any]] = {
    "prompt": prompts | any_text | json_values,
    "model": st.sampled_from(["wan-tiny", "wan-tiny-2x", "sora-2"]) | st.none() | json_values,
    "seconds": number_like | st.none() | json_values,
    "size": valid_sizes | st.from_regex(r"\A[0-9]{1,6}x[0-9]{1,6}\Z") | st.none() | json_values,
    "input_reference": st.none() | st.fixed_dictionaries({}, optional={"file_id": any_text, "image_url": any_text})
    | json_values,
    "seed": number_like | st.none(),
    "steps": number_like | st.none(),
    "priority": st.sampled_from(["interactive", "bulk", "urgent"]) | json_values,
    "scheduler": st.sampled_from(["unipc", "flow-euler", "ddim"]) | json_values,
}
extra_keys = any_text.filter(lambda k: k not in FIELDS and k not in LOC_ROOTS and k != "")
create_objects = st.builds(
    lambda known, extra: known | extra,
    st.fixed_dictionaries({}, optional=field_values),
    st.dictionaries(extra_keys, json_values, max_size=2) | st.just({}),
)
# Requests a model could take: every field in its valid range (the model's own limits aside).
valid_requests = st.fixed_dictionaries({"prompt": prompts}, optional={
    "model": st.sampled_from(["wan-tiny", "wan-tiny-2x"]) | st.none(),
    "seconds": st.integers(1, 10**9) | st.integers(1, 10**9).map(str) | st.none(),
    "size": valid_sizes | st.none(),
    "seed": st.integers(0, 2**63 - 1) | st.none(),
    "steps": st.integers(1, 10_000) | st.none(),
    "priority": st.sampled_from(["interactive", "bulk"]),
    "scheduler": st.sampled_from(["unipc", "flow-euler"]),
})


def _encodes(error: APIError) -> None:
    body = error.body()
    json.dumps(body, ensure_ascii=False).encode("utf-8")  # raises on a lone surrogate
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS


# -- CreateVideoRequest ----------------------------------------------------------------------


@PROPS
@given(create_objects)
@example({"prompt": "x", "seconds": True})
@example({"prompt": "x", "input_reference": {"file_id": "f", "other": 1}})
@example({"prompt": "a\ud800"})
def test_any_object_validates_or_is_a_400_naming_a_field(body: dict[str, Any]) -> None:
    try:
        request = CreateVideoRequest.model_validate(body)
    except ValidationError as exc:
        error = from_pydantic(exc, allowed=FIELDS)
        assert error.status_code == 400 and error.error_type == "invalid_request_error"
        assert error.param, error.message
        # A known field, or the unknown key the client sent (dotted below input_reference).
        assert error.param.split(".")[0] in set(FIELDS) | set(body), error.param
        assert error.message.startswith(f"{error.param}:"), error.message
        assert error.code in ("invalid_value", "missing_required_parameter", "unknown_parameter")
        _encodes(error)
    else:
        assert request.prompt == body["prompt"]
        assert CreateVideoRequest.model_validate(request.model_dump()) == request
        assert CreateVideoRequest.model_validate_json(request.model_dump_json()) == request


@pytest.mark.parametrize("key", sorted(LOC_ROOTS) + [""])
def test_unknown_key_named_like_a_loc_root_is_still_named(key: str) -> None:
    with pytest.raises(ValidationError) as exc:
        CreateVideoRequest.model_validate({"prompt": "x", key: 1})
    error = from_pydantic(exc.value, allowed=FIELDS)
    assert error.param == key and error.message.startswith(f"{key}: unknown parameter")


@PROPS
@given(valid_requests)
def test_valid_requests_round_trip(body: dict[str, Any]) -> None:
    request = CreateVideoRequest.model_validate(body)
    assert request.model_dump(exclude_unset=True).keys() == body.keys()
    for name, value in body.items():
        expected = int(value) if name == "seconds" and isinstance(value, str) else value
        assert getattr(request, name) == expected
    again = CreateVideoRequest.model_validate_json(json.dumps(body))
    assert again == request == CreateVideoRequest.model_validate(request.model_dump())


@PROPS
@given(st.integers(0, 10**18), st.sampled_from(["", " ", "\t"]))
def test_seconds_takes_strings_and_integers_alike(n: int, pad: str) -> None:
    as_int = CreateVideoRequest.model_validate({"prompt": "p", "seconds": n})
    as_str = CreateVideoRequest.model_validate({"prompt": "p", "seconds": f"{pad}{n}{pad}"})
    as_float = CreateVideoRequest.model_validate({"prompt": "p", "seconds": float(n)}) if n < 2**53 else as_int
    assert as_int.seconds == as_str.seconds == as_float.seconds == n


@PROPS
@given(st.booleans() | st.floats().filter(lambda f: not f.is_integer()) | any_text.filter(lambda s: not WHOLE.match(s))
       | st.lists(st.integers(), max_size=2) | st.dictionaries(st.text(max_size=2), st.integers(), max_size=1))
def test_seconds_refuses_everything_else_naming_it(value: Any) -> None:
    with pytest.raises(ValidationError) as exc:
        CreateVideoRequest.model_validate({"prompt": "p", "seconds": value})
    error = from_pydantic(exc.value, allowed=FIELDS)
    assert error.param == "seconds" and error.message.startswith("seconds:")
    _encodes(error)


@PROPS
@given(any_text | st.text(st.sampled_from(" \t\n\r\x0b\x0c\x1c\x85\xa0\u2003\u3000\ufeff\x00a"), max_size=6))
def test_prompt_needs_a_visible_character_and_no_nul(prompt: str) -> None:
    surrogate = any(0xD800 <= ord(c) <= 0xDFFF for c in prompt)
    acceptable = bool(prompt.strip()) and "\x00" not in prompt and not surrogate
    pattern = CreateVideoRequest.model_json_schema()["properties"]["prompt"]["pattern"]
    try:
        request = CreateVideoRequest.model_validate({"prompt": prompt})
    except ValidationError as exc:
        assert not acceptable, prompt
        error = from_pydantic(exc, allowed=FIELDS)
        assert error.param == "prompt" and error.message.startswith("prompt:")
        _encodes(error)
    else:
        assert acceptable and request.prompt == prompt  # kept as sent; validate_request strips it later
        # The documented pattern (Python's reading of \S) says the same.
        assert re.search(pattern, prompt)


# -- errors.py -------------------------------------------------------------------------------

STATUS = {errors.InvalidRequest: 400, errors.NotFound: 404, errors.VideoNotReady: 404, errors.Conflict: 409,
          errors.Forbidden: 403, errors.Unprocessable: 422, errors.PayloadTooLarge: 413,
          errors.UnsupportedMediaType: 415, errors.ServiceUnavailable: 503}


def test_every_error_class_has_a_status_and_a_type() -> None:
    def subclasses(cls: type) -> set[type]:
        return {cls} | {s for c in cls.__subclasses__() for s in subclasses(c)}

    in_errors = {c for c in subclasses(APIError) if c.__module__ == errors.__name__} - {APIError}
    assert in_errors == set(STATUS) | {errors.RateLimited}, "a new error class: add it to STATUS"
    for cls in in_errors:
        expected = "rate_limit_error" if cls.status_code == 429 else (
            "server_error" if cls.status_code >= 500 else "invalid_request_error")
        assert cls.error_type == expected and 400 <= cls.status_code < 600


@PROPS
@given(st.sampled_from(sorted(STATUS, key=lambda c: c.__name__)), any_text, st.none() | any_text,
       st.none() | st.text(string.ascii_lowercase + "_", max_size=20))
def test_error_bodies_always_encode(cls: type[APIError], message: str, param: str | None, code: str | None) -> None:
    error = cls(message, param=param, code=code)
    assert error.status_code == STATUS[cls]
    _encodes(error)
    assert error.body()["error"]["code"] == (code if code is not None else cls.default_code)


@PROPS
@given(st.floats(0, 10**6), any_text)
def test_rate_limited_sends_a_whole_retry_after(seconds: float, message: str) -> None:
    error = errors.RateLimited(message, retry_after_s=seconds)
    assert error.status_code == 429 and error.error_type == "rate_limit_error"
    retry = int(error.headers["Retry-After"])
    assert retry == max(1, math.ceil(seconds)) and retry >= seconds  # never earlier than asked
    _encodes(error)


validation_errors = st.lists(st.fixed_dictionaries(
    {"type": st.sampled_from(["missing", "extra_forbidden", "json_invalid", "value_error", "string_type"]) | any_text,
     "loc": st.lists(any_text | st.integers(0, 5), max_size=4).map(tuple),
     "msg": any_text},
    optional={"input": json_values, "ctx": st.fixed_dictionaries({"error": any_text})},
), max_size=3)


@PROPS
@given(validation_errors, st.lists(any_text, max_size=3))
def test_any_validation_error_list_becomes_one_encodable_400(errs: list[dict[str, Any]], allowed: list[str]) -> None:
    error = from_validation_errors(errs, allowed=allowed)
    assert error.status_code == 400 and error.error_type == "invalid_request_error"
    _encodes(error)
    shown = errs[0].get("input") if errs else None
    if isinstance(shown, str) and len(shown) > 200:
        assert shown not in error.message  # an oversized value is never echoed whole


# -- the model registry ----------------------------------------------------------------------

SPEC = ModelSpec(id="wan-tiny", path="/models/wan-tiny", sizes=["64x64", "128x128", "96x128"], seconds=[1, 2],
                 default_steps=4, max_steps=50)


@PROPS
@given(st.integers(1, 999_999), st.integers(1, 999_999), st.sampled_from(["", " ", "\n"]))
def test_parse_size_reads_width_and_height(width: int, height: int, pad: str) -> None:
    assert parse_size(f"{pad}{width}x{height}{pad}") == (width, height)


@pytest.mark.parametrize("size", ["0x0", "0x128", "128x0", "0128x128", "1234567x1"])
def test_parse_size_refuses_zero_leading_zeros_and_absurd_sizes(size: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(size)


@PROPS
@given(any_text | json_values)
def test_parse_size_refuses_anything_else_naming_the_field(size: Any) -> None:
    canonical = isinstance(size, str) and re.fullmatch(r"\s*[0-9]+x[0-9]+\s*", size)
    assume(not canonical and not (isinstance(size, str) and re.fullmatch(r"\s*\d+x\d+\s*", size)))
    with pytest.raises(ValueError, match="size"):
        parse_size(size)


@pytest.mark.parametrize("size", ["１２８x１２８", "١٢٨x١٢٨"])
def test_parse_size_takes_ascii_digits_only(size: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(size)


@PROPS
@given(prompt=any_text, size=valid_sizes | any_text, seconds=st.integers(-3, 5), steps=st.none() | st.integers(-5, 60),
       seed=st.integers(-5, 2**64), scheduler=st.sampled_from(["unipc", "flow-euler", "ddim", ""]))
def test_validate_request_accepts_what_the_model_offers_and_names_the_rest(
    prompt: str, size: str, seconds: int, steps: int | None, seed: int, scheduler: str,
) -> None:
    wrong = [name for name, bad in [
        ("prompt", not prompt.strip()), ("size", size not in SPEC.sizes), ("seconds", seconds not in SPEC.seconds),
        ("steps", steps is not None and not 1 <= steps <= SPEC.max_steps), ("seed", not 0 <= seed < 2**63),
        ("scheduler", scheduler not in ("unipc", "flow-euler")),
    ] if bad]
    try:
        params = validate_request(SPEC, prompt=prompt, size=size, seconds=seconds, steps=steps, seed=seed,
                                  scheduler=scheduler)
    except ValueError as exc:
        assert wrong, f"refused a valid request: {exc}"
        assert str(exc).split(":")[0] == wrong[0], (str(exc), wrong)  # checked in field order, first one named
    else:
        assert not wrong, f"accepted {wrong}"
        assert isinstance(params, RenderParams)
        assert (params.width, params.height) == parse_size(size) and params.prompt == prompt.strip()
        assert params.steps == (SPEC.default_steps if steps is None else steps)
        assert (params.seconds, params.seed, params.scheduler) == (seconds, seed, scheduler)


# -- the gateway end to end ------------------------------------------------------------------

ALLOWED = {200, 400, 404, 413, 415, 422, 429}
REUSED_KEY = {409, 422}  # Idempotency-Key sent before with another body (the IETF draft says 422; OpenAI 409)
BODY_LIMIT = 4096  # small, so generated bodies reach the 413 path too
media_types = st.sampled_from([
    "application/json", "application/json; charset=utf-8", "application/merge-patch+json", "text/plain",
    "application/xml", "multipart/form-data", "multipart/form-data; boundary=", "application/x-www-form-urlencoded",
    "", "*/*", "application/octet-stream", "application/json; charset=latin-1",
])
form_text = st.text(st.characters(codec="utf-8"), max_size=30)
forms = st.dictionaries(st.sampled_from(FIELDS) | form_text, form_text | number_like.map(str), max_size=6)
# What the test app's models take (tests/api/conftest.py), so creates succeed often enough to fill the queue.
acceptable = st.fixed_dictionaries({"prompt": prompts}, optional={
    "model": st.just("wan-tiny"), "size": st.sampled_from(["128x128", "96x160"]),
    "seconds": st.sampled_from([1, 2, "1", "2"]), "steps": st.integers(1, 50), "seed": st.integers(0, 2**63 - 1),
    "priority": st.sampled_from(["interactive", "bulk"]),
})
wire = st.one_of(
    create_objects.map(lambda b: ("json", b)),
    acceptable.map(lambda b: ("json", b)),
    st.tuples(st.just("form"), forms), st.tuples(st.just("multipart"), forms),
    acceptable.map(lambda b: ("multipart", {k: str(v) for k, v in b.items()})),
    st.tuples(st.just("raw"), st.tuples(media_types, st.binary(max_size=200) | json_values.map(
        lambda v: json.dumps(v).encode()))),
    st.integers(BODY_LIMIT - 50, BODY_LIMIT + 200).map(lambda n: ("json", {"prompt": "x" * n})),
)
idempotency_keys = st.none() | st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=300)


def assert_openai_error(response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


@pytest.fixture
def gateway(make_auth_app, objects, auth_headers):
    """The gateway with API keys required, as a tenant (auth_headers) calls it."""
    app = make_auth_app(objects=objects, max_queued=20, max_body_bytes=BODY_LIMIT)
    with TestClient(app, headers=auth_headers, raise_server_exceptions=False) as client:
        yield client


def _send(client: TestClient, kind: str, payload: Any, headers: dict[str, str]):
    if kind == "json":  # serialized here: json.dumps escapes lone surrogates, as real clients do
        return client.post("/v1/videos", content=json.dumps(payload).encode(),
                           headers=headers | {"Content-Type": "application/json"})
    if kind == "form":
        return client.post("/v1/videos", data=payload, headers=headers)
    if kind == "multipart":  # (None, value): a plain field, sent as multipart
        return client.post("/v1/videos", files={k: (None, v) for k, v in payload.items()} or {"prompt": (None, "")},
                           headers=headers)
    media, raw = payload
    return client.post("/v1/videos", content=raw, headers=headers | ({"Content-Type": media} if media else {}))


@E2E
@given(body=wire, idempotency_key=idempotency_keys)
def test_gateway_answers_any_create_body_without_a_server_error(gateway, jobs, body, idempotency_key) -> None:
    kind, payload = body
    headers = {} if idempotency_key is None else {"Idempotency-Key": idempotency_key}
    response = _send(gateway, kind, payload, headers)
    event(f"{kind} -> {response.status_code}")  # see --hypothesis-show-statistics
    allowed = ALLOWED | (REUSED_KEY if idempotency_key else set())
    assert response.status_code in allowed, (response.status_code, response.text[:500])
    if response.status_code == 200:
        video = VideoObject.model_validate(response.json())
        assert jobs.get(video.id) is not None and int(response.headers["openai-poll-after-ms"]) >= 0
    else:
        error = assert_openai_error(response)
        if response.status_code == 400:
            assert error["type"] == "invalid_request_error"
        if response.status_code in REUSED_KEY:
            assert error["param"] == "Idempotency-Key" or response.status_code == 422, error
        if response.status_code == 429:
            assert error["type"] == "rate_limit_error" and int(response.headers["Retry-After"]) >= 1


@pytest.fixture
def finished_video(gateway, jobs, objects, tmp_path) -> tuple[str, bytes]:
    from tests.api.conftest import finish_job

    clip = bytes(range(256)) * 40 + b"tail"
    video = gateway.post("/v1/videos", json={"prompt": "a red fox"}).json()
    finish_job(jobs, objects, video["id"], {"video": clip}, tmp_path)
    return video["id"], clip


ranges = st.one_of(
    st.builds(lambda a, b: f"bytes={a}-{b}", st.integers(0, 12000), st.integers(0, 12000)),
    st.builds(lambda a: f"bytes={a}-", st.integers(0, 12000)),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30),
    st.sampled_from(["bytes=-100", "bytes=0-1,5-9", "bytes=", "items=0-1", "bytes=99999999999999999999-"]),
)


@E2E
@given(range_header=ranges)
def test_content_answers_any_range_header(gateway, finished_video, range_header: str) -> None:
    video_id, clip = finished_video
    response = gateway.get(f"/v1/videos/{video_id}/content", headers={"Range": range_header})
    event(f"-> {response.status_code}")
    assert response.status_code in (200, 206, 416), (response.status_code, response.text[:300])
    if response.status_code == 200:
        assert response.content == clip
    elif response.status_code == 206:
        first, last = (int(n) for n in re.fullmatch(r"bytes (\d+)-(\d+)/\d+", response.headers["Content-Range"])
                       .groups())
        assert response.content == clip[first:last + 1] and first <= last < len(clip)
    else:
        assert response.headers["Content-Range"] == f"bytes */{len(clip)}"
        assert_openai_error(response)

