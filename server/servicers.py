"""gRPC servicers: protobuf in, use case calls, protobuf out. No SQL, no rules of their own.

Each handler first checks the limits declared on its request's fields (server/rules/declared.py),
reads the caller (partner, tenant, sub-tenant, request id) from the request context that the
interceptor filled in, and passes it to the use case explicitly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any

import grpc
from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from disposition.v1 import (
    call_ingestion_service_pb2 as ingestion_pb2,
)
from disposition.v1 import (
    call_ingestion_service_pb2_grpc as ingestion_grpc,
)
from disposition.v1 import (
    disposition_service_pb2 as disposition_pb2,
)
from disposition.v1 import (
    disposition_service_pb2_grpc as disposition_grpc,
)
from server import context as request_context
from server.context import caller as _caller
from server.db import Database
from server.records import ChangeRecord
from server.rules import declared
from server.runtime.feed import FeedHub
from server.usecases import (
    batch_updates,
    catalogs,
    dispositions,
    idempotency,
    ingestion,
    reports,
)


class DispositionService(disposition_grpc.DispositionServiceServicer):
    def __init__(self, db: Database, feed: FeedHub) -> None:
        self.db = db
        self.feed = feed

    async def WatchDispositionChanges(
        self,
        request: disposition_pb2.WatchDispositionChangesRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[disposition_pb2.WatchDispositionChangesResponse]:
        declared.require(request)
        async for batch in self.feed.watch(
            caller=_caller(),
            after_cursor=request.after_cursor,
            start_at_latest=request.start_at_latest,
        ):
            yield disposition_pb2.WatchDispositionChangesResponse(
                changes=[change_message(change) for change in batch.changes], cursor=batch.cursor
            )

    async def UpdateDispositionStatus(
        self,
        request: disposition_pb2.UpdateDispositionStatusRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> disposition_pb2.UpdateDispositionStatusResponse:
        declared.require(request)
        await dispositions.update_disposition_status(
            self.db,
            caller=_caller(),
            customer_id=request.customer_id,
            disposition_status=(
                request.disposition_status if request.HasField("disposition_status") else None
            ),
        )
        return disposition_pb2.UpdateDispositionStatusResponse(success=True)

    async def BatchUpdateDispositionStatus(
        self,
        request: disposition_pb2.BatchUpdateDispositionStatusRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> disposition_pb2.BatchUpdateDispositionStatusResponse:
        declared.require(request)  # the envelope; each item is judged on its own (below)
        result = await batch_updates.batch_update(
            self.db,
            caller=_caller(),
            items=[
                batch_updates.UpdateItem(
                    customer_id=item.customer_id,
                    disposition_status=(
                        item.disposition_status if item.HasField("disposition_status") else None
                    ),
                )
                for item in request.items
            ],
            problems=_item_problems(request.items, "items"),
            idempotency_key=_idempotency_key(),
        )
        _mark_replay(result)
        outcome = result.value
        reply = disposition_pb2.BatchUpdateDispositionStatusResponse(
            success=True,
            data=disposition_pb2.BatchUpdateDispositionStatusResult(
                ok=outcome.count(batch_updates.OK),
                not_found=outcome.count(batch_updates.NOT_FOUND),
                invalid=outcome.count(batch_updates.INVALID),
                changed=outcome.changed,
            ),
        )
        add = reply.data.items.add  # in place: no message copied per item
        for item in outcome.items:
            added = add(
                index=item.index,
                customer_id=item.customer_id,
                status=item.status,
                changed=item.changed,
            )
            for field, message in item.errors:
                added.errors.add(field=field, message=message)
        return reply

    async def ListDispositions(
        self,
        request: disposition_pb2.ListDispositionsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> disposition_pb2.ListDispositionsResponse:
        catalog = await catalogs.list_dispositions(self.db, caller=_caller())
        return disposition_pb2.ListDispositionsResponse(
            success=True,
            data=disposition_pb2.DispositionCatalog(
                restricted=catalog.restricted,
                scope=catalog.scope,
                dispositions=[
                    disposition_pb2.DispositionDefinition(
                        disposition_status=entry.disposition_status,
                        label=entry.label,
                        final=entry.final,
                        do_not_call=entry.do_not_call,
                        callback=entry.callback,
                    )
                    for entry in catalog.dispositions
                ],
            ),
        )

    async def GetDispositionStatus(
        self,
        request: disposition_pb2.GetDispositionStatusRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> disposition_pb2.GetDispositionStatusResponse:
        declared.require(request)
        status = await reports.get_status(
            self.db, caller=_caller(), customer_id=request.customer_id
        )
        return disposition_pb2.GetDispositionStatusResponse(
            success=True,
            data=disposition_pb2.CustomerDispositionStatus(
                customer_id=status.customer_id,
                disposition_status=status.disposition_status,
                updated_at=_timestamp(status.updated_at),
            ),
        )

    async def ListDispositionHistory(
        self,
        request: disposition_pb2.ListDispositionHistoryRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> disposition_pb2.ListDispositionHistoryResponse:
        page = await reports.list_history(
            self.db,
            caller=_caller(),
            customer_id=request.customer_id,
            page_size=request.page_size,
            page_token=request.page_token,
            problems=declared.check(request),  # reported with the page token's own
        )
        return disposition_pb2.ListDispositionHistoryResponse(
            success=True,
            data=disposition_pb2.DispositionHistoryPage(
                customer_id=page.customer_id,
                items=[change_message(change) for change in page.items],
                next_page_token=page.next_page_token,
            ),
        )

    async def GetDispositionSummary(
        self,
        request: disposition_pb2.GetDispositionSummaryRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> disposition_pb2.GetDispositionSummaryResponse:
        declared.require(request)
        summary = await reports.get_summary(
            self.db, caller=_caller(), window_from=getattr(request, "from"), window_to=request.to
        )
        data = disposition_pb2.DispositionSummary(
            tenant_id=summary.tenant_id,
            sub_tenant_id=summary.sub_tenant_id,
            **{"from": summary.window_from},  # a Python keyword
            to=summary.window_to,
            total_customers=summary.total_customers,
            customers_without_status=summary.customers_without_status,
            total_changes=summary.total_changes,
            statuses=[
                disposition_pb2.DispositionStatusCount(
                    disposition_status=count.disposition_status,
                    customers=count.customers,
                    changes=count.changes,
                )
                for count in summary.statuses
            ],
            generated_at=_timestamp(summary.generated_at),
        )
        return disposition_pb2.GetDispositionSummaryResponse(success=True, data=data)


class CallIngestionService(ingestion_grpc.CallIngestionServiceServicer):
    def __init__(self, db: Database) -> None:
        self.db = db

    async def IngestBatchCalls(
        self,
        request: ingestion_pb2.IngestBatchCallsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> ingestion_pb2.IngestBatchCallsResponse:
        declared.require(request, nested=False)  # the envelope; the items' limits next
        result = await ingestion.ingest_batch(
            self.db,
            caller=_caller(),
            items=[_batch_item(item) for item in request.data],
            problems=_item_problems(request.data, "data"),
            idempotency_key=_idempotency_key(),
        )
        _mark_replay(result)
        outcome = result.value
        reply = ingestion_pb2.IngestBatchCallsResponse(
            success=True,
            data=ingestion_pb2.IngestBatchCallsResult(
                created_calls=outcome.count("created"),
                duplicate_calls=outcome.count("duplicate"),
                created_customers=outcome.created_customers,
            ),
        )
        add = reply.data.items.add  # in place: no message copied per item
        for item in outcome.items:
            add(
                index=item.index,
                call_id=item.call_id,
                customer_id=item.customer_id,
                status=item.status,
                customer_created=item.customer_created,
            )
        return reply


def _item_problems(items: Sequence[Message], field: str) -> list[declared.Violations]:
    """The declared limits each item of a batch breaks, under `field[i]`."""
    return [declared.check(item, f"{field}[{index}]") for index, item in enumerate(items)]


def _idempotency_key() -> str | None:
    """The request's `idempotency-key` metadata (HTTP `Idempotency-Key`), if sent."""
    return request_context.get().headers.get(idempotency.HEADER)


def _mark_replay(result: idempotency.Result[Any]) -> None:
    """A stored reply carries `idempotent-replayed: true` (initial metadata: an HTTP header,
    sent by the interceptor with the reply)."""
    if result.replayed:
        request_context.get().reply_headers.append((idempotency.REPLAYED_HEADER, "true"))


def _batch_item(item: ingestion_pb2.BatchCallItem) -> ingestion.BatchItem:
    # A thousand per batch: positional arguments, and no map or list copied when empty (the
    # common case), half the time of the keyword form with copies.
    call, agent, customer = item.call, item.agent, item.customer
    has = item.HasField
    metadata, fields = item.metadata, item.custom_fields
    return ingestion.BatchItem(
        ingestion.CallInput(
            call.id, call.recording_url, call.start_time, call.end_time, call.contact_number
        )
        if has("call")
        else None,
        ingestion.AgentInput(agent.id, agent.email, agent.name) if has("agent") else None,
        ingestion.CustomerInput(
            customer.id,
            customer.name,
            customer.email,
            customer.disposition_status if customer.HasField("disposition_status") else None,
        )
        if has("customer")
        else None,
        item.callback_url,
        dict(metadata) if metadata else {},
        [(field.internal_name, field.value) for field in fields] if fields else [],
    )


def change_message(change: ChangeRecord) -> disposition_pb2.DispositionChange:
    """A history row as the DispositionChange of the history API and the change feed."""
    message = disposition_pb2.DispositionChange(
        cursor=change.seq,
        customer_id=change.customer_id,
        previous_status=change.previous_status or "",
        disposition_status=change.new_status or "",
        source=change.source,
        partner_id=change.partner_id,
        request_id=change.request_id,
        tenant_id=change.tenant_id,
        sub_tenant_id=change.sub_tenant_id,
    )
    message.changed_at.FromDatetime(change.changed_at)
    return message


def _timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp
