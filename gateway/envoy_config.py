"""Render envoy.yaml for other ports and absolute paths.

The repository's envoy.yaml is the template: it is a valid, deployable config with the default
address and ports (HTTP 127.0.0.1:8080, gRPC upstream 127.0.0.1:50051, admin 9901) and paths
relative to the repository root. `render` swaps those few values by exact text substitution, so
the rendered file differs from envoy.yaml in nothing else. Several gRPC ports (server replicas)
repeat the cluster's one endpoint entry, once per port, in the order given.

With an OTLP endpoint (`otlp_endpoint`, OTLP over gRPC), the rendered file also traces: TRACING
goes into the listener's HTTP connection manager and COLLECTOR_CLUSTER into the clusters
(docs/operations.md#tracing). envoy.yaml itself does not trace.

    python -m gateway.envoy_config --http-port 18080 --grpc-port 50052 --out build/envoy.yaml
    python -m gateway.envoy_config --grpc-port 50051 50052 50053 --out build/envoy-cluster.yaml
    python -m gateway.envoy_config --otlp-endpoint http://127.0.0.1:4317 --out build/envoy.yaml
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = REPO_ROOT / "envoy.yaml"

DEFAULT_HTTP_HOST = "127.0.0.1"
DEFAULT_HTTP_PORT = 8080
DEFAULT_GRPC_PORT = 50051
DEFAULT_ADMIN_PORT = 9901
DEFAULT_DESCRIPTOR = REPO_ROOT / "build" / "disposition.pb"
# The docs page's files (GET /docs): `make gen` writes them to build/docs/, beside the descriptor
# set; envoy.yaml serves each one.
DOCS_FILES = (
    "index.html",
    "swagger-initializer.js",
    "swagger-ui-bundle.js",
    "swagger-ui.css",
    "favicon-32x32.png",
)
# The upstream cluster's one endpoint in envoy.yaml; rendered once per gRPC port.
ENDPOINT = """\
        - endpoint:
            address:
              socket_address: { address: 127.0.0.1, port_value: %d }
"""
# Tracing, rendered only with an OTLP endpoint: inserted after TRACING_AFTER (the connection
# manager's stat_prefix) and COLLECTOR_AFTER (the clusters' heading).
TRACING_AFTER = "          stat_prefix: public_http\n"
COLLECTOR_AFTER = "  clusters:\n"
SERVICE_NAME = "disposition-envoy"  # the service.name of Envoy's spans
TRACING = """\
          # OpenTelemetry: a span per request, the child of the client's W3C `traceparent` when
          # it sends one (sampled as that header says), else a new trace sampled at
          # random_sampling percent; its context goes upstream in `traceparent`, so the server's
          # span is its child. Spans go by OTLP/gRPC to the cluster opentelemetry_collector.
          tracing:
            random_sampling: { value: %(sampling)s }
            provider:
              name: envoy.tracers.opentelemetry
              typed_config:
                "@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig
                grpc_service:
                  envoy_grpc: { cluster_name: opentelemetry_collector }
                  timeout: 1s
                service_name: %(service_name)s
          # Envoy would otherwise write its tracing decision into a client's UUID x-request-id
          # (one digit changed), and the server would log the request under another id.
          request_id_extension:
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig
              pack_trace_reason: false
"""
COLLECTOR_CLUSTER = """\
  # The OpenTelemetry collector that receives Envoy's spans (OTLP over gRPC).
  - name: opentelemetry_collector
    type: STRICT_DNS
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {}
    load_assignment:
      cluster_name: opentelemetry_collector
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: { address: %(host)s, port_value: %(port)d }
%(tls)s"""
COLLECTOR_TLS = """\
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: %s
"""


def render(
    *,
    http_host: str = DEFAULT_HTTP_HOST,
    http_port: int = DEFAULT_HTTP_PORT,
    grpc_port: int | Sequence[int] = DEFAULT_GRPC_PORT,
    admin_port: int = DEFAULT_ADMIN_PORT,
    descriptor_path: str | os.PathLike[str] = DEFAULT_DESCRIPTOR,
    otlp_endpoint: str | None = None,
    trace_sampling_percent: float = 100.0,
    out_path: str | os.PathLike[str],
) -> Path:
    """Write envoy.yaml with the given ports and absolute file paths to `out_path`; return it.

    `grpc_port` is one upstream port or several (one endpoint each, e.g. server replicas).
    `otlp_endpoint` (http://host:port, or https:// for TLS; None: no tracing) adds tracing,
    sampling new traces at `trace_sampling_percent`.
    """
    grpc_ports = [grpc_port] if isinstance(grpc_port, int) else list(grpc_port)
    if not grpc_ports:
        raise ValueError("at least one gRPC upstream port is needed")
    text = TEMPLATE.read_text()
    substitutions = {
        # The public listener's address (its port_value is unique in the file).
        f"{{ address: {DEFAULT_HTTP_HOST}, port_value: {DEFAULT_HTTP_PORT} }}": (
            f"{{ address: {http_host}, port_value: {http_port} }}"
        ),
        ENDPOINT % DEFAULT_GRPC_PORT: "".join(ENDPOINT % port for port in grpc_ports),
        f"port_value: {DEFAULT_ADMIN_PORT} ": f"port_value: {admin_port} ",
        "proto_descriptor: build/disposition.pb": (
            f"proto_descriptor: {Path(descriptor_path).resolve()}"
        ),
        # Written by `make gen` next to the descriptor set (gateway/vocabulary.py, openapi.py).
        "filename: build/envelope.lua": (
            f"filename: {Path(descriptor_path).resolve().parent / 'envelope.lua'}"
        ),
        "filename: build/openapi.json": (
            f"filename: {Path(descriptor_path).resolve().parent / 'openapi.json'}"
        ),
        **{
            f"filename: build/docs/{name}": (
                f"filename: {Path(descriptor_path).resolve().parent / 'docs' / name}"
            )
            for name in DOCS_FILES
        },
    }
    if otlp_endpoint is not None:
        substitutions[TRACING_AFTER] = TRACING_AFTER + TRACING % {
            "sampling": trace_sampling_percent,
            "service_name": SERVICE_NAME,
        }
        substitutions[COLLECTOR_AFTER] = COLLECTOR_AFTER + collector_cluster(otlp_endpoint)
    for old in substitutions:
        if text.count(old) != 1:
            raise ValueError(f"{TEMPLATE} must contain {old!r} exactly once")
    # One pass, so a new value can never be substituted again (e.g. http_port=50051).
    pattern = re.compile("|".join(re.escape(old) for old in substitutions))
    text = pattern.sub(lambda match: substitutions[match.group(0)], text)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


def collector_cluster(otlp_endpoint: str) -> str:
    """COLLECTOR_CLUSTER for an OTLP/gRPC endpoint: http://host[:port], or https:// for TLS."""
    url = urlsplit(otlp_endpoint)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(
            f"an OTLP endpoint is http://host:port or https://host:port, got {otlp_endpoint!r}"
        )
    return COLLECTOR_CLUSTER % {
        "host": url.hostname,
        "port": url.port or 4317,
        "tls": COLLECTOR_TLS % url.hostname if url.scheme == "https" else "",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--http-host",
        default=os.environ.get("HTTP_HOST", DEFAULT_HTTP_HOST),
        help="the public listener's address (0.0.0.0: every interface)",
    )
    parser.add_argument(
        "--http-port", type=int, default=int(os.environ.get("HTTP_PORT", DEFAULT_HTTP_PORT))
    )
    parser.add_argument(
        "--grpc-port",
        type=int,
        nargs="+",
        default=[int(os.environ.get("GRPC_PORT", DEFAULT_GRPC_PORT))],
        help="one or more upstream gRPC ports (server replicas)",
    )
    parser.add_argument(
        "--admin-port",
        type=int,
        default=int(os.environ.get("ENVOY_ADMIN_PORT", DEFAULT_ADMIN_PORT)),
    )
    parser.add_argument(
        "--descriptor", default=str(DEFAULT_DESCRIPTOR), help="descriptor set (make gen)"
    )
    parser.add_argument(
        "--otlp-endpoint",
        default=None,
        help="trace to this OpenTelemetry collector (OTLP/gRPC, http://host:port)",
    )
    parser.add_argument("--out", required=True, help="where to write the rendered config")
    args = parser.parse_args(argv)
    path = render(
        http_host=args.http_host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        admin_port=args.admin_port,
        descriptor_path=args.descriptor,
        otlp_endpoint=args.otlp_endpoint,
        out_path=args.out,
    )
    print(path)


if __name__ == "__main__":
    main()
