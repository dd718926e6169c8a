"""`disposition-server` that stops before storage: for `make bench`'s per-stage table only.

    .venv/bin/python -m tests.bench.stage_server

The same server (the interceptor, its gates, the servicer, validation), except that an update,
once validated, is answered at once instead of going through the group commit and the database.
The load suite runs it beside the real server and the no-op ceiling: ceiling -> this -> real
splits a request's CPU into the transport, the service's per-request work, and the write.
Lives under tests/, never in server/.
"""

from __future__ import annotations

from server.db import Database
from server.main import main
from server.records import Caller
from server.usecases import dispositions


async def _validated(
    db: Database, *, caller: Caller, customer_id: str, disposition_status: str | None
) -> bool:
    """The servicer checked the request's declared limits before calling this."""
    return False


if __name__ == "__main__":
    dispositions.update_disposition_status = _validated  # type: ignore[assignment]
    main()
