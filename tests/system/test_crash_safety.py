"""The short form of `make crash-test` (tests/system/crash_safety.py): 5 SIGKILLs of the server, 3
graceful restarts (SIGTERM) of it and 5 SIGKILLs of Envoy under concurrent writes, on SQLite and
(with TEST_POSTGRES_URL) on PostgreSQL; after the server's SIGKILLs, every change's webhook
delivered (`make crash-test` checks webhooks after every kind of restart)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from standardwebhooks.webhooks import Webhook

from tests.conftest import NO_POSTGRES, POSTGRES_URL
from tests.support.databases import sql
from tests.support.webhooks import Received
from tests.system import crash_safety

KILLS = 5
# A graceful restart takes its drain period (1.5 s) and a full start: 3 keep the short form short.
KILLS_BY_TARGET = {"server-term": 3}
WRITERS = 8
# Webhooks cost the wait for a killed process's lease and the backlog's delivery; after graceful
# restarts (the biggest backlog) and Envoy's, they are left to the long form.
WEBHOOK_TARGETS = {"server"}


@pytest.mark.parametrize("target", ["server", "server-term", "envoy"])
@pytest.mark.parametrize("engine", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_nothing_acknowledged_is_lost_across_kills(
    target: str, engine: str, tmp_path: Path
) -> None:
    if engine == "postgres" and POSTGRES_URL is None:
        pytest.skip(NO_POSTGRES)
    report = crash_safety.run(
        target=target, engine=engine, kills=KILLS_BY_TARGET.get(target, KILLS), writers=WRITERS,
        workdir=tmp_path, postgres_url=POSTGRES_URL, webhooks=target in WEBHOOK_TARGETS,
    )  # fmt: skip
    print(report.line())
    assert report.problems == []
    assert report.kills == KILLS_BY_TARGET.get(target, KILLS)
    # The kills landed under load: acknowledged writes on both sides of them, some cut off.
    assert report.acked > 100 and report.batches_acked > 5
    assert report.in_doubt + report.refused > 0
    if target in WEBHOOK_TARGETS:  # every change's event delivered, some only on a retry
        delivered, events = report.webhooks["delivered"], report.webhooks["events"]
        assert delivered == events == report.history_rows_checked
        assert report.webhooks["retried"] > 0


def _checked(
    rows: list[crash_safety.Row],
    calls: set[str],
    attempts: list[crash_safety.Attempt],
    batches: list[crash_safety.BatchAttempt],
) -> list[str]:
    report = crash_safety.Report("server", "sqlite")
    crash_safety.check(report, rows, calls, [attempts], batches)
    return report.problems


A = crash_safety.Attempt
B = crash_safety.BatchAttempt
GOOD_BATCH = B(["crash-call-0-0"], ["crash-new-0-0"], "acked")
GOOD_ROWS: list[crash_safety.Row] = [
    ("crash-0-0", "b", None, "a"),
    ("crash-0-0", "b", "a", "b"),
    ("crash-0-1", "x", None, "x"),  # in doubt, committed: allowed as the latest state
    ("crash-new-0-0", "new", None, "new"),
]
GOOD_ATTEMPTS = [A("crash-0-0", "a", "acked"), A("crash-0-0", "b", "acked"),
                 A("crash-0-1", "x", "in_doubt")]  # fmt: skip


def test_the_check_passes_what_the_rules_allow() -> None:
    assert _checked(GOOD_ROWS, {"crash-call-0-0"}, GOOD_ATTEMPTS, [GOOD_BATCH]) == []


@pytest.mark.parametrize(
    ("rows", "calls", "attempts", "batches", "problem"),
    [
        pytest.param(  # the acknowledged "b" never stored
            GOOD_ROWS[:1] + GOOD_ROWS[2:], {"crash-call-0-0"}, GOOD_ATTEMPTS, [GOOD_BATCH],
            "crash-0-0: history ['a'] but acknowledged ['a', 'b']", id="lost-ack",
        ),
        pytest.param(  # a refused write stored anyway
            [*GOOD_ROWS, ("crash-0-2", "r", None, "r")], {"crash-call-0-0"},
            [*GOOD_ATTEMPTS, A("crash-0-2", "r", "refused")], [GOOD_BATCH],
            "crash-0-2: history ['r'] but acknowledged []", id="refused-stored",
        ),
        pytest.param(  # history for a customer nobody wrote
            [*GOOD_ROWS, ("crash-0-3", "z", None, "z")], {"crash-call-0-0"}, GOOD_ATTEMPTS,
            [GOOD_BATCH], "crash-0-3: history [(None, 'z')] but no update was ever sent",
            id="phantom",
        ),
        pytest.param(  # a chain with a gap
            [("crash-0-0", "b", None, "a"), ("crash-0-0", "b", "q", "b"), *GOOD_ROWS[2:]],
            {"crash-call-0-0"}, GOOD_ATTEMPTS, [GOOD_BATCH],
            "crash-0-0: chain broken at 'q' -> 'b'", id="broken-chain",
        ),
        pytest.param(  # the stored status is not where the history ends
            [("crash-0-0", "a", None, "a"), ("crash-0-0", "a", "a", "b"), *GOOD_ROWS[2:]],
            {"crash-call-0-0"}, GOOD_ATTEMPTS, [GOOD_BATCH],
            "crash-0-0: history ends in 'b', stored 'a'", id="stored-differs",
        ),
        pytest.param(  # an acknowledged batch without its call
            GOOD_ROWS, set(), GOOD_ATTEMPTS, [GOOD_BATCH],
            "acknowledged batch lost: crash-call-0-0…", id="lost-batch",
        ),
        pytest.param(  # a batch in doubt stored in part
            [*GOOD_ROWS, ("crash-new-0-1", "new", None, "new")],
            {"crash-call-0-0", "crash-call-1-0"},
            GOOD_ATTEMPTS, [GOOD_BATCH, B(["crash-call-1-0", "crash-call-1-1"],
                                          ["crash-new-0-1", "crash-new-0-2"], "in_doubt")],
            "batch stored in part: crash-call-1-0…", id="partial-batch",
        ),
    ],
)  # fmt: skip
def test_the_check_reports_every_kind_of_violation(
    rows: list[crash_safety.Row],
    calls: set[str],
    attempts: list[crash_safety.Attempt],
    batches: list[crash_safety.BatchAttempt],
    problem: str,
) -> None:
    problems = _checked(rows, calls, attempts, batches)
    assert [p for p in problems if p.startswith(problem)], problems


def test_counter_check_reports_counters_that_disagree_with_the_rows(database_url: str) -> None:
    def problems() -> list[str]:
        report = crash_safety.Report("server", "sqlite")
        crash_safety.check_counters(report, database_url)
        return report.problems

    assert problems() == []
    sql(
        database_url,  # a customer no unit of work counted
        "INSERT INTO customers (tenant_id, sub_tenant_id, customer_id, disposition_status,"
        " created_at, updated_at) VALUES ('t', 's', 'c', 'new', :at, :at)",
        at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    assert problems() == ["the summary's customers counters disagree with the rows"]
    sql(database_url, "INSERT INTO status_counts VALUES ('t', 's', 'new', 1)")
    assert problems() == []


EVENTS: dict[str, crash_safety.Event] = {
    "evt_1": {"customer_id": "crash-0-0", "cursor": "1", "previous_status": "",
              "disposition_status": "a"},
    "evt_2": {"customer_id": "crash-0-0", "cursor": "2", "previous_status": "a",
              "disposition_status": "b"},
}  # fmt: skip


def delivery(event_id: str, status: int = 200, **data: str) -> Received:
    body = {"type": "disposition.changed", "data": {**EVENTS.get(event_id, {}), **data}}
    return Received({"webhook-id": event_id}, json.dumps(body).encode(), status)


def _checked_webhooks(received: list[Received]) -> crash_safety.Report:
    report = crash_safety.Report("server", "sqlite")
    crash_safety.check_webhooks(report, EVENTS, received)
    return report


def test_the_webhook_check_counts_retries_and_duplicates() -> None:
    report = _checked_webhooks([delivery("evt_1"), delivery("evt_2", 503), delivery("evt_2"),
                                delivery("evt_1")])  # fmt: skip
    assert report.problems == []
    assert report.webhooks == {"events": 2, "delivered": 2, "duplicates": 1, "retried": 1,
                               "missing": 0, "phantoms": 0}  # fmt: skip


@pytest.mark.parametrize(
    ("received", "problem"),
    [
        pytest.param([delivery("evt_1"), delivery("evt_2", 503)],
                     "1 webhook events never delivered: ['evt_2']", id="missing"),
        pytest.param([*map(delivery, EVENTS), delivery("evt_3", customer_id="crash-0-9")],
                     "webhook evt_3: no such change in the history", id="phantom"),
        pytest.param([*map(delivery, EVENTS), delivery("evt_2", disposition_status="z")],
                     "webhook evt_2: no such change in the history", id="wrong-data"),
        pytest.param([*map(delivery, EVENTS), delivery("evt_1", 400)],
                     "webhook evt_1: the signature does not verify", id="bad-signature"),
    ],
)  # fmt: skip
def test_the_webhook_check_reports_every_kind_of_violation(
    received: list[Received], problem: str
) -> None:
    problems = _checked_webhooks(received).problems
    assert [p for p in problems if p.startswith(problem)], problems


def test_the_receiver_refuses_bad_signatures_and_some_first_attempts() -> None:
    secret = "whsec_" + "a2V5LWtleS1rZXkta2V5LWtleS1rZXkta2V5"
    partner = crash_safety.WebhookPartner(secret)

    def signed(event_id: str, body: bytes) -> Received:
        at = datetime.now(UTC)
        signature = Webhook(secret).sign(event_id, at, body.decode())
        headers = {"webhook-id": event_id, "webhook-timestamp": str(int(at.timestamp())),
                   "webhook-signature": signature}  # fmt: skip
        return Received(headers, body)

    firsts = {f"evt_{n}": partner(signed(f"evt_{n}", b"{}")) for n in range(200)}
    refused = [event_id for event_id, status in firsts.items() if status == 503]
    assert set(firsts.values()) == {200, 503} and 2 <= len(refused) <= 30
    assert {partner(signed(event_id, b"{}")) for event_id in refused} == {200}
    tampered = signed("evt_0", b"{}")
    assert partner(Received(tampered.headers, b'{"x":1}')) == 400
