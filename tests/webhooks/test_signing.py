"""Signatures: what the farm signs, the openai SDK's client.webhooks.unwrap verifies and parses."""

from __future__ import annotations

import base64
import datetime as dt
import time

import openai
import pytest

from farm.jobs.store import Event
from farm.webhooks.signing import SignatureError, generate_secret, secret_hint, sign_headers, verify
from farm.webhooks.store import event_payload


@pytest.fixture
def client() -> openai.OpenAI:
    return openai.OpenAI(api_key="x", base_url="http://127.0.0.1:9/v1")


def _payload(kind: str = "video.completed") -> str:
    event = Event(seq=1, id="evt_0123", type=kind, video_id="video_abc", owner="acct_a",
                  created_at=dt.datetime.now(dt.UTC))
    return event_payload(event)


def test_secret_is_whsec_and_32_random_bytes() -> None:
    secrets = {generate_secret() for _ in range(20)}
    assert len(secrets) == 20
    for secret in secrets:
        assert secret.startswith("whsec_")
        assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) == 32
        assert secret_hint(secret).endswith(secret[-4:]) and secret not in secret_hint(secret)


@pytest.mark.parametrize("kind", ["video.completed", "video.failed", "video.cancelled"])
def test_openai_sdk_unwraps_what_the_farm_signs(client: openai.OpenAI, kind: str) -> None:
    secret = generate_secret()
    payload = _payload(kind)
    headers = sign_headers(secret, "evt_0123", payload)
    event = client.webhooks.unwrap(payload, headers, secret=secret)
    # This SDK has no video.* event class; unwrap still verifies and parses the OpenAI event shape.
    assert (event.id, event.type, event.data.id, event.object) == ("evt_0123", kind, "video_abc", "event")
    assert isinstance(event.created_at, int)
    verify(secret, headers, payload)


def test_tampered_body_wrong_secret_and_old_timestamp_are_rejected(client: openai.OpenAI) -> None:
    secret = generate_secret()
    payload = _payload()
    headers = sign_headers(secret, "evt_0123", payload)
    tampered = payload.replace("video_abc", "video_xyz")
    with pytest.raises(openai.InvalidWebhookSignatureError):
        client.webhooks.unwrap(tampered, headers, secret=secret)
    with pytest.raises(SignatureError):
        verify(secret, headers, tampered)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        client.webhooks.unwrap(payload, headers, secret=generate_secret())
    with pytest.raises(openai.InvalidWebhookSignatureError):
        client.webhooks.unwrap(payload, {**headers, "webhook-id": "evt_other"}, secret=secret)

    old = sign_headers(secret, "evt_0123", payload, timestamp=int(time.time()) - 600)
    with pytest.raises(openai.InvalidWebhookSignatureError, match="too old"):
        client.webhooks.unwrap(payload, old, secret=secret)
    with pytest.raises(SignatureError, match="away from now"):
        verify(secret, old, payload)


def test_signature_matches_the_standard_webhooks_example() -> None:
    # The example from the Standard Webhooks specification (its secret, id, timestamp and body).
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = '{"test": 2432232314}'
    headers = sign_headers(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", body, timestamp=1614265330)
    assert headers["webhook-signature"] == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
