"""schemathesis against the gateway's own OpenAPI spec, in-process over ASGI: no 5xx, ever.

schemathesis' engine — what `schemathesis run` drives — over every operation of ``/openapi.json``
as a tenant, and over the operator's routes with the admin key: the examples, coverage (boundary
and negative values, unexpected methods), fuzzing and stateful phases, with every default check
(``ignored_auth`` among them) plus one of ours, the OpenAI error shape. The stateful phase follows
the spec's OpenAPI links from a create to retrieve / cancel / content / delete / remix. The
gateway runs with API keys required, on the real SQLite job store and the real SeaweedFS, and a
stand-in for the dispatcher (``InstantFarm``) finishes or fails jobs as they are created, so
content downloads, deletes of finished clips and the queue cap's 429 are all reached.

Why the engine and not ``@schema.parametrize()``: the app needs pytest fixtures, and
``schemathesis.pytest.from_fixture`` (4.32) sets ``Function._nodeid``, which pytest 9 no longer has.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
import schemathesis
from schemathesis.engine import events, from_schema

from farm.jobs.store import JobStore
from farm.render.tiers import ModelAlias
from farm.storage import ClipLayout, ObjectStore

WORKER = "fuzz-finisher"
SEED = 20240607
MAX_EXAMPLES = 10  # per operation and phase: ~50 operations × the phases
MAX_QUEUED = 12  # low, so the stateful phase's creates also meet the queue cap (429)
MEDIA = {"video": b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8,
         "thumbnail": b"RIFF\x10\x00\x00\x00WEBPVP8 " + bytes(64),
         "spritesheet": b"\xff\xd8\xff\xe0" + bytes(128)}
ERROR_KEYS = {"message", "type", "param", "code"}


@schemathesis.check
def openai_error_shape(ctx: Any, response: schemathesis.Response, case: schemathesis.Case) -> bool | None:
    """Every 4xx/5xx, documented or not (405, 416, ...), has the OpenAI error envelope and nothing else."""
    if response.status_code < 400 or case.method.upper() == "HEAD":
        return None
    body = response.json()
    if not (isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], dict)
            and set(body["error"]) == ERROR_KEYS and isinstance(body["error"]["message"], str)
            and body["error"]["message"]):
        raise AssertionError(f"{response.status_code} without the OpenAI error shape: {response.text[:300]}")
    return True


@dataclass
class InstantFarm:
    """Stands in for the dispatcher through the gateway's ``on_created`` hook, doing what the finisher
    does (claim, upload to S3, complete) at once: of every three creates, one job completes, one
    fails and one stays queued, so the queue fills up to ``MAX_QUEUED`` over the run."""

    jobs: JobStore
    objects: ObjectStore
    created: itertools.count = field(default_factory=itertools.count)

    def __call__(self, video_id: str) -> None:
        turn = next(self.created) % 3
        if turn == 2:
            return
        job = self.jobs.claim_next(WORKER, lease_s=60)  # the oldest queued one, not necessarily video_id
        if job is None:
            return
        if turn == 1:
            self.jobs.fail(job.id, WORKER, "render_failed", "fuzz: a failed render")
            return
        layout = ClipLayout(job.id)
        for variant, data in MEDIA.items():
            self.objects.put_bytes(layout.key(variant), data)
        if not self.jobs.complete(job.id, WORKER, {v: layout.key(v) for v in MEDIA}):
            raise RuntimeError(f"complete({job.id}) was refused")


@dataclass
class Tally:
    statuses: Counter = field(default_factory=Counter)  # (phase, operation, status) -> requests
    failures: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def record(self, event: events.ScenarioFinished) -> None:
        rec = event.recorder
        for case_id, interaction in rec.interactions.items():
            status = interaction.response.status_code if interaction.response else "no response"
            # The case's own operation: stateful scenarios chain several under one label.
            self.statuses[(event.phase.value, rec.cases[case_id].value.operation.label, status)] += 1
        for case_id, checks in rec.checks.items():
            for check in checks:
                if check.failure_info is not None:
                    failure = check.failure_info.failure
                    case = rec.cases[case_id].value
                    self.failures.append(f"{rec.label} [{check.name}] {failure.title}: {failure.message[:400]}\n"
                                         f"    reproduce: {case.as_curl_command()}")

    def server_errors(self) -> int:
        return sum(n for (_, _, status), n in self.statuses.items() if not isinstance(status, int) or status >= 500)

    def summary(self) -> str:
        by_op: dict[str, Counter] = {}
        for (_, label, status), n in self.statuses.items():
            by_op.setdefault(label, Counter())[status] += n
        lines = [f"  {label}: " + ", ".join(f"{s}×{n}" for s, n in sorted(c.items(), key=str))
                 for label, c in sorted(by_op.items())]
        total = sum(self.statuses.values())
        return f"{total} requests, {self.server_errors()} 5xx\n" + "\n".join(lines)


@pytest.fixture
def fuzz_app(make_auth_app, jobs, objects):
    """The gateway as the farm runs it: API keys required, a queue cap, S3 for content and deletes, and a
    tier alias (OpenAI's sizes map onto wan-tiny's portrait one; a landscape one has none to map to)."""
    # A queued video's event stream lasts until its bound (serve.event_stream_max_s): half a second here.
    return make_auth_app(objects=objects, max_queued=MAX_QUEUED, on_created=InstantFarm(jobs, objects),
                         aliases=[ModelAlias(id="sora-2", model="wan-tiny")], event_stream_max_s=0.5,
                         events_tick_s=0.1)


def fuzz(app: Any, headers: dict[str, str], *, max_examples: int = MAX_EXAMPLES, path_regex: str | None = None,
         ) -> Tally:
    """One schemathesis run (every phase) over the app's operations, or those whose path matches."""
    config = schemathesis.Config.from_dict({
        "seed": SEED,
        "generation": {"max-examples": max_examples, "deterministic": True},
        "headers": headers,
        "phases": {"stateful": {"max-steps": 40}},
        "checks": {
            # Off for a reason the spec cannot state: size, seconds and steps enums are the union over
            # every served model, so {"model": "wan-tiny-2x", "size": "96x160"} is schema-valid yet a
            # correct 400 (that model renders only 128x128). Negative data must still be rejected.
            "positive_data_acceptance": {"enabled": False},
        },
    })
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config, headers=headers)
    if path_regex:
        schema = schema.include(path_regex=path_regex)
    tally, phases = Tally(), []
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            tally.record(event)
        elif isinstance(event, events.PhaseFinished):
            phases.append(f"{event.phase.name.value}: {event.status.value}")
        elif isinstance(event, (events.NonFatalError, events.FatalError)):
            tally.errors.append(f"{event.__class__.__name__}: {getattr(event, 'label', '')} "
                                f"{getattr(event, 'value', None) or getattr(event, 'exception', None)!r}")
    print(f"\nschemathesis phases: {', '.join(phases)}\n{tally.summary()}")
    return tally


def assert_clean(tally: Tally) -> None:
    assert not tally.errors, "\n".join(tally.errors)
    assert not tally.failures, f"{len(tally.failures)} check failure(s):\n" + "\n".join(tally.failures[:20])
    assert tally.server_errors() == 0, tally.summary()


def test_schemathesis_as_a_tenant_finds_no_server_error(fuzz_app, auth_headers, jobs):
    tally = fuzz(fuzz_app, auth_headers)
    assert_clean(tally)
    # The run reached what it is meant to: links were followed, clips streamed, the queue cap answered.
    seen = {(label, status) for (_, label, status) in tally.statuses}
    assert any(phase == "stateful" for phase, _, _ in tally.statuses), "the stateful phase sent nothing"
    assert ("GET /v1/videos/{video_id}/content", 200) in seen, "no clip was ever downloaded"
    assert ("POST /v1/videos", 429) in seen, "the queue cap was never reached"
    assert jobs.counts_by_status().get("completed", 0) > 0


def test_schemathesis_as_the_operator_finds_no_server_error(fuzz_app):
    from tests.api.conftest import ADMIN_KEY

    # The admin routes and invite redemption, with the operator's key (the tenant run only gets 401s there).
    tally = fuzz(fuzz_app, {"Authorization": f"Bearer {ADMIN_KEY}"}, path_regex=r"^/v1/(admin|invites)/")
    assert_clean(tally)
    assert ("POST /v1/admin/invites", 200) in {(label, status) for (_, label, status) in tally.statuses}
