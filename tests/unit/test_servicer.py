"""The servicers' protobuf <-> domain translation, driven by grpcio-testing.

grpcio-testing runs handlers synchronously, so each async servicer method is
driven on a private event loop; the domain call is real (a real SQLite file).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import grpc_testing
import pytest

from devstack import onboard
from disposition.v1 import call_ingestion_service_pb2 as ingestion_pb2
from disposition.v1 import disposition_service_pb2 as disposition_pb2
from server import context
from server.context import RequestContext
from server.db import Database
from server.errors import CustomerNotFound
from server.runtime.feed import FeedHub
from server.servicers import CallIngestionService, DispositionService
from tests.support.databases import settings_for
from tests.support.grpc_calls import batch_request, history, update_request
from tests.support.payloads import batch_item

UPDATE = disposition_pb2.DESCRIPTOR.services_by_name["DispositionService"].methods_by_name[
    "UpdateDispositionStatus"
]
INGEST = ingestion_pb2.DESCRIPTOR.services_by_name["CallIngestionService"].methods_by_name[
    "IngestBatchCalls"
]


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()


class Synchronous:
    """Presents an async servicer's methods as blocking ones, with a request context set."""

    def __init__(self, servicer: Any, loop: LoopThread, ctx: RequestContext) -> None:
        self.servicer, self.loop, self.ctx = servicer, loop, ctx
        self.raised: list[BaseException] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.servicer, name)

        def call(request: Any, rpc: grpc.ServicerContext) -> Any:
            async def scoped() -> Any:
                context.current.set(self.ctx)
                return await method(request, rpc)

            try:
                return self.loop.run(scoped())
            except Exception as exc:
                self.raised.append(exc)
                raise

        return call


class Harness(NamedTuple):
    server: grpc_testing.Server
    db: Database
    loop: LoopThread
    updates: Synchronous  # the DispositionService, whose raised errors it keeps


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    loop = LoopThread()
    db = Database(settings_for(f"sqlite+aiosqlite:///{tmp_path / 's.db'}"))
    loop.run(db.create_schema())
    creds = loop.run(onboard(db, "123"))
    ctx = RequestContext(
        request_id="req-1",
        method="test",
        partner_pk=1,
        partner_id=creds.partner_id,
        tenant_id="tenant1",
        sub_tenant_id="subtenant1",
    )
    updates = Synchronous(DispositionService(db, FeedHub(db)), loop, ctx)
    server = grpc_testing.server_from_dictionary(
        {
            UPDATE.containing_service: updates,
            INGEST.containing_service: Synchronous(CallIngestionService(db), loop, ctx),
        },
        grpc_testing.strict_real_time(),
    )
    yield Harness(server, db, loop, updates)
    loop.run(db.dispose())
    loop.close()


def invoke(server: grpc_testing.Server, method: Any, request: Any) -> tuple[Any, grpc.StatusCode]:
    rpc = server.invoke_unary_unary(method, (), request, None)
    response, _, code, _ = rpc.termination()
    return response, code


def test_update_translates_presence_of_disposition_status(harness: Harness) -> None:
    server, db, loop, _ = harness
    _, code = invoke(server, INGEST, batch_request(batch_item("call-1", "c1", "new")))
    assert code == grpc.StatusCode.OK
    response, code = invoke(server, UPDATE, update_request("c1"))  # absent: unchanged
    assert (response.success, code) == (True, grpc.StatusCode.OK)
    invoke(server, UPDATE, update_request("c1", ""))  # empty: cleared
    assert loop.run(history(db, "c1")) == [
        (None, "new", "batch_call"),
        ("new", None, "disposition_update"),
    ]


def test_batch_reply_lists_each_item(harness: Harness) -> None:
    server, _, _, _ = harness
    response, code = invoke(
        server, INGEST, batch_request(batch_item("call-1", "c1"), batch_item("call-2", "c1"))
    )
    assert code == grpc.StatusCode.OK
    assert response.success and response.data.created_calls == 2
    assert [(i.index, i.call_id, i.customer_created) for i in response.data.items] == [
        (0, "call-1", True),
        (1, "call-2", False),
    ]


def test_domain_errors_are_raised_for_the_interceptor_to_map(harness: Harness) -> None:
    server, _, _, updates = harness
    _, code = invoke(server, UPDATE, update_request("nobody", "x"))
    # The servicer does not set statuses itself: it raises, and (in the real server)
    # the request interceptor maps the error. grpcio-testing reports UNKNOWN.
    assert code == grpc.StatusCode.UNKNOWN
    assert [type(e) for e in updates.raised] == [CustomerNotFound]
