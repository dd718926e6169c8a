"""Valid request bodies for tests, in their JSON form (REST sends them, gRPC parses them)."""

from __future__ import annotations

from typing import Any


def batch_item(
    call_id: str, customer_id: str, status: str | None = None, **call: str
) -> dict[str, Any]:
    """A valid batch-call item (JSON form); keyword arguments override call fields."""
    customer: dict[str, Any] = {"id": customer_id}
    if status is not None:
        customer["disposition_status"] = status
    return {
        "call": {
            "id": call_id,
            "recording_url": "https://recordings.example.com/calls/1.mp3",
            "start_time": "2026-11-26T09:30:00Z",
            "end_time": "2026-11-26T09:34:10Z",
            "contact_number": "+14155550123",
            **call,
        },
        "agent": {"id": "agent-7", "email": "agent7@example.com", "name": "Agent Seven"},
        "customer": customer,
    }


def status_items(customer_id: str, statuses: list[str], prefix: str) -> list[dict[str, Any]]:
    """Batch-call items that set the customer's status once per item, in order."""
    return [batch_item(f"{prefix}-{n}", customer_id, status) for n, status in enumerate(statuses)]
