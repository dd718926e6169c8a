"""The dispatcher's followers against a real in-process server: an endpoint's follower never
serves another endpoint, even one that got its row id (SQLite gives a deleted row's id to the
next row)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from devstack import Credentials, onboard
from disposition.v1 import call_ingestion_service_pb2_grpc as ingestion_grpc
from disposition.v1 import disposition_service_pb2_grpc as disposition_grpc
from server.app import App
from server.db import Database
from server.storage import webhooks as storage
from server.usecases import webhooks
from tests.support.databases import settings_for
from tests.support.grpc_calls import ingest, update_request
from tests.support.webhooks import Received, Receiver


def events(received: list[Received], path: str) -> list[dict[str, Any]]:
    """The events that arrived on `path`."""
    return [request.event for request in received if request.headers["x-target"] == path]


def statuses(received: list[Received], path: str) -> list[str]:
    return [event["data"]["disposition_status"] for event in events(received, path)]


async def test_a_new_endpoint_on_a_deleted_ones_row_id_gets_only_its_own_tenants_changes(
    database_url: str, db: Database
) -> None:
    first = await onboard(db, "123")  # tenant1 / subtenant1
    second = await onboard(db, "456", grants=[("tenant2", "sub2")])
    receiver = Receiver().start()
    url = f"http://127.0.0.1:{receiver.port}"
    settings = settings_for(database_url, webhook_allow_private_urls=True)
    server = App(settings, Database(settings))
    try:
        old = await webhooks.create_endpoint(
            db, tenant_id="tenant1", sub_tenant_id="subtenant1", url=f"{url}/old",
            events=["disposition.changed"], allow_private=True,
        )  # fmt: skip
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            calls = ingestion_grpc.CallIngestionServiceStub(channel)
            await ingest(calls, first, "c1")
            await ingest(calls, second, "c2")
            dispositions = disposition_grpc.DispositionServiceStub(channel)

            async def change(who: Credentials, customer: str, status: str) -> None:
                await dispositions.UpdateDispositionStatus(
                    update_request(customer, status), metadata=who.metadata()
                )

            await change(first, "c1", "a")
            await asyncio.to_thread(receiver.wait, lambda got: "a" in statuses(got, "/old"))
            await webhooks.delete_endpoint(db, endpoint_id=old.endpoint.endpoint_id)
            new = await webhooks.create_endpoint(
                db, tenant_id="tenant2", sub_tenant_id="sub2", url=f"{url}/new",
                events=["disposition.changed"], allow_private=True,
            )  # fmt: skip
            await change(first, "c1", "b")  # the deleted endpoint's tenant
            await change(second, "c2", "x")  # the new endpoint's
            got = await asyncio.to_thread(receiver.wait, lambda got: "x" in statuses(got, "/new"))
        sent = int(events(got, "/new")[-1]["data"]["cursor"])
        for _ in range(500):  # the batch is stored just after it was sent
            async with db.read() as conn:
                stored = await storage.get_endpoint(conn, endpoint_id=new.endpoint.endpoint_id)
            if stored is None or stored.cursor >= sent:
                break
            await asyncio.sleep(0.02)
    finally:
        await server.stop(grace=1)
        receiver.stop()
    if settings.is_sqlite:
        assert new.endpoint.pk == old.endpoint.pk  # what makes the case
    assert [(e["data"]["tenant_id"], e["data"]["disposition_status"])
            for e in events(got, "/new")] == [("tenant2", "x")]  # fmt: skip
    assert statuses(got, "/old")[-1] == "a"  # nothing after its deletion
    assert stored is not None and stored.cursor == sent  # its own tenant's cursor
