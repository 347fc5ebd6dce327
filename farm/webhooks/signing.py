"""Standard Webhooks signatures (https://www.standardwebhooks.com), as OpenAI sends them.

Headers: ``webhook-id`` (stable across retries, for receivers to de-duplicate),
``webhook-timestamp`` (Unix seconds of this attempt; receivers refuse old ones) and
``webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`` keyed with the
bytes behind a ``whsec_<base64>`` secret. The ``openai`` SDK's ``client.webhooks.unwrap``
verifies exactly this.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32  # 256 bits, the size of an HMAC-SHA256 digest (Standard Webhooks: 24 to 64)
DEFAULT_TOLERANCE_S = 300


class SignatureError(ValueError):
    """The headers do not carry a valid, fresh signature for this body."""


def generate_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii")


def secret_key(secret: str) -> bytes:
    """The HMAC key behind a ``whsec_`` secret."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"secret: must start with {SECRET_PREFIX!r}")
    try:
        return base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
    except binascii.Error:
        raise ValueError("secret: the part after 'whsec_' is not valid base64") from None


def secret_hint(secret: str) -> str:
    """Enough of the secret to tell two apart, useless to sign with."""
    return f"{SECRET_PREFIX}…{secret[-4:]}"


def signature(secret: str, msg_id: str, timestamp: int, body: str | bytes) -> str:
    """The ``v1,<base64>`` signature of one message."""
    payload = body if isinstance(body, bytes) else body.encode("utf-8")
    signed = f"{msg_id}.{timestamp}.".encode() + payload
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def sign_headers(secret: str, msg_id: str, body: str | bytes, *, timestamp: int | None = None) -> dict[str, str]:
    """The three Standard Webhooks headers for one delivery attempt (timestamp: now)."""
    ts = int(time.time()) if timestamp is None else int(timestamp)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": signature(secret, msg_id, ts, body),
    }


def verify(
    secret: str, headers: Mapping[str, str], body: str | bytes, *, tolerance_s: int = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> None:
    """Raise SignatureError unless one of the header's signatures matches and the timestamp is fresh.

    For receivers written in Python without the ``openai`` SDK, and for this farm's tests.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    try:
        msg_id, ts_text, sigs = lower["webhook-id"], lower["webhook-timestamp"], lower["webhook-signature"]
    except KeyError as exc:
        raise SignatureError(f"missing header {exc.args[0]}") from None
    try:
        ts = int(ts_text)
    except ValueError:
        raise SignatureError(f"webhook-timestamp: {ts_text!r} is not an integer") from None
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance_s:
        raise SignatureError(f"webhook-timestamp: {ts} is more than {tolerance_s}s away from now")
    expected = signature(secret, msg_id, ts, body)
    # Several space-separated signatures may be sent (e.g. during a secret rotation).
    if not any(hmac.compare_digest(expected, candidate) for candidate in sigs.split()):
        raise SignatureError("webhook-signature: no signature matches")
