"""Render envoy.yaml for other ports and absolute paths.

The repository's envoy.yaml is the template: it is a valid, deployable config with the default
address and ports (HTTP 127.0.0.1:8080, gRPC upstream 127.0.0.1:50051, admin 9901) and paths
relative to the repository root. `render` swaps those few values by exact text substitution, so
the rendered file differs from envoy.yaml in nothing else. Several gRPC ports (server replicas)
repeat the cluster's one endpoint entry, once per port, in the order given.

    python -m gateway.envoy_config --http-port 18080 --grpc-port 50052 --out build/envoy.yaml
    python -m gateway.envoy_config --grpc-port 50051 50052 50053 --out build/envoy-cluster.yaml
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = REPO_ROOT / "envoy.yaml"

DEFAULT_HTTP_HOST = "127.0.0.1"
DEFAULT_HTTP_PORT = 8080
DEFAULT_GRPC_PORT = 50051
DEFAULT_ADMIN_PORT = 9901
DEFAULT_DESCRIPTOR = REPO_ROOT / "build" / "disposition.pb"
# The upstream cluster's one endpoint in envoy.yaml; rendered once per gRPC port.
ENDPOINT = """\
        - endpoint:
            address:
              socket_address: { address: 127.0.0.1, port_value: %d }
"""


def render(
    *,
    http_host: str = DEFAULT_HTTP_HOST,
    http_port: int = DEFAULT_HTTP_PORT,
    grpc_port: int | Sequence[int] = DEFAULT_GRPC_PORT,
    admin_port: int = DEFAULT_ADMIN_PORT,
    descriptor_path: str | os.PathLike[str] = DEFAULT_DESCRIPTOR,
    out_path: str | os.PathLike[str],
) -> Path:
    """Write envoy.yaml with the given ports and absolute file paths to `out_path`; return it.

    `grpc_port` is one upstream port or several (one endpoint each, e.g. server replicas).
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
    }
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
    parser.add_argument("--out", required=True, help="where to write the rendered config")
    args = parser.parse_args(argv)
    path = render(
        http_host=args.http_host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        admin_port=args.admin_port,
        descriptor_path=args.descriptor,
        out_path=args.out,
    )
    print(path)


if __name__ == "__main__":
    main()
