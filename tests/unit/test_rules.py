"""Unit tests for the pure rules: an update's declared limits, rate limiting, credentials,
settings, errors (tests/unit/test_declared_rules.py has the rest of the declared limits)."""

from __future__ import annotations

import base64

import pytest
from google.rpc import code_pb2, error_details_pb2

from disposition.v1.disposition_service_pb2 import UpdateDispositionStatusRequest
from server.errors import (
    MAX_DESCRIPTION_BYTES,
    MAX_FIELD_BYTES,
    MAX_VIOLATION_BYTES,
    CustomerNotFound,
    RateLimited,
    ValidationFailed,
)
from server.rules import declared
from server.rules.credentials import hash_secret, new_api_key, new_api_secret, secret_matches
from server.runtime.ratelimit import InProcessRateLimiter, Quota
from server.settings import Settings, SettingsError


def problems(customer_id: str, status: str | None) -> list[tuple[str, str]]:
    request = UpdateDispositionStatusRequest(customer_id=customer_id)
    if status is not None:
        request.disposition_status = status
    return declared.check(request)


@pytest.mark.parametrize(
    ("customer_id", "status", "expected"),
    [
        ("c1", None, []),
        ("c1", "", []),
        ("c1", "interested", []),
        ("c1", "Ünïcode ✓ status", []),
        ("", None, [("customer_id", "customer_id should not be empty")]),
        ("\t ", None, [("customer_id", "customer_id should not be empty")]),
        ("x" * 255, "y" * 255, []),
        (
            "x" * 256,
            None,
            [("customer_id", "customer_id must be shorter than or equal to 255 characters")],
        ),
        (
            "c1",
            "   ",
            [
                (
                    "disposition_status",
                    "disposition_status should not be blank; send an empty string to clear it",
                )
            ],
        ),
        (
            "c1",
            "a\x00b",
            [("disposition_status", "disposition_status must not contain control characters")],
        ),
    ],
)
def test_update_rules(
    customer_id: str, status: str | None, expected: list[tuple[str, str]]
) -> None:
    assert problems(customer_id, status) == expected


async def test_rate_limiter_fixed_window() -> None:
    now = [120.0]
    limiter = InProcessRateLimiter(clock=lambda: now[0])
    assert [await limiter.hit("p", 2) for _ in range(2)] == [None, None]
    now[0] = 143.2
    assert await limiter.hit("p", 2) == 37  # the window ends at 180: 36.8 s, rounded up
    assert await limiter.hit("q", 2) is None  # per partner
    now[0] = 180.0
    assert await limiter.hit("p", 2) is None  # a new window


async def test_rate_limiter_quota_is_what_is_left_of_the_window() -> None:
    now = [120.0]
    limiter = InProcessRateLimiter(clock=lambda: now[0])
    assert limiter.quota("p", 3) == Quota(limit=3, remaining=3, reset_seconds=60, window_seconds=60)
    await limiter.hit("p", 3)
    now[0] = 143.2
    assert limiter.quota("p", 3) == Quota(3, 2, 37, 60)  # 36.8 s left, rounded up
    for _ in range(3):
        await limiter.hit("p", 3)
    assert limiter.quota("p", 3) == Quota(3, 0, 37, 60)  # refused requests leave it at 0
    assert limiter.quota("q", 3).remaining == 3  # per partner
    assert limiter.quota("p", 10).remaining == 6  # a raised limit counts at once
    now[0] = 179.9
    assert limiter.quota("p", 3).reset_seconds == 1  # never 0 while the window lasts
    now[0] = 180.0
    assert limiter.quota("p", 3) == Quota(3, 3, 60, 60)  # a new window


def test_secrets_are_random_hashed_and_compared() -> None:
    key, secret = new_api_key(), new_api_secret()
    assert key.startswith("dk_") and secret.startswith("ds_") and len(secret) > 40
    assert new_api_secret() != secret
    stored = hash_secret(secret)
    assert secret not in stored and len(stored) == 64
    assert secret_matches(secret, stored) and not secret_matches(secret + "x", stored)


def test_settings_from_env_and_refusals() -> None:
    settings = Settings.from_env({"GRPC_PORT": "6000", "RATE_LIMIT_PER_MINUTE": "30"})
    assert (settings.grpc_port, settings.rate_limit_per_minute, settings.is_sqlite) == (
        6000,
        30,
        True,
    )
    for env in (
        {"RATE_LIMIT_PER_MINUTE": "0"},
        {"GRPC_PORT": "abc"},
        {"SQLITE_SYNCHRONOUS": "OFF"},
        {"DATABASE_URL": "mysql://x"},
        {"DISPOSITION_ENV": "production", "SQLITE_SYNCHRONOUS": "NORMAL"},
        {"GROUP_COMMIT_LINGER_MS": "abc"},
        {"GROUP_COMMIT_LINGER_MS": "-1"},
        {"GROUP_COMMIT_LINGER_MS": "nan"},
        {"GROUP_COMMIT_LINGER_MS": "5000"},
        {"SHUTDOWN_GRACE_SECONDS": "abc"},  # was a traceback; -5 and nan were accepted
        {"SHUTDOWN_GRACE_SECONDS": "-5"},
        {"SHUTDOWN_GRACE_SECONDS": "nan"},
    ):
        with pytest.raises(SettingsError):
            Settings.from_env(env)
    assert Settings.from_env({}).group_commit_linger_seconds == 0.002
    assert Settings.from_env({"GROUP_COMMIT_LINGER_MS": "0"}).group_commit_linger_seconds == 0


def test_settings_for_redis_and_metrics() -> None:
    assert Settings.from_env({}).metrics_port is None  # off unless asked for
    assert Settings.from_env({}).redis_url is None  # in-process limits by default
    settings = Settings.from_env(
        {"METRICS_PORT": "9464", "REDIS_URL": "redis://r:6379/0", "REDIS_KEY_PREFIX": "x:"}
    )
    assert (settings.metrics_port, settings.metrics_host) == (9464, "127.0.0.1")
    assert (settings.redis_url, settings.redis_key_prefix) == ("redis://r:6379/0", "x:")
    for env, message in (
        ({"REDIS_URL": "http://r"}, "REDIS_URL must start with redis://"),
        ({"METRICS_PORT": "70000"}, "METRICS_PORT must be at most 65535"),
        ({"METRICS_PORT": "-1"}, "METRICS_PORT must be at least 0"),
        ({"REDIS_TIMEOUT_SECONDS": "0"}, "REDIS_TIMEOUT_SECONDS must be at least"),
    ):
        with pytest.raises(SettingsError, match=message):
            Settings.from_env(env)


def test_settings_for_tracing() -> None:
    """On only with an OTLP endpoint, unless OTEL_SDK_DISABLED or OTEL_TRACES_EXPORTER=none."""
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}
    off = Settings.from_env({})
    assert (off.otlp_traces_endpoint, off.service_name) == (None, "disposition-server")
    assert Settings.from_env(endpoint).otlp_traces_endpoint == "http://collector:4317"
    traces_only = {**endpoint, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://traces:443"}
    assert Settings.from_env(traces_only).otlp_traces_endpoint == "https://traces:443"
    for env in (
        {**endpoint, "OTEL_SDK_DISABLED": "true"},
        {**endpoint, "OTEL_TRACES_EXPORTER": "none"},
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SERVICE_NAME": "x"},  # no endpoint
        {"OTEL_TRACES_SAMPLER": "xray"},  # the sampler is not even read with tracing off
    ):
        assert Settings.from_env(env).otlp_traces_endpoint is None, env
    on = Settings.from_env({**endpoint, "OTEL_SERVICE_NAME": "api-eu"})
    assert (on.service_name, on.trace_sampling_ratio, on.trace_follows_parent) == (
        "api-eu",
        1.0,
        True,
    )
    ratio = {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"}
    sampled = Settings.from_env({**endpoint, **ratio})
    assert (sampled.trace_sampling_ratio, sampled.trace_follows_parent) == (0.25, False)
    never = Settings.from_env({**endpoint, "OTEL_TRACES_SAMPLER": "parentbased_always_off"})
    assert (never.trace_sampling_ratio, never.trace_follows_parent) == (0.0, True)
    for env, message in (
        ({"OTEL_TRACES_EXPORTER": "console"}, "OTEL_TRACES_EXPORTER must be otlp or none"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, "OTEL_EXPORTER_OTLP_PROTOCOL must be"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4317"}, "must be http://host:port"),
        ({"OTEL_TRACES_SAMPLER": "xray"}, "OTEL_TRACES_SAMPLER must be one of"),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"}, "at most 1"),
    ):
        with pytest.raises(SettingsError, match=message):
            Settings.from_env({**endpoint, **env})


def test_errors_declare_codes_and_details() -> None:
    status = ValidationFailed([("customer_id", "customer_id should not be empty")]).to_status()
    assert (status.code, status.message) == (code_pb2.INVALID_ARGUMENT, "Validation failed")
    bad = error_details_pb2.BadRequest()
    assert status.details[1].Unpack(bad)
    assert bad.field_violations[0].field == "customer_id"
    assert (CustomerNotFound("c").http_status, RateLimited(5).http_status) == (404, 429)
    retry = error_details_pb2.RetryInfo()
    assert RateLimited(5).to_status().details[1].Unpack(retry) and retry.retry_delay.seconds == 5


def test_validation_failed_lists_what_fits_in_a_grpc_trailer() -> None:
    # Worst case: huge 4-byte characters, a million times. Base64 (as Envoy sends it) plus the
    # other trailers (~0.5 KB) must stay under the 8 KB metadata limit of gRPC clients.
    error = ValidationFailed([("\U0001f600" * 100_000, "\U0001f4a5" * 100_000)] * 1_000_000)
    assert len(error.violations) == 1_000_000
    assert len(base64.b64encode(error.to_status().SerializeToString())) < 6 * 1024
    listed = error.listed_violations()
    assert [len(v.field.encode()) for v in listed[:2]] == [MAX_FIELD_BYTES - 1] * 2
    assert [len(v.description.encode()) for v in listed[:2]] == [MAX_DESCRIPTION_BYTES - 1] * 2
    assert listed[0].field.endswith("…") and listed[0].description.endswith("…")
    assert [(v.field, v.description) for v in listed[2:]] == [
        ("", "999998 more problems not listed; fix the listed ones and retry to see the rest")
    ]
    # Exactly the budget: all listed. More: the first ones, leaving room for the count.
    exact = [("f", "x" * 1015)] * (MAX_VIOLATION_BYTES // 1024)  # 1,024 bytes each, encoded
    assert len(ValidationFailed(exact).to_status().details[1].value) == MAX_VIOLATION_BYTES
    over = ValidationFailed([*exact, ("a", "a")]).listed_violations()
    assert [(v.field, v.description) for v in over] == [
        *exact[:3],
        ("", "2 more problems not listed; fix the listed ones and retry to see the rest"),
    ]
