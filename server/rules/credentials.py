"""API keys and secrets: generated once, stored as SHA-256, compared in constant time.

Secrets are 256-bit random tokens, so a fast hash is the right tool (as for
GitHub or Stripe tokens); a slow password hash would only add latency.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

API_KEY_PREFIX = "dk_"
API_SECRET_PREFIX = "ds_"


def new_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_hex(16)


def new_api_secret() -> str:
    return API_SECRET_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def secret_matches(secret: str, secret_sha256: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), secret_sha256)
