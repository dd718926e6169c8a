"""The bench's ceiling: a grpc.aio server whose UpdateDispositionStatus does no work at all.

    .venv/bin/python -m tests.bench.noop_server --port 50061

It registers the generated `disposition.v1.DispositionService` with UpdateDispositionStatus
answering `success: true` at once (no authentication, tenant checks, rate limit, validation or
database; the request is not even read), every other method left UNIMPLEMENTED, and the standard
gRPC health service reporting SERVING (Envoy's cluster routes only to endpoints whose health
check passes). One process, one event loop, the same grpc server options as server/app.py and no
interceptors: whatever the real server costs above this is our own per-request work. Logs one
JSON "serving" line on stderr, like disposition-server, and stops on SIGINT or SIGTERM.
Bench-only: it lives under tests/, never in server/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from disposition.v1 import disposition_service_pb2 as disposition_pb2
from disposition.v1 import disposition_service_pb2_grpc as disposition_grpc
from server.settings import Settings

SERVICE_NAME = disposition_pb2.DESCRIPTOR.services_by_name["DispositionService"].full_name
_OK = disposition_pb2.UpdateDispositionStatusResponse(success=True)


class NoopDispositionService(disposition_grpc.DispositionServiceServicer):
    """UpdateDispositionStatus returns OK immediately; nothing else is implemented."""

    async def UpdateDispositionStatus(
        self,
        request: disposition_pb2.UpdateDispositionStatusRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> disposition_pb2.UpdateDispositionStatusResponse:
        return _OK


async def serve(host: str, port: int) -> None:
    max_bytes = Settings().max_message_bytes  # the real server's default
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.max_send_message_length", max_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    disposition_grpc.add_DispositionServiceServicer_to_server(NoopDispositionService(), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind the no-op server to {host}:{port}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    print(json.dumps({"message": "serving", "port": bound, "servicer": "noop"}), file=sys.stderr,
          flush=True)  # fmt: skip
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await health_servicer.enter_graceful_shutdown()
    await server.stop(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (logged)")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
