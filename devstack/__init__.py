"""The dev stack: the one way to start the service on a machine, for `make run`, `make
run-cluster`, the tests, the bench and the crash test.

- `stack.start_stack`: gRPC server(s) and Envoy on free (or given) ports, each ready by its own
  process's signal, stopped in order.
- `server.ServerProcess`, `envoy.run_envoy`: the two kinds of child, on their own.
- `credentials.Credentials`: a partner's key, secret and tenant, as headers or gRPC metadata.
- `ports`: free ports, and the check of fixed ones before `make run` starts anything.
- `run` (`make run`) and `cluster` (`make run-cluster`): the local launchers.

It may import server/ (settings, the partner use cases) and gateway/ (the Envoy config
renderer); nothing in server/ or gateway/ imports it.
"""

from devstack.credentials import Credentials, onboard, onboard_at
from devstack.envoy import EnvoyPorts, EnvoyStartError, run_envoy
from devstack.ports import PortTaken, check_free, free_port
from devstack.server import ServerProcess, ServerStartError
from devstack.stack import Stack, start_stack

__all__ = [
    "Credentials",
    "EnvoyPorts",
    "EnvoyStartError",
    "PortTaken",
    "ServerProcess",
    "ServerStartError",
    "Stack",
    "check_free",
    "free_port",
    "onboard",
    "onboard_at",
    "run_envoy",
    "start_stack",
]
