"""gRPC layer: a real grpc.aio server (in-process or a server process) and gRPC clients; no
Envoy."""
