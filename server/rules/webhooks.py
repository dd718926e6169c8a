"""Webhook rules: event types, Standard Webhooks signatures, which URLs may receive deliveries, and
when a failed delivery is tried again.

Signatures follow the Standard Webhooks specification (standardwebhooks.com): a secret is
`whsec_` + base64 of random bytes; a delivery carries `webhook-id` (the event's id, the same on
every retry: the receiver's idempotency key), `webhook-timestamp` (Unix seconds) and
`webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}" keyed with the secret's
bytes>`.

URLs: https only, no credentials in them, and never an address inside the service's own network
(loopback, private, link-local, cloud metadata, ...). The address rule is checked against every
address the host resolves to, at creation and again at each delivery (DNS rebinding); the
resolving is done by the caller, which hands the addresses to `refused_address`.
`WEBHOOK_ALLOW_PRIVATE_URLS` lifts both rules (local development and tests).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import random
import secrets
from urllib.parse import SplitResult, urlsplit

DISPOSITION_CHANGED = "disposition.changed"
CALL_PROCESSED = "call.processed"
EVENT_TYPES = (DISPOSITION_CHANGED, CALL_PROCESSED)

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
MAX_URL = 2048
# A partner's own endpoints, over all its tenants (as Stripe's 16 per account): each receives
# every event of its tenant, so each one multiplies the deliveries. Operators are not limited.
MAX_ENDPOINTS_PER_PARTNER = 16

# Deliveries are retried for this long after the first attempt, then the event is marked failed
# (kept for replay); an endpoint failing for as long is disabled.
RETRY_WINDOW_SECONDS = 3 * 24 * 3600
# The longest wait between two attempts.
MAX_RETRY_DELAY_SECONDS = 6 * 3600

# Hosts that name the machine itself or a cloud's metadata service whatever they resolve to.
_REFUSED_HOSTS = {"localhost", "metadata", "metadata.google.internal", "metadata.goog"}
# Cloud metadata addresses outside the private and link-local ranges.
_METADATA_ADDRESSES = {
    ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
    ipaddress.ip_address("192.0.0.192"),  # Oracle Cloud
    ipaddress.ip_address("fd00:ec2::254"),  # AWS over IPv6 (also private)
}


def new_secret() -> str:
    """A new signing secret, shown once to its owner."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_…` secret."""
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def signature(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value for one delivery."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def delivery_headers(secret: str, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(secret, message_id, timestamp, body),
    }


def url_problem(url: str, *, allow_private: bool) -> str | None:
    """What is wrong with `url` as a delivery target, before resolving its host (None: nothing)."""
    if not url or len(url) > MAX_URL:
        return f"must be a URL of at most {MAX_URL} characters"
    try:
        parts: SplitResult = urlsplit(url)
        port = parts.port
    except ValueError:
        return "must be a valid URL"
    allowed = ("https", "http") if allow_private else ("https",)
    if parts.scheme not in allowed or not parts.hostname:
        return "must be an https URL"
    try:
        parts.hostname.encode("idna")  # what resolving it needs (no empty or overlong label)
    except UnicodeError:
        return "must be a valid URL"
    if parts.username is not None or parts.password is not None:
        return "must not contain credentials"
    if port == 0:
        return "must be a valid URL"
    if not allow_private:
        host = parts.hostname.rstrip(".").lower()
        if host in _REFUSED_HOSTS or host.endswith((".localhost", ".internal", ".local")):
            return "must not point to a private or internal address"
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            return None
        if refused_address(str(literal)):
            return "must not point to a private or internal address"
    return None


def refused_address(address: str) -> bool:
    """Whether a resolved address is inside the service's own network (or not an address)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return True
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (
        not ip.is_global
        or ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or ip in _METADATA_ADDRESSES
    )


def retry_delay(attempt: int, base_seconds: float, rng: random.Random | None = None) -> float:
    """Seconds to wait before attempt `attempt + 1`, after `attempt` failed ones (1, 2, ...):
    exponential from `base_seconds`, capped at MAX_RETRY_DELAY_SECONDS, with ±25% jitter so that
    a receiver coming back is not hit by every retry at once."""
    exponent = min(max(attempt - 1, 0), 32)
    delay = min(base_seconds * float(1 << exponent), MAX_RETRY_DELAY_SECONDS)
    jitter: float = (rng or random).uniform(0.75, 1.25)
    return delay * jitter
