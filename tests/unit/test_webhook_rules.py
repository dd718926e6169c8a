"""Webhook rules: signatures as the Standard Webhooks reference library verifies them, which URLs
and addresses may receive deliveries, and the retry schedule."""

from __future__ import annotations

import json
import random
import re
import time
from datetime import UTC, datetime

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from server.records import ChangeRecord
from server.rules import webhooks as rules
from server.runtime.webhooks import disposition_event
from server.settings import Settings, SettingsError


def change_record() -> ChangeRecord:
    return ChangeRecord(
        seq=7, id=42, customer_id="customer123", tenant_id="tenant1",
        sub_tenant_id="subtenant1", previous_status=None, new_status="interested",
        changed_at=datetime(2026, 12, 2, 9, 30, tzinfo=UTC), source="disposition_update",
        partner_id="123", request_id="req-1",
    )  # fmt: skip


def test_a_new_secret_is_whsec_and_base64_of_32_random_bytes() -> None:
    secret = rules.new_secret()
    assert re.fullmatch(r"whsec_[A-Za-z0-9+/]{43}=", secret)
    assert len(rules.secret_key(secret)) == 32
    assert rules.new_secret() != secret


def test_signed_deliveries_verify_with_the_reference_library() -> None:
    secret = rules.new_secret()
    event_id, body = disposition_event(change_record())
    headers = rules.delivery_headers(secret, event_id, int(time.time()), body)
    assert headers["webhook-id"] == event_id
    assert headers["webhook-signature"].startswith("v1,")
    payload = Webhook(secret).verify(body, headers)
    assert payload == json.loads(body)
    assert payload["type"] == "disposition.changed"
    assert set(payload["data"]) == {
        "tenant_id", "sub_tenant_id", "customer_id", "previous_status", "disposition_status",
        "cursor", "changed_at", "source", "partner_id", "request_id",
    }  # fmt: skip


def test_a_tampered_body_or_another_secret_fails_verification() -> None:
    secret = rules.new_secret()
    event_id, body = disposition_event(change_record())
    headers = rules.delivery_headers(secret, event_id, int(time.time()), body)
    tampered = body.replace(b'"interested"', b'"do_not_call"')
    assert tampered != body
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(tampered, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(rules.new_secret()).verify(body, headers)
    stale = rules.delivery_headers(secret, event_id, int(time.time()) - 3600, body)
    with pytest.raises(WebhookVerificationError):  # the receiver refuses old timestamps
        Webhook(secret).verify(body, stale)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("https://hooks.example.com/disposition", None),
        ("https://hooks.example.com:8443/x?y=1", None),
        ("http://hooks.example.com/disposition", "must be an https URL"),
        ("ftp://hooks.example.com/", "must be an https URL"),
        ("https:///nohost", "must be an https URL"),
        ("https://user:pw@hooks.example.com/", "must not contain credentials"),
        ("https://localhost/hook", "must not point to a private or internal address"),
        ("https://api.localhost/hook", "must not point to a private or internal address"),
        ("https://metadata.google.internal/", "must not point to a private or internal address"),
        ("https://127.0.0.1/hook", "must not point to a private or internal address"),
        ("https://10.1.2.3/hook", "must not point to a private or internal address"),
        ("https://169.254.169.254/latest", "must not point to a private or internal address"),
        ("https://[::1]/hook", "must not point to a private or internal address"),
        ("https://hooks.example.com:99999/", "must be a valid URL"),
        ("https://" + "a" * 64 + ".example.com/", "must be a valid URL"),  # a label too long
        ("https://hooks..example.com/", "must be a valid URL"),  # an empty label
        ("", "must be a URL of at most 2048 characters"),
    ],
)
def test_url_rules(url: str, problem: str | None) -> None:
    assert rules.url_problem(url, allow_private=False) == problem


def test_allowing_private_urls_lifts_the_scheme_and_address_rules_only() -> None:
    assert rules.url_problem("http://127.0.0.1:8080/hook", allow_private=True) is None
    assert rules.url_problem("https://localhost/hook", allow_private=True) is None
    assert rules.url_problem("ftp://127.0.0.1/", allow_private=True) == "must be an https URL"
    assert (
        rules.url_problem("http://u:p@127.0.0.1/", allow_private=True)
        == "must not contain credentials"
    )


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        ("93.184.216.34", False),
        ("2606:2800:220:1:248:1893:25c8:1946", False),
        ("127.0.0.1", True),
        ("10.0.0.5", True),
        ("172.16.0.1", True),
        ("192.168.1.1", True),
        ("100.64.0.1", True),  # carrier-grade NAT
        ("169.254.169.254", True),  # cloud metadata (link-local)
        ("100.100.100.200", True),  # Alibaba's metadata
        ("::1", True),
        ("::ffff:127.0.0.1", True),  # IPv4-mapped loopback
        ("fe80::1%eth0", True),
        ("fd00:ec2::254", True),
        ("0.0.0.0", True),
        ("224.0.0.1", True),
        ("not an address", True),
    ],
)
def test_address_rules(address: str, refused: bool) -> None:
    assert rules.refused_address(address) is refused


def test_retries_back_off_exponentially_with_jitter_and_a_cap() -> None:
    rng = random.Random(7)
    delays = [rules.retry_delay(attempt, 5.0, rng) for attempt in range(1, 15)]
    for attempt, delay in enumerate(delays, start=1):
        nominal = min(5.0 * 2 ** (attempt - 1), rules.MAX_RETRY_DELAY_SECONDS)
        assert 0.75 * nominal <= delay <= 1.25 * nominal
    assert max(delays) <= 1.25 * rules.MAX_RETRY_DELAY_SECONDS
    # Enough attempts to cover the 3-day window.
    assert sum(min(5.0 * 2 ** (n - 1), rules.MAX_RETRY_DELAY_SECONDS) for n in range(1, 25)) > (
        rules.RETRY_WINDOW_SECONDS
    )


def test_production_refuses_private_webhook_urls() -> None:
    env = {"DISPOSITION_ENV": "production", "WEBHOOK_ALLOW_PRIVATE_URLS": "true"}
    with pytest.raises(SettingsError, match="WEBHOOK_ALLOW_PRIVATE_URLS=true is not allowed"):
        Settings.from_env(env)
    assert Settings.from_env({"WEBHOOK_ALLOW_PRIVATE_URLS": "true"}).webhook_allow_private_urls
    with pytest.raises(SettingsError, match="must be true or false"):
        Settings.from_env({"WEBHOOK_ALLOW_PRIVATE_URLS": "maybe"})


def test_who_delivers_and_the_worker_settings_are_checked() -> None:
    assert Settings.from_env({}).webhook_delivery == "server"
    assert Settings.from_env({"WEBHOOK_DELIVERY": "Worker"}).webhook_delivery == "worker"
    with pytest.raises(SettingsError, match="WEBHOOK_DELIVERY must be server or worker"):
        Settings.from_env({"WEBHOOK_DELIVERY": "both"})
    with pytest.raises(SettingsError, match="WEBHOOK_WORKER_NICE must be between 0 and 19"):
        Settings.from_env({"WEBHOOK_WORKER_NICE": "20"})
    with pytest.raises(SettingsError, match="WEBHOOK_LEASE_SECONDS must be at least 1"):
        Settings.from_env({"WEBHOOK_LEASE_SECONDS": "0.5"})
