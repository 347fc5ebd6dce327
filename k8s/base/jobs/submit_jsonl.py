#!/usr/bin/env python3
"""Submit every prompt of a JSONL file to a running farm, through its OpenAI-style API.

This is the entrypoint of the `videofarm-batch` RayJob and the `videofarm-nightly`
RayCronJob (k8s/base/jobs/). It predates the farm's Batch API (``/v1/files`` +
``/v1/batches``, and ``/v1/schedules``: README) and stays a plain client of ``POST /v1/videos``,
speaking through the ``openai`` SDK as any tenant would, one create per line:

1. read the whole file (a local path, or ``s3://bucket/key`` through boto3) and check
   every line; one bad line stops the run with its line number before anything is sent;
2. submit the lines in order, each with an ``Idempotency-Key`` derived from the batch id
   and the line, so a retried or repeated run replays the jobs it already created
   instead of creating them twice;
3. when the farm answers 429 (its queue, or this account's, is full), wait as long as
   ``Retry-After`` says and send the same line again: a batch larger than the queue caps
   is fed in as the queue drains;
4. when the farm is unreachable (or answers 5xx) for ``--patience-s`` in a row, stop; the
   lines not sent are counted, and a rerun with the same batch id picks up where it stopped;
5. with ``--wait``, poll until every video it submitted has finished.

One line of the file is one JSON object::

    {"prompt": "雪の森を走る赤いキツネ", "model": "wan2.1-t2v-1.3b", "size": "832x480",
     "seconds": 5, "seed": 7, "steps": 30, "priority": "bulk", "scheduler": "unipc"}

Only ``prompt`` is required; the rest default as the API defaults them, except
``priority``, which defaults to ``--priority`` (``bulk``). Blank lines are skipped.
The farm still checks each request against the model (sizes, durations, steps); a line
it refuses is reported and counted, and the others go on.

Exit status: 0 when every line was accepted (and, with ``--wait``, completed); 1 when
some were refused or failed; 2 for bad input or arguments (nothing was submitted).

Needs ``openai`` and, for ``s3://`` input, ``boto3``; the farm image has both. The API
key comes from ``--api-key`` or ``VIDEOFARM_API_KEY`` (the variable the ``farm`` command
reads); S3 credentials come from boto3's own chain (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, a role, …).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

FIELDS = ("prompt", "model", "size", "seconds", "seed", "steps", "priority", "scheduler")
PRIORITIES = ("interactive", "bulk")
SCHEDULERS = ("unipc", "flow-euler")
_SIZE = re.compile(r"^[0-9]{1,5}x[0-9]{1,5}$")
_DIGITS = re.compile(r"^[0-9]{1,9}$")
MAX_ERRORS_SHOWN = 10
TERMINAL = ("completed", "failed", "cancelled")


class BatchError(ValueError):
    """Bad input: the message names the line and the field; nothing was submitted."""


@dataclasses.dataclass(frozen=True)
class BatchLine:
    """One accepted line: its 1-based number in the file and the request it becomes."""

    number: int
    request: dict[str, Any]

    def fingerprint(self) -> str:
        body = json.dumps(self.request, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(body.encode()).hexdigest()


@dataclasses.dataclass
class Outcome:
    line: int
    video_id: str | None = None
    status: str | None = None
    error: str | None = None


# Parsing --------------------------------------------------------------------------
def _whole(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name}: must be a whole number, got {value!r}")
    if isinstance(value, str) and _DIGITS.match(value):
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int):
        raise ValueError(f"{name}: must be a whole number, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: must be at least {minimum}, got {value}")
    return value


def parse_line(obj: Any, default_priority: str) -> dict[str, Any]:
    """One decoded JSON value → the request fields to send; ValueError names the field."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(FIELDS)}")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt: required, a non-empty string")
    if "\x00" in prompt:
        raise ValueError("prompt: must not contain NUL characters")
    request: dict[str, Any] = {"prompt": prompt}
    for name in ("model", "size"):
        if obj.get(name) is not None:
            if not isinstance(obj[name], str) or not obj[name]:
                raise ValueError(f"{name}: must be a non-empty string, got {obj[name]!r}")
            request[name] = obj[name]
    if "size" in request and not _SIZE.match(request["size"]):
        raise ValueError(f"size: {request['size']!r} is not WIDTHxHEIGHT, e.g. '832x480'")
    if obj.get("seconds") is not None:
        request["seconds"] = _whole("seconds", obj["seconds"], 1)
    if obj.get("seed") is not None:
        request["seed"] = _whole("seed", obj["seed"], 0)
    if obj.get("steps") is not None:
        request["steps"] = _whole("steps", obj["steps"], 1)
    priority = obj.get("priority", default_priority)
    if priority not in PRIORITIES:
        raise ValueError(f"priority: {priority!r}; allowed: {', '.join(PRIORITIES)}")
    request["priority"] = priority
    if obj.get("scheduler") is not None:
        if obj["scheduler"] not in SCHEDULERS:
            raise ValueError(f"scheduler: {obj['scheduler']!r}; allowed: {', '.join(SCHEDULERS)}")
        request["scheduler"] = obj["scheduler"]
    return request


def parse_jsonl(text: str, *, default_priority: str = "bulk") -> list[BatchLine]:
    """Every line of a JSONL document, checked; BatchError lists the bad lines (all of them counted)."""
    lines: list[BatchLine] = []
    errors: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            errors.append(f"line {number}: not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        try:
            lines.append(BatchLine(number, parse_line(obj, default_priority)))
        except ValueError as exc:
            errors.append(f"line {number}: {exc}")
    if errors:
        shown = "; ".join(errors[:MAX_ERRORS_SHOWN])
        more = f" (and {len(errors) - MAX_ERRORS_SHOWN} more)" if len(errors) > MAX_ERRORS_SHOWN else ""
        raise BatchError(f"{len(errors)} bad line(s), nothing submitted: {shown}{more}")
    if not lines:
        raise BatchError("the file has no prompts, nothing submitted")
    return lines


# Input ----------------------------------------------------------------------------
def split_s3_uri(uri: str) -> tuple[str, str]:
    """'s3://bucket/some/key.jsonl' → ('bucket', 'some/key.jsonl')."""
    rest = uri[len("s3://"):] if uri.startswith("s3://") else None
    bucket, _, key = (rest or "").partition("/")
    if not bucket or not key:
        raise BatchError(f"--input: {uri!r} is not s3://BUCKET/KEY")
    return bucket, key


def s3_client(endpoint_url: str | None, region: str):
    """A boto3 S3 client set up as the farm sets up its own (path style, checksums when required)."""
    import boto3
    from botocore.config import Config

    config = Config(
        region_name=region,
        s3={"addressing_style": "path"},
        retries={"mode": "standard", "max_attempts": 4},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


def read_input(uri: str, *, max_bytes: int, client_factory: Callable[[], Any] | None = None) -> bytes:
    """The bytes of a local file or an S3 object, refusing anything over ``max_bytes``."""
    if uri.startswith("s3://"):
        bucket, key = split_s3_uri(uri)
        client = client_factory() if client_factory else s3_client(None, "us-east-1")
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            head = client.head_object(Bucket=bucket, Key=key)
            if head["ContentLength"] > max_bytes:
                raise BatchError(f"--input: {uri} is {head['ContentLength']} bytes; allowed: at most {max_bytes}")
            return client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "?")
            raise BatchError(f"--input: cannot read {uri} ({code})") from None
        except BotoCoreError as exc:
            raise BatchError(f"--input: cannot read {uri} ({exc})") from None
    path = Path(uri)
    if not path.is_file():
        raise BatchError(f"--input: {uri} is not a file (give a path or s3://BUCKET/KEY)")
    if path.stat().st_size > max_bytes:
        raise BatchError(f"--input: {uri} is {path.stat().st_size} bytes; allowed: at most {max_bytes}")
    return path.read_bytes()


def decode(data: bytes, uri: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BatchError(f"--input: {uri} is not UTF-8 (byte {exc.start})") from None


# Identity -------------------------------------------------------------------------
def batch_id(template: str, data: bytes, now: dt.datetime) -> str:
    """The batch id: ``{content}`` is the file's SHA-256 (16 hex), ``{date}`` today's UTC date."""
    try:
        return template.format(content=hashlib.sha256(data).hexdigest()[:16], date=now.strftime("%Y-%m-%d"))
    except (KeyError, IndexError, ValueError) as exc:
        raise BatchError(f"--batch-id: {template!r} may use only {{content}} and {{date}} ({exc})") from None


def idempotency_key(batch: str, line: BatchLine) -> str:
    """Same batch id and same line → same key (a replay); an edited line → a new key."""
    digest = hashlib.sha256(f"{batch}\n{line.number}\n{line.fingerprint()}".encode()).hexdigest()
    return f"vf-batch-{digest[:40]}"


# Submitting -----------------------------------------------------------------------
def _retry_after(exc: Exception, fallback: float) -> float:
    response = getattr(exc, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return max(0.0, float(value)) if value is not None else fallback
    except ValueError:
        return fallback


def _message(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    try:
        return response.json()["error"]["message"]
    except Exception:  # noqa: BLE001 - any unparseable body: fall back to the status
        return f"HTTP {getattr(exc, 'status_code', '?')}"


def submit_all(
    client: Any,
    lines: Iterable[BatchLine],
    batch: str,
    *,
    deadline: float,
    patience_s: float = 600.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    echo: Callable[[str], None] = print,
) -> list[Outcome]:
    """Create one video per line, in order.

    429 (queue or rate limit full) is waited out as ``Retry-After`` says, until ``deadline``;
    a farm that is unreachable or answers 5xx for ``patience_s`` in a row stops the run
    (the lines not sent are counted; a rerun replays what was created). Any other refusal
    (4xx) is that line's outcome, and the next line goes on.
    """
    import openai

    outcomes: list[Outcome] = []
    for line in lines:
        body = {k: line.request[k] for k in ("seed", "steps", "priority", "scheduler") if k in line.request}
        request: dict[str, Any] = {"prompt": line.request["prompt"], "extra_body": body,
                                   "extra_headers": {"Idempotency-Key": idempotency_key(batch, line)}}
        for name in ("model", "size"):
            if name in line.request:
                request[name] = line.request[name]
        if "seconds" in line.request:
            request["seconds"] = str(line.request["seconds"])
        outcome, backoff, down_since = Outcome(line.number), 1.0, None
        while True:
            try:
                video = client.videos.create(**request)
            except openai.RateLimitError as exc:  # the farm's queue, this account's, or the key's rate
                down_since, wait = None, _retry_after(exc, backoff)
                if clock() + wait > deadline:
                    outcome.error = "gave up waiting for room in the queue (--deadline-s)"
                    break
            except (openai.APIConnectionError, openai.InternalServerError) as exc:
                down_since = clock() if down_since is None else down_since
                wait = backoff
                if clock() + wait - down_since > patience_s or clock() + wait > deadline:
                    outcome.error = f"farm unreachable: {exc}"
                    break
            except openai.APIStatusError as exc:  # refused: not valid for the model, a conflict, auth
                outcome.error = _message(exc)
                break
            else:
                outcome.video_id, outcome.status = video.id, video.status
                break
            sleep(wait)
            backoff = min(backoff * 2, 60.0)
        if outcome.error and outcome.error.startswith("farm unreachable"):
            echo(f"line {line.number}: not sent, {outcome.error}; stopping (a rerun replays what was created)")
            break
        echo(f"line {line.number}: {outcome.video_id} {outcome.status}" if outcome.video_id
             else f"line {line.number}: refused: {outcome.error}")
        outcomes.append(outcome)
    return outcomes


def wait_all(client: Any, outcomes: list[Outcome], *, deadline: float, poll_s: float,
             clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
             echo: Callable[[str], None] = print) -> None:
    """Poll every accepted video until it is completed, failed or cancelled (or the deadline)."""
    pending = [o for o in outcomes if o.video_id and o.status not in TERMINAL]
    while pending and clock() < deadline:
        sleep(poll_s)
        still = []
        for outcome in pending:
            video = client.videos.retrieve(outcome.video_id)
            outcome.status = video.status
            if video.status in TERMINAL:
                if video.status != "completed" and video.error:
                    outcome.error = video.error.message
                echo(f"line {outcome.line}: {outcome.video_id} {video.status}")
            else:
                still.append(outcome)
        pending = still


def summary(outcomes: list[Outcome], total: int, waited: bool) -> tuple[str, int]:
    accepted = sum(1 for o in outcomes if o.video_id)
    refused = sum(1 for o in outcomes if not o.video_id)
    text = f"batch: {total} line(s), submitted {accepted}, refused {refused}, not sent {total - len(outcomes)}"
    bad = refused > 0 or len(outcomes) < total
    if waited:
        counts = {s: sum(1 for o in outcomes if o.status == s) for s in (*TERMINAL, "unfinished")}
        counts["unfinished"] = sum(1 for o in outcomes if o.video_id and o.status not in TERMINAL)
        text += ", " + ", ".join(f"{k} {v}" for k, v in counts.items())
        bad = bad or counts["completed"] != accepted
    return text, 1 if bad else 0


# Command line ---------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="submit_jsonl.py", description="Submit every prompt of a JSONL file to a farm's /v1/videos API.")
    parser.add_argument("--input", required=True, help="a local path or s3://BUCKET/KEY of the JSONL file")
    parser.add_argument("--base-url", required=True, help="the farm's OpenAI base URL, e.g. http://HOST:8000/v1")
    parser.add_argument("--api-key", help="tenant API key (default: $VIDEOFARM_API_KEY)")
    parser.add_argument("--s3-endpoint-url", help="S3 endpoint for s3:// input (default: AWS, or boto3's own settings)")
    parser.add_argument("--s3-region", default="us-east-1", help="S3 region used to sign requests")
    parser.add_argument("--batch-id", default="{content}",
                        help="names this batch for idempotency: {content} (the file's hash, the default) "
                             "and {date} (UTC) are filled in; the same id replays instead of resubmitting")
    parser.add_argument("--priority", choices=PRIORITIES, default="bulk", help="for lines that name none")
    parser.add_argument("--wait", action="store_true", help="poll until every submitted video has finished")
    parser.add_argument("--poll-s", type=float, default=10.0, help="with --wait: seconds between polls")
    parser.add_argument("--deadline-s", type=float, default=24 * 3600.0,
                        help="stop waiting (for queue room, or with --wait for completion) after this long")
    parser.add_argument("--patience-s", type=float, default=600.0,
                        help="stop the run when the farm is unreachable (or answers 5xx) this long in a row")
    parser.add_argument("--max-bytes", type=int, default=64 * 1024 * 1024, help="largest input accepted")
    parser.add_argument("--dry-run", action="store_true", help="check the file and print what would be sent")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    api_key = args.api_key or os.environ.get("VIDEOFARM_API_KEY")
    try:
        if not api_key and not args.dry_run:
            raise BatchError("no API key: pass --api-key or set VIDEOFARM_API_KEY")
        data = read_input(args.input, max_bytes=args.max_bytes,
                          client_factory=lambda: s3_client(args.s3_endpoint_url, args.s3_region))
        lines = parse_jsonl(decode(data, args.input), default_priority=args.priority)
        batch = batch_id(args.batch_id, data, dt.datetime.now(dt.timezone.utc))
    except BatchError as exc:
        print(f"submit_jsonl: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        for line in lines:
            print(f"line {line.number}: {json.dumps(line.request, ensure_ascii=False)}")
        print(f"batch {batch}: {len(lines)} line(s), nothing sent (--dry-run)")
        return 0
    import openai

    client = openai.OpenAI(base_url=args.base_url, api_key=api_key, max_retries=2)
    print(f"batch {batch}: {len(lines)} line(s) from {args.input} to {args.base_url}")
    deadline = time.monotonic() + args.deadline_s
    outcomes = submit_all(client, lines, batch, deadline=deadline, patience_s=args.patience_s)
    if args.wait:
        wait_all(client, outcomes, deadline=deadline, poll_s=args.poll_s)
    text, status = summary(outcomes, len(lines), args.wait)
    print(text)
    return status


if __name__ == "__main__":
    sys.exit(main())
