"""The rooms of the code and the arrows allowed between them (docs/architecture.md draws them).

Every module of server/, gateway/ and devstack/ belongs to exactly one room; an import from one
room to another must be an allowed arrow, and a few libraries stay in the rooms that own them
(grpc in the transport, SQL in storage). A new module, or a new arrow, fails here until the
table below and docs/architecture.md say where it belongs.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("server", "gateway", "devstack")

# Room -> the module prefixes it holds (longest prefix wins).
ROOMS: dict[str, tuple[str, ...]] = {
    "api": ("disposition",),  # the generated protobuf code (make gen)
    "records": ("server.records",),
    "errors": ("server.errors",),
    "settings": ("server.settings",),
    "rules": ("server.rules",),
    "storage": (
        "server.storage",
        "server.db",
        "server.models",
        "server.schema",
        "server.migrations",
    ),
    "runtime": ("server.runtime",),
    "usecases": ("server.usecases",),
    "transport": (
        "server.app",
        "server.main",
        "server.servicers",
        "server.webhook_servicer",
        "server.webhook_worker",
        "server.interceptors",
        "server.context",
        "server.metrics",
        "server.tracing",
    ),
    "admin": ("server.admin",),
    "package": ("server",),  # server/__init__.py
    "gateway": ("gateway",),
    "devstack": ("devstack",),
}

# Room -> the other rooms it may import.
ALLOWED: dict[str, set[str]] = {
    "records": set(),
    "errors": set(),
    "settings": set(),
    "package": set(),
    "rules": {"api", "records", "errors"},
    "storage": {"records", "settings"},
    "runtime": {"records", "errors", "rules", "storage", "settings"},
    "usecases": {"records", "errors", "rules", "runtime", "storage"},
    "transport": {
        "api",
        "records",
        "errors",
        "settings",
        "rules",
        "runtime",
        "usecases",
        "storage",
    },
    "admin": {"records", "errors", "settings", "usecases", "storage"},
    "gateway": {"api", "errors", "rules"},
    "devstack": {"settings", "storage", "usecases", "gateway"},
}

# Libraries that belong to some rooms only: (import prefix, rooms that may use it).
OWNED: list[tuple[str, set[str]]] = [
    ("grpc", {"transport"}),  # the domain never knows about gRPC
    ("grpc_health", {"transport"}),
    ("grpc_reflection", {"transport"}),
    # SQL lives in storage; a use case may name the unit of work's connection type only.
    ("sqlalchemy.ext.asyncio", {"storage", "usecases", "transport", "devstack", "settings"}),
    ("sqlalchemy", {"storage", "transport", "devstack", "settings"}),
    ("alembic", {"storage"}),
    ("asyncpg", {"storage", "devstack"}),
    ("prometheus_client", {"transport"}),
    ("opentelemetry", {"transport"}),  # tracing: server/tracing.py, loaded only when it is on
    ("redis", {"runtime", "devstack"}),
]


def room_of(module: str) -> str | None:
    best: tuple[int, str] | None = None
    for room, prefixes in ROOMS.items():
        for prefix in prefixes:
            matches = module == prefix or module.startswith(prefix + ".")
            if matches and (best is None or len(prefix) > best[0]):
                best = (len(prefix), room)
    return None if best is None else best[1]


def modules() -> Iterator[tuple[str, Path]]:
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join(parts), path


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, module) for every absolute import; `from a import b` yields a.b when b is a module
    of ours and a otherwise."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                ours = room_of(candidate) is not None and (
                    (REPO / Path(*candidate.split("."))).with_suffix(".py").exists()
                    or (REPO / Path(*candidate.split("."))).is_dir()
                )
                yield node.lineno, candidate if ours else node.module


def test_every_module_has_a_room() -> None:
    homeless = [module for module, _ in modules() if room_of(module) is None]
    assert homeless == []


def arrows() -> Iterator[tuple[str, str, str, str]]:
    """(where, from room, to room or library, what) for every import that crosses a room."""
    for module, path in modules():
        source = room_of(module)
        assert source is not None
        for line, target in imports(path):
            where = f"{path.relative_to(REPO)}:{line}"
            room = room_of(target)
            if room is not None and room != source:
                yield where, source, room, target
            for library, _owners in OWNED:
                if target == library or target.startswith(library + "."):
                    yield where, source, f"lib:{library}", target
                    break


def test_imports_follow_the_allowed_arrows() -> None:
    wrong = []
    for where, source, target, what in arrows():
        if target.startswith("lib:"):
            library = target[4:]
            owners = dict(OWNED)[library]
            if source not in owners:
                wrong.append(f"{where}: {source} imports {what} (only {sorted(owners)} may)")
        elif target not in ALLOWED[source]:
            wrong.append(f"{where}: {source} -> {target} ({what}) is not an allowed arrow")
    assert wrong == []


def documented_rooms() -> dict[str, set[str]]:
    """docs/architecture.md's table of rooms: `| room | holds | may import |`."""
    rooms: dict[str, set[str]] = {}
    in_table = False
    for line in (REPO / "docs" / "architecture.md").read_text().splitlines():
        if line.startswith("| room |"):
            in_table = True
            continue
        if in_table and not line.startswith("|"):
            break
        if in_table and not line.startswith("|--"):
            room, _holds, allowed = (cell.strip().strip("`") for cell in line.strip("|").split("|"))
            names = {name.strip().strip("`") for name in allowed.split(",")}
            rooms[room] = names - {"nothing", ""}
    return rooms


def test_the_architecture_document_states_the_same_arrows() -> None:
    assert documented_rooms() == ALLOWED


def test_the_table_catches_a_wrong_arrow(tmp_path: Path) -> None:
    """The check itself can fail: a rule importing storage is reported."""
    module = tmp_path / "bad.py"
    module.write_text("from server.storage import customers\nimport grpc\n")
    found = list(imports(module))
    assert found == [(1, "server.storage.customers"), (2, "grpc")]
    assert room_of("server.storage.customers") == "storage"
    assert "storage" not in ALLOWED["rules"]
