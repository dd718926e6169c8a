"""What the tests share, by kind (servers, Envoy and credentials come from the dev stack,
devstack/):

- `databases`: settings for a database URL, SQL on either engine, the run's PostgreSQL schemas,
  fault injection, running coroutines from synchronous code;
- `payloads`: valid request bodies (batch-call items);
- `grpc_calls`: gRPC calls and their decoded error details, the change feed's watcher, rows as gRPC
  tests check them;
- `http_client`: the plain HTTP client of REST tests and the envelope assertion;
- `rest`: the REST tests' stack (a server process and Envoy) with its helpers;
- `admin`: the real `disposition-admin` as a process;
- `webhooks`: a real webhook receiver and endpoints created with `disposition-admin`;
- `properties`: the hypothesis settings and the seeded server of the property tests.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
