"""`disposition-server` without the summary's counters: for `make bench`'s counters suite only.

    .venv/bin/python -m tests.bench.no_counters_server

The same server, except that a unit of work moves no counter (storage.units' deltas are empty),
so that the same load on both shows what maintaining them costs. Its summaries are wrong; it
lives under tests/, never in server/.
"""

from __future__ import annotations

from server.main import main
from server.storage import units


def _nothing(_plan: object) -> list[tuple[str, str, str, int]]:
    return []


if __name__ == "__main__":
    units.status_deltas = _nothing  # type: ignore[assignment]
    units.hour_deltas = _nothing  # type: ignore[assignment]
    main()
