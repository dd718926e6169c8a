"""`disposition-admin`: which database it works on wherever it is run from, what it refuses, and
the JSON output and exit codes of the partner commands that tests/system/test_tooling.py does
not cover (the catalog commands' are in tests/system/test_admin_catalogs.py).

The project root is where the running `server` package lives (the pyproject.toml beside it). So
the tests that run the real .venv/bin/disposition-admin from scratch directories use a copy of
the package put first on PYTHONPATH: beside a copy of pyproject.toml it is a second checkout,
alone it is a package installed outside any checkout. This checkout's var/ is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from server.admin import main
from server.schema import head_revision
from server.settings import Settings, project_root
from tests.support import BIN, REPO
from tests.support.databases import sql

NO_DATABASE = (
    "disposition-admin: the database {} does not exist yet; create it with `make run` "
    "or `disposition-admin migrate`\n"
)
OUTSIDE = (
    "disposition-admin: DATABASE_URL is not set and disposition-admin is not running from a "
    "project checkout; set DATABASE_URL=sqlite+aiosqlite:///PATH/disposition.db "
    "(or postgresql+asyncpg://…)\n"
)
READ_ONLY = (["list"], ["partner", "list"], ["catalog", "list", "--tenant-id", "tenant1"])
WRITES = (
    ["partner", "create", "--partner-id", "acme", "--name", "Acme"],
    ["grant", "--partner-id", "acme", "--tenant-id", "t", "--sub-tenant-id", "*"],
)


def package_copy(into: Path, *, pyproject: str | None) -> Path:
    """The server package copied into `into`, beside `pyproject` (None: no pyproject.toml)."""
    shutil.copytree(REPO / "server", into / "server", ignore=shutil.ignore_patterns("__pycache__"))
    if pyproject is not None:
        (into / "pyproject.toml").write_text(pyproject)
    return into


def admin(
    *args: str, cwd: Path, code: Path, database_url: str | None = None
) -> subprocess.CompletedProcess[str]:
    """The real disposition-admin, running the package in `code`, from `cwd`."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PYTHONPATH")}
    env["PYTHONPATH"] = str(code)
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    return subprocess.run(
        [str(BIN / "disposition-admin"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A second checkout of the project, without a database yet."""
    return package_copy(tmp_path / "clone", pyproject=(REPO / "pyproject.toml").read_text())


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    """An empty working directory outside any checkout."""
    path = tmp_path / "elsewhere"
    path.mkdir()
    return path


def test_the_default_database_is_the_checkouts_var_disposition_db() -> None:
    assert project_root() == REPO
    expected = f"sqlite+aiosqlite:///{REPO / 'var' / 'disposition.db'}"
    assert Settings.from_env({}).database_url == expected
    assert Settings.from_env({"DATABASE_URL": ""}).database_url == expected  # empty is unset
    assert Settings().database_url == expected


def test_from_any_directory_it_uses_the_checkouts_database(
    checkout: Path, elsewhere: Path, tmp_path: Path
) -> None:
    database = checkout / "var" / "disposition.db"
    for args in (*READ_ONLY, *WRITES):  # nothing to work on yet: said, and nothing created
        refused = admin(*args, cwd=elsewhere, code=checkout)
        assert (refused.returncode, refused.stdout) == (2, "")
        assert refused.stderr == NO_DATABASE.format(database)
    assert not (checkout / "var").exists()

    migrated = admin("migrate", cwd=elsewhere, code=checkout)
    assert migrated.returncode == 0, migrated.stderr
    assert json.loads(migrated.stdout) == {"schema": "ready", "revision": head_revision()}
    created = admin(*WRITES[0], cwd=tmp_path, code=checkout)
    assert created.returncode == 0, created.stderr
    listed = admin("list", cwd=Path("/"), code=checkout)
    assert [p["partner_id"] for p in json.loads(listed.stdout)] == ["acme"]
    assert sql(f"sqlite+aiosqlite:///{database}", "SELECT partner_id FROM partners") == [("acme",)]
    assert list(elsewhere.iterdir()) == []


def test_it_never_creates_a_database_in_the_working_directory(
    checkout: Path, elsewhere: Path, tmp_path: Path
) -> None:
    installed = package_copy(tmp_path / "site-packages", pyproject=None)
    for code in (checkout, installed):
        for args in (*READ_ONLY, *WRITES, ["migrate"]):
            admin(*args, cwd=elsewhere, code=code)
            assert list(elsewhere.iterdir()) == [], (code, args)
    assert not (installed / "var").exists()


@pytest.mark.parametrize("pyproject", [None, '[project]\nname = "another-project"\n'])
def test_outside_a_checkout_it_refuses_without_database_url(
    pyproject: str | None, elsewhere: Path, tmp_path: Path, sqlite_template: Path
) -> None:
    installed = package_copy(tmp_path / "site-packages", pyproject=pyproject)
    for args in (*READ_ONLY, ["migrate"]):
        refused = admin(*args, cwd=elsewhere, code=installed)
        assert (refused.returncode, refused.stdout, refused.stderr) == (2, "", OUTSIDE)
    database = tmp_path / "given.db"
    shutil.copyfile(sqlite_template, database)
    given = admin(
        "list", cwd=elsewhere, code=installed, database_url=f"sqlite+aiosqlite:///{database}"
    )
    assert (given.returncode, json.loads(given.stdout)) == (0, [])
    assert list(elsewhere.iterdir()) == []


def run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], url: str, *argv: str
) -> tuple[int, Any, str]:
    """main() in this process: (exit code, its JSON output or None, stderr)."""
    monkeypatch.setenv("DATABASE_URL", url)
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, json.loads(out) if out else None, err


def test_a_named_database_that_does_not_exist_is_created_by_migrate_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "new" / "disposition.db"
    url = f"sqlite+aiosqlite:///{path}"
    for args in (*READ_ONLY, *WRITES):
        assert run(monkeypatch, capsys, url, *args) == (2, None, NO_DATABASE.format(path))
    assert not path.parent.exists()
    for name in ("migrate", "init-db"):  # the second is the first's old name, and a no-op now
        ready = {"schema": "ready", "revision": head_revision()}
        assert run(monkeypatch, capsys, url, name) == (0, ready, "")
    bad = run(monkeypatch, capsys, "mysql://db/x", "list")
    assert bad == (2, None, "disposition-admin: DATABASE_URL must start with "
                   "sqlite+aiosqlite:// or postgresql+asyncpg://\n")  # fmt: skip


def test_partner_commands_print_what_they_changed(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def admin_(*argv: str) -> tuple[int, Any, str]:
        return run(monkeypatch, capsys, database_url, *argv)

    code, issued, _ = admin_(
        "partner",
        "create",
        "--partner-id",
        "acme",
        "--name",
        "Acme",
        "--rate-limit-per-minute",
        "600",
    )
    assert code == 0 and issued["partner_id"] == "acme"
    assert issued["api_key"].startswith("dk_") and issued["api_secret"].startswith("ds_")
    assert admin_("partner", "set-rate-limit", "--partner-id", "acme", "--per-minute", "1200") == (
        0,
        {"partner_id": "acme", "rate_limit_per_minute": 1200},
        "",
    )
    for action, enabled in (("disable", False), ("enable", True)):
        changed = admin_("partner", action, "--partner-id", "acme")
        assert changed == (0, {"partner_id": "acme", "enabled": enabled}, "")
    assert admin_("partner", "list") == (0, [{
        "partner_id": "acme", "name": "Acme", "enabled": True, "rate_limit_per_minute": 1200,
        "grants": [],
    }], "")  # fmt: skip
    for argv in (
        ("partner", "rotate-secret", "--partner-id", "ghost"),
        ("partner", "enable", "--partner-id", "ghost"),
        ("partner", "set-rate-limit", "--partner-id", "ghost", "--per-minute", "5"),
    ):
        assert admin_(*argv) == (3, None, "disposition-admin: no partner 'ghost'\n")


def test_webhook_commands_print_what_they_changed(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def admin_(*argv: str) -> tuple[int, Any, str]:
        return run(monkeypatch, capsys, database_url, "webhook", *argv)

    monkeypatch.setenv("WEBHOOK_ALLOW_PRIVATE_URLS", "true")
    code, created, _ = admin_(
        "create",
        "--tenant-id",
        "t1",
        "--sub-tenant-id",
        "*",
        "--url",
        "http://127.0.0.1:9/h",
        "--event",
        "call.processed",
        "--event",
        "call.processed",
    )
    assert code == 0
    assert created["secret"].startswith("whsec_") and created["id"].startswith("we_")
    shown = {k: v for k, v in created.items() if k not in ("secret", "created_at")}
    assert shown == {
        "id": created["id"], "url": "http://127.0.0.1:9/h", "events": ["call.processed"],
        "tenant_id": "t1", "sub_tenant_id": "*", "enabled": True, "disabled_reason": None,
        "failing_since": None,
    }  # fmt: skip
    hook = ("--id", created["id"])
    listed = {k: v for k, v in created.items() if k != "secret"}
    assert admin_("list") == (0, [listed], "")
    assert admin_("list", "--tenant-id", "other") == (0, [], "")
    code, disabled, _ = admin_("disable", *hook)
    assert (code, disabled["enabled"], disabled["disabled_reason"]) == (
        0,
        False,
        "disabled by an operator",
    )
    code, enabled, _ = admin_("enable", *hook)
    assert (code, enabled["enabled"], enabled["disabled_reason"]) == (0, True, None)
    code, rotated, _ = admin_("rotate-secret", *hook)
    assert code == 0 and rotated["secret"] != created["secret"]
    assert admin_("deliveries", *hook) == (0, [], "")
    assert admin_("replay", *hook) == (0, {"id": created["id"], "replayed": 0}, "")
    assert admin_("delete", *hook) == (0, {"id": created["id"], "deleted": True}, "")
    for argv in (("deliveries", *hook), ("enable", *hook), ("delete", *hook)):
        assert admin_(*argv) == (3, None, f"disposition-admin: no webhook endpoint "
                                 f"{created['id']!r}\n")  # fmt: skip
    monkeypatch.delenv("WEBHOOK_ALLOW_PRIVATE_URLS")
    refused = admin_("create", "--tenant-id", "t1", "--sub-tenant-id", "s", "--url", "http://x.io")
    assert refused == (2, None, "disposition-admin: url must be an https URL\n")
