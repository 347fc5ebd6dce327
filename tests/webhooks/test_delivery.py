"""Delivery end to end: job store events → fan-out → signed POSTs to a real receiver, with retries."""

from __future__ import annotations

import asyncio
import datetime as dt
import json

import openai
import pytest

from farm.webhooks.deliverer import WebhookDeliverer, backoff_s
from farm.webhooks.settings import WebhookSettings
from tests.webhooks.conftest import ACCOUNT_A, ACCOUNT_B, finish_job

SDK = openai.OpenAI(api_key="x", base_url="http://127.0.0.1:9/v1")


def settings(**overrides) -> WebhookSettings:
    # Seconds, not minutes: the test clock moves past each retry's time instead of sleeping.
    values = dict(allow_hosts=["127.0.0.0/8"], backoff_base_s=2.0, backoff_cap_s=20.0, max_attempts=8,
                  timeout_s=5.0, settle_s=0.0, poll_s=0.05)
    return WebhookSettings(**{**values, **overrides})


def deliverer(hooks, jobs, clock, **overrides) -> WebhookDeliverer:
    return WebhookDeliverer(hooks, jobs, settings(**overrides), clock=clock, rand=lambda: 0.5)


def run_once(d: WebhookDeliverer) -> int:
    async def once() -> int:
        try:
            return await d.run_once()
        finally:
            await d.aclose()

    return asyncio.run(once())


def test_backoff_grows_with_jitter_and_stops_at_the_cap() -> None:
    lows = [backoff_s(n, base_s=2, cap_s=20, rand=lambda: 0.0) for n in range(1, 8)]
    highs = [backoff_s(n, base_s=2, cap_s=20, rand=lambda: 0.999999) for n in range(1, 8)]
    assert lows == [1, 2, 4, 8, 10, 10, 10]
    assert all(low < high <= 2 * low for low, high in zip(lows, highs))
    # Any jitter: attempt n+1 waits at least as long as attempt n could have (until the cap).
    assert all(highs[i] <= lows[i + 1] + 1e-3 for i in range(3))
    assert backoff_s(10_000, base_s=2, cap_s=20) <= 20


def test_failing_receiver_gets_the_same_event_until_it_accepts(hooks, jobs, clock, receiver) -> None:
    receiver.script = [500, 502]  # then 200
    endpoint = hooks.create(ACCOUNT_A, url=receiver.url(), event_types=["video.completed"], name="mine")
    job = finish_job(jobs, ACCOUNT_A)
    d = deliverer(hooks, jobs, clock)

    clock.freeze()
    # With jitter fixed at 0.5: 0.75 x base x 2^(attempt-1), i.e. 1.5 s then 3 s: growing.
    for attempt, delay in ((1, 1.5), (2, 3.0)):
        assert run_once(d) == 1
        (row,) = hooks.deliveries(endpoint_id=endpoint.id)
        assert (row.status, row.attempts, row.last_status_code) == ("pending", attempt, 500 if attempt == 1 else 502)
        assert row.next_attempt_at == clock() + dt.timedelta(seconds=delay)
        clock.advance(delay - 0.01)
        assert run_once(d) == 0  # not due yet: nothing is sent early
        assert len(receiver.requests) == attempt
        clock.advance(0.01)

    assert run_once(d) == 1
    (row,) = hooks.deliveries(endpoint_id=endpoint.id)
    assert (row.status, row.attempts, row.last_status_code) == ("delivered", 3, 200)
    assert row.delivered_at is not None
    assert run_once(d) == 0 and len(receiver.requests) == 3

    ids = {r.headers["webhook-id"] for r in receiver.requests}
    assert ids == {row.event_id} and row.event_id.startswith("evt_")
    stamps = [int(r.headers["webhook-timestamp"]) for r in receiver.requests]
    assert stamps == sorted(stamps)  # each attempt signs anew
    for got in receiver.requests:
        assert got.headers["content-type"] == "application/json"
        event = SDK.webhooks.unwrap(got.body, got.headers, secret=endpoint.secret)
        assert (event.type, event.data.id, event.object) == ("video.completed", job.id, "event")
    assert len({r.body for r in receiver.requests}) == 1  # the same bytes every time


def test_gives_up_after_max_attempts(hooks, jobs, clock, receiver) -> None:
    receiver.default = 503
    endpoint = hooks.create(ACCOUNT_A, url=receiver.url(), event_types=["video.failed"], name="mine")
    finish_job(jobs, ACCOUNT_A, "failed")
    d = deliverer(hooks, jobs, clock, max_attempts=3)
    for _ in range(3):
        assert run_once(d) == 1
        clock.advance(60)
    (row,) = hooks.deliveries(endpoint_id=endpoint.id)
    assert (row.status, row.attempts, row.last_status_code, row.last_error) == ("failed", 3, 503, "HTTP 503")
    assert run_once(d) == 0 and len(receiver.requests) == 3
    assert json.loads(receiver.requests[0].body)["type"] == "video.failed"


def test_unreachable_and_refused_destinations_are_retried_with_the_reason(hooks, jobs, clock, receiver) -> None:
    port = receiver.port
    receiver.close()  # nothing listens there any more
    closed = hooks.create(ACCOUNT_A, url=f"http://127.0.0.1:{port}/", event_types=["video.completed"], name="c")
    # Registered while allowed; the operator has since narrowed the allowlist.
    moved = hooks.create(ACCOUNT_A, url="http://127.0.0.3:9/", event_types=["video.completed"], name="m")
    finish_job(jobs, ACCOUNT_A)
    d = deliverer(hooks, jobs, clock, allow_hosts=["127.0.0.1/32"])
    assert run_once(d) == 2
    (a,) = hooks.deliveries(endpoint_id=closed.id)
    (b,) = hooks.deliveries(endpoint_id=moved.id)
    assert a.status == "pending" and a.attempts == 1 and a.last_status_code is None and "Connect" in a.last_error
    assert b.status == "pending" and b.last_error.startswith("destination refused: address 127.0.0.3")


def test_fan_out_is_idempotent_and_respects_owner_type_and_status(hooks, jobs, clock, receiver) -> None:
    a_all = hooks.create(ACCOUNT_A, url=receiver.url(), name="all",
                         event_types=["video.completed", "video.failed", "video.cancelled"])
    a_done = hooks.create(ACCOUNT_A, url=receiver.url(), event_types=["video.completed"], name="done")
    a_off = hooks.create(ACCOUNT_A, url=receiver.url(), event_types=["video.completed"], name="off")
    hooks.update(ACCOUNT_A, a_off.id, status="disabled")
    b_all = hooks.create(ACCOUNT_B, url=receiver.url(), event_types=["video.completed", "video.failed"], name="b")
    a1, a2, a3 = (finish_job(jobs, ACCOUNT_A, o) for o in ("completed", "failed", "cancelled"))
    b1 = finish_job(jobs, ACCOUNT_B)

    # Unsettled (settle_s large): created, but the cursor stays, so the next pass re-reads them.
    assert hooks.fan_out(jobs, settle_s=3600) == 6  # the disabled endpoint's one waits for it
    assert hooks.cursor() == 0
    assert hooks.fan_out(jobs, settle_s=3600) == 0
    assert hooks.fan_out(jobs, settle_s=0) == 0
    assert hooks.cursor() == 4
    assert hooks.fan_out(jobs, settle_s=0) == 0

    def videos(endpoint) -> list[str]:
        return sorted(json.loads(r.payload)["data"]["id"] for r in hooks.deliveries(endpoint_id=endpoint.id))

    assert videos(a_all) == sorted([a1.id, a2.id, a3.id])
    assert videos(a_done) == [a1.id]
    assert videos(a_off) == [a1.id]  # kept, pending: it goes out if the endpoint is enabled again
    assert [d.status for d in hooks.deliveries(endpoint_id=a_off.id)] == ["pending"]
    assert videos(b_all) == [b1.id]


def test_one_pass_sends_many_at_once_and_the_loop_delivers_on_its_own(hooks, jobs, clock, receiver) -> None:
    hooks.create(ACCOUNT_A, url=receiver.url(), event_types=["video.completed"], name="mine")
    for _ in range(5):
        finish_job(jobs, ACCOUNT_A)
    d = deliverer(hooks, jobs, clock, concurrency=8)
    assert run_once(d) == 5 and len(receiver.requests) == 5

    async def loop() -> None:
        task = asyncio.create_task(d.run())
        await asyncio.sleep(0.2)
        job = await asyncio.to_thread(finish_job, jobs, ACCOUNT_A)
        d.wake()
        for _ in range(100):
            if any(json.loads(r.body)["data"]["id"] == job.id for r in receiver.requests):
                break
            await asyncio.sleep(0.05)
        d.stop()
        await asyncio.wait_for(task, 5)

    asyncio.run(loop())
    assert len(receiver.requests) == 6
    assert all(r.status == "delivered" for r in hooks.deliveries())


def test_a_lost_deliverer_claim_comes_due_again(hooks, jobs, clock, receiver) -> None:
    hooks.create(ACCOUNT_A, url=receiver.url(), event_types=["video.completed"], name="mine")
    finish_job(jobs, ACCOUNT_A)
    hooks.fan_out(jobs, settle_s=0)
    (claimed,) = hooks.due(10, lease_s=30)  # a deliverer claims it and dies
    assert hooks.due(10, lease_s=30) == []
    clock.advance(31)
    assert [d.id for d in hooks.due(10, lease_s=30)] == [claimed.id]
    assert hooks.deliveries()[0].attempts == 0


def test_disabled_endpoints_hold_their_deliveries(hooks, jobs, clock, receiver) -> None:
    endpoint = hooks.create(ACCOUNT_A, url=receiver.url(), event_types=["video.completed"], name="mine")
    finish_job(jobs, ACCOUNT_A)
    hooks.fan_out(jobs, settle_s=0)
    hooks.update(ACCOUNT_A, endpoint.id, status="disabled")
    d = deliverer(hooks, jobs, clock)
    assert run_once(d) == 0 and receiver.requests == []
    hooks.update(ACCOUNT_A, endpoint.id, status="enabled")
    assert run_once(d) == 1 and len(receiver.requests) == 1


def test_rotated_secret_signs_pending_retries(hooks, jobs, clock, receiver) -> None:
    receiver.script = [500]
    endpoint = hooks.create(ACCOUNT_A, url=receiver.url(), event_types=["video.completed"], name="mine")
    finish_job(jobs, ACCOUNT_A)
    d = deliverer(hooks, jobs, clock)
    run_once(d)
    rotated = hooks.rotate_secret(ACCOUNT_A, endpoint.id)
    assert rotated.secret != endpoint.secret
    clock.advance(60)
    run_once(d)
    first, second = receiver.requests
    SDK.webhooks.unwrap(first.body, first.headers, secret=endpoint.secret)
    SDK.webhooks.unwrap(second.body, second.headers, secret=rotated.secret)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        SDK.webhooks.unwrap(second.body, second.headers, secret=endpoint.secret)
    assert hooks.deliveries()[0].status == "delivered"


def test_backlog_counts_due_deliveries_not_claimed_waiting_or_disabled(hooks, jobs, clock, receiver) -> None:
    """What the Notifier's webhook-backlog gauge reports."""
    mine = hooks.create(ACCOUNT_A, url=receiver.url(), event_types=["video.completed"], name="mine")
    hooks.create(ACCOUNT_B, url=receiver.url(), event_types=["video.completed"], name="theirs")
    finish_job(jobs, ACCOUNT_A)
    finish_job(jobs, ACCOUNT_B)
    clock.freeze()
    assert hooks.backlog() == 0  # events not fanned out yet are not deliveries
    hooks.fan_out(jobs, settle_s=0)
    assert hooks.backlog() == 2
    hooks.update(ACCOUNT_A, mine.id, status="disabled")
    assert hooks.backlog() == 1  # a disabled endpoint's deliveries wait, not counted
    (claimed,) = hooks.due(10, lease_s=30)
    assert hooks.backlog() == 0  # being sent
    hooks.mark_retry(claimed.id, next_at=clock() + dt.timedelta(seconds=60), error="HTTP 500", status_code=500)
    assert hooks.backlog() == 0  # waiting for its retry time
    clock.advance(61)
    assert hooks.backlog() == 1
