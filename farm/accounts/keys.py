"""Secrets handed to people: API keys, invite codes, the admin key.

Each is 256 random bits (url-safe base64) behind a typed prefix, so a leaked string says
what it is (and secret scanners can match it): ``vf_sk_`` tenant keys, ``vf_inv_`` invite
codes, ``vf_admin_`` the operator key. Only a SHA-256 of a key or code is ever stored.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

API_KEY_PREFIX = "vf_sk_"
INVITE_PREFIX = "vf_inv_"
ADMIN_KEY_PREFIX = "vf_admin_"
_RANDOM_BYTES = 32  # 256 bits; the issue asks for at least 128


def new_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(_RANDOM_BYTES)


def digest(secret: str) -> str:
    """SHA-256 hex: enough for random, high-entropy secrets (there is nothing to guess)."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def hint(secret: str) -> str:
    """A recognisable, useless fragment for listings: ``vf_sk_…WXYZ``."""
    prefix = next((p for p in (API_KEY_PREFIX, INVITE_PREFIX, ADMIN_KEY_PREFIX) if secret.startswith(p)), "")
    return f"{prefix}…{secret[-4:]}"


def same(a: str, b: str) -> bool:
    """Constant-time comparison (for the admin key, compared directly)."""
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass"))
