"""What a batch line must be, checked by the gateway's own rules (the batch runner calls these).

A line is a JSON object ``{"custom_id", "method": "POST", "url": "/v1/videos", "body"}``; its
``body`` passes exactly the checks of ``POST /v1/videos`` (``farm.api.video_requests``), and a
refusal carries the same error object, its ``param`` prefixed with ``body.``. Batch videos run at
bulk priority: a body that asks for ``interactive`` is refused rather than quietly demoted. With a
``moderator`` the prompt passes the content policy too (``farm.policy.moderation``): a refused line
lands in the error file with ``content_policy_violation``, ``param`` ``body.prompt``.
"""

from __future__ import annotations

import json
import json
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from farm.api.errors import APIError, InvalidRequest
from farm.api.uploads import UploadLimits
from farm.api.video_requests import ContentPolicyViolation, check_create_body
from farm.api.wire import video_object
from farm.jobs.batch_runner import LineVerdict
from farm.jobs.batches import ENDPOINT
from farm.jobs.job import Job
from farm.render.registry import ModelSpec
from farm.render.tiers import ModelAlias, check_aliases

if TYPE_CHECKING:
    from farm.policy.moderation import Moderator

log = logging.getLogger(__name__)
LINE_FIELDS = ("custom_id", "method", "url", "body")
MAX_CUSTOM_ID = 512


class BatchLineRules:
    """``check(raw line) -> LineVerdict`` and ``video(job)``, the wire shape output lines carry."""

    def __init__(self, models: list[ModelSpec], *, max_prompt_chars: int = 4000,
                 upload_limits: UploadLimits | None = None, aliases: Sequence[ModelAlias] = (),
                 moderator: Moderator | None = None, on_refused: Callable[[str, str], None] | None = None) -> None:
        """``on_refused(rule, kind)`` hears each content-policy refusal (the farm counts them)."""
        check_aliases(models, aliases)
        self.models, self.aliases = models, list(aliases)
        self.max_prompt_chars = max_prompt_chars
        self.upload_limits = upload_limits or UploadLimits()
        self.moderator = moderator
        self.on_refused = on_refused

    def video(self, job: Job) -> dict[str, Any]:
        return video_object(job)

    def check(self, raw: bytes, owner: str | None = None) -> LineVerdict:
        """One line of ``owner``'s batch. A moderator that fails raises (the runner retries the step)."""
        custom_id = None
        try:
            try:
                line = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise InvalidRequest(f"line is not valid JSON: {exc}", code="invalid_json") from None
            if not isinstance(line, dict):
                raise InvalidRequest(f"line must be a JSON object with {', '.join(LINE_FIELDS)}; got "
                                     f"{type(line).__name__}", code="invalid_json")
            value = line.get("custom_id")
            if not isinstance(value, str) or not 1 <= len(value) <= MAX_CUSTOM_ID:
                raise InvalidRequest(f"custom_id: must be a string of 1..{MAX_CUSTOM_ID} characters, got "
                                     f"{_shown(value)}", param="custom_id",
                                     code="missing_required_parameter" if value is None else "invalid_value")
            custom_id = value
            for key in line:
                if key not in LINE_FIELDS:
                    raise InvalidRequest(f"{key}: unknown field of a batch line; allowed: {', '.join(LINE_FIELDS)}",
                                         param=key, code="unknown_parameter")
            if line.get("method") != "POST":
                raise InvalidRequest(f"method: {_shown(line.get('method'))} is not allowed; allowed: POST",
                                     param="method")
            if line.get("url") != ENDPOINT:
                raise InvalidRequest(f"url: {_shown(line.get('url'))} is not this batch's endpoint; allowed: "
                                     f"{ENDPOINT}", param="url")
            body = line.get("body")
            try:
                video = check_create_body(body, self.models, max_prompt_chars=self.max_prompt_chars,
                                          upload_limits=self.upload_limits, aliases=self.aliases,
                                          moderator=self.moderator, owner=owner)
            except ContentPolicyViolation as exc:
                self._refused(exc)
                exc.param = "body.prompt"
                raise
            except APIError as exc:
                exc.param = f"body.{exc.param}" if exc.param else "body"
                raise
            if video.priority != "bulk" and isinstance(body, dict) and "priority" in body:
                raise InvalidRequest(f"priority: {body['priority']!r} is not allowed in a batch; batch videos run "
                                     "at bulk priority (allowed: bulk, or leave it out)", param="body.priority")
        except APIError as exc:
            return LineVerdict(custom_id, error={"status_code": exc.status_code, "body": exc.body()})
        return LineVerdict(custom_id, video=video)

    def _refused(self, exc: ContentPolicyViolation) -> None:
        if self.on_refused is not None:
            try:
                self.on_refused(exc.rule, exc.kind)
            except Exception:  # a broken metrics hook must not change the line's verdict
                log.exception("on_refused hook failed")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
