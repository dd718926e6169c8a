"""The stack: one or more gRPC servers and one Envoy in front of them, started and stopped together.

    with start_stack(database_url, workdir=tmp) as stack:
        urlopen(f"http://127.0.0.1:{stack.http_port}/...")     # REST through Envoy
        grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}")  # gRPC, straight to server 0

With `webhook_workers`, one `disposition-webhooks` process per entry delivers the webhooks
(started once the servers are ready, stopped with them) and the servers run with
WEBHOOK_DELIVERY=worker.

Servers start side by side and are each ready by their own "serving" line (devstack/server.py);
Envoy is ready by its own admin address file and /ready (devstack/envoy.py), and traces when the
servers do (the same OTEL_* variables: docs/operations.md#tracing). Stopping runs in
the reverse order: Envoy first, so no new request reaches a stopping server, then every server
at once, each draining its in-flight RPCs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devstack.envoy import EnvoyPorts, run_envoy
from devstack.processes import stop_processes
from devstack.server import SERVER, WEBHOOKS, ServerProcess, ServerStartError
from gateway.envoy_config import DEFAULT_HTTP_HOST
from server.settings import otlp_traces_endpoint, trace_sampler


@dataclass
class Stack:
    database_url: str
    servers: list[ServerProcess]
    envoy: EnvoyPorts
    workers: list[ServerProcess]

    @property
    def http_port(self) -> int:
        return self.envoy.http_port

    @property
    def grpc_port(self) -> int:
        """The first server's port (gRPC straight to it, as internal services call it)."""
        return self.servers[0].port

    @property
    def server_ports(self) -> list[int]:
        return [server.port for server in self.servers]


@contextmanager
def start_stack(
    database_url: str,
    *,
    workdir: Path | None = None,
    replicas: Sequence[Mapping[str, str]] = ({},),
    server_env: Mapping[str, str] | None = None,
    argv: Sequence[str] = SERVER,
    http_host: str = DEFAULT_HTTP_HOST,
    http_port: int = 0,
    admin_port: int = 0,
    drain_seconds: float = 15.0,
    webhook_workers: Sequence[Mapping[str, str]] = (),
) -> Iterator[Stack]:
    """One server per entry of `replicas` (its extra environment, e.g. a fixed GRPC_PORT; free
    ports otherwise), all with `server_env`, then Envoy balancing over them.

    `workdir` holds the logs (`server<i>.log`, `envoy.log`); without it the servers log to this
    process's stderr (workers: `webhooks<i>.log`). Each server gets `drain_seconds` to stop
    before it is killed. Each worker gets `server_env` and its entry of `webhook_workers`, but
    no METRICS_PORT unless its entry names one (the servers' would be taken).
    """
    if webhook_workers:
        server_env = {**(server_env or {}), "WEBHOOK_DELIVERY": "worker"}
    servers = [
        ServerProcess(
            database_url,
            None if workdir is None else workdir / f"server{index}.log",
            argv=argv,
            **{**(server_env or {}), **extra},
        )
        for index, extra in enumerate(replicas)
    ]
    workers = [
        ServerProcess(
            database_url,
            None if workdir is None else workdir / f"webhooks{index}.log",
            argv=WEBHOOKS,
            **{**(server_env or {}), "METRICS_PORT": "", **extra},
        )
        for index, extra in enumerate(webhook_workers)
    ]
    with ExitStack() as stack:
        launched: list[ServerProcess] = []
        stack.callback(
            lambda: stop_processes(
                [server.process for server in launched if server.process is not None],
                grace=drain_seconds,
            )
        )
        for server in servers:
            server.launch()
            launched.append(server)
        for server in servers:
            server.wait_ready()
        for worker in workers:  # after the servers: on SQLite, they migrate the database
            worker.launch()
            launched.append(worker)
        for worker in workers:
            worker.wait_ready()
        envoy = stack.enter_context(
            run_envoy(
                grpc_port=[server.port for server in servers],
                http_host=http_host,
                http_port=http_port,
                admin_port=admin_port,
                log_path=None if workdir is None else workdir / "envoy.log",
                **envoy_tracing({**os.environ, **(server_env or {})}),
            )
        )
        yield Stack(database_url, servers, envoy, workers)


def envoy_tracing(env: Mapping[str, str]) -> dict[str, Any]:
    """run_envoy's tracing arguments for servers with the environment `env`: the same collector,
    and their share of new traces (Envoy starts the traces of REST requests)."""
    endpoint = otlp_traces_endpoint(env)
    if endpoint is None:
        return {}
    ratio, _follows_parent = trace_sampler(env)  # Envoy always follows a traceparent's flag
    return {"otlp_endpoint": endpoint, "trace_sampling_percent": ratio * 100}


__all__ = ["ServerStartError", "Stack", "start_stack"]
