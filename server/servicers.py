"""gRPC servicers: protobuf in, domain calls, protobuf out. No SQL, no rules."""

from __future__ import annotations

from typing import Any

import grpc

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
from server.db import Database
from server.domain import dispositions, ingestion


class DispositionService(disposition_grpc.DispositionServiceServicer):
    def __init__(self, db: Database) -> None:
        self.db = db

    async def UpdateDispositionStatus(
        self,
        request: disposition_pb2.UpdateDispositionStatusRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> disposition_pb2.UpdateDispositionStatusResponse:
        await dispositions.update_disposition_status(
            self.db,
            customer_id=request.customer_id,
            disposition_status=(
                request.disposition_status if request.HasField("disposition_status") else None
            ),
        )
        return disposition_pb2.UpdateDispositionStatusResponse(success=True)


class CallIngestionService(ingestion_grpc.CallIngestionServiceServicer):
    def __init__(self, db: Database) -> None:
        self.db = db

    async def IngestBatchCalls(
        self,
        request: ingestion_pb2.IngestBatchCallsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> ingestion_pb2.IngestBatchCallsResponse:
        outcome = await ingestion.ingest_batch(
            self.db, items=[_batch_item(item) for item in request.data]
        )
        return ingestion_pb2.IngestBatchCallsResponse(
            success=True,
            data=ingestion_pb2.IngestBatchCallsResult(
                created_calls=outcome.count("created"),
                duplicate_calls=outcome.count("duplicate"),
                created_customers=outcome.created_customers,
                items=[
                    ingestion_pb2.BatchCallOutcome(
                        index=item.index,
                        call_id=item.call_id,
                        customer_id=item.customer_id,
                        status=item.status,
                        customer_created=item.customer_created,
                    )
                    for item in outcome.items
                ],
            ),
        )


def _batch_item(item: ingestion_pb2.BatchCallItem) -> ingestion.BatchItem:
    call, agent, customer = item.call, item.agent, item.customer
    return ingestion.BatchItem(
        call=ingestion.CallInput(
            id=call.id,
            recording_url=call.recording_url,
            start_time=call.start_time,
            end_time=call.end_time,
            contact_number=call.contact_number,
        )
        if item.HasField("call")
        else None,
        agent=ingestion.AgentInput(id=agent.id, email=agent.email, name=agent.name)
        if item.HasField("agent")
        else None,
        customer=ingestion.CustomerInput(
            id=customer.id,
            name=customer.name,
            email=customer.email,
            disposition_status=(
                customer.disposition_status if customer.HasField("disposition_status") else None
            ),
        )
        if item.HasField("customer")
        else None,
        callback_url=item.callback_url,
        metadata=dict(item.metadata),
        custom_fields=[(field.internal_name, field.value) for field in item.custom_fields],
    )
