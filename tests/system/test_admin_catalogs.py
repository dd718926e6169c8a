"""The admin CLI's catalog commands as real processes: set, list and clear, and what they refuse
(the partner commands: tests/system/test_admin_cli.py and tests/system/test_tooling.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.admin import admin, write


def test_admin_catalog_set_list_clear(database_url: str, tmp_path: Path) -> None:
    good = write(
        tmp_path,
        "catalog.json",
        [
            {"disposition_status": "interested"},
            {
                "disposition_status": "dnc",
                "label": "Do not call",
                "final": True,
                "do_not_call": True,
            },
        ],
    )
    stored = {
        "tenant_id": "tenant1",
        "sub_tenant_id": "*",
        "dispositions": [
            {
                "disposition_status": "interested",
                "label": "interested",
                "final": False,
                "do_not_call": False,
                "callback": False,
            },
            {
                "disposition_status": "dnc",
                "label": "Do not call",
                "final": True,
                "do_not_call": True,
                "callback": False,
            },
        ],
    }
    done = admin(database_url, "catalog", "set", "--tenant", "tenant1", "--file", good)
    assert (done.returncode, json.loads(done.stdout)) == (0, stored), done.stderr
    listed_now = admin(database_url, "catalog", "list", "--tenant", "tenant1")
    assert (listed_now.returncode, json.loads(listed_now.stdout)) == (0, stored)
    sub = admin(database_url, "catalog", "list", "--tenant", "tenant1", "--sub-tenant", "s1")
    assert json.loads(sub.stdout) == {
        "tenant_id": "tenant1",
        "sub_tenant_id": "s1",
        "dispositions": [],
    }
    # Spelled like `grant` too (--tenant-id, --sub-tenant-id), with the same answers.
    spelled = admin(database_url, "catalog", "list", "--tenant-id", "tenant1")
    assert (spelled.returncode, json.loads(spelled.stdout)) == (0, stored)
    spelled_sub = admin(
        database_url, "catalog", "list", "--tenant-id", "tenant1", "--sub-tenant-id", "s1"
    )
    assert json.loads(spelled_sub.stdout) == json.loads(sub.stdout)

    # `set` replaces the whole catalog.
    replacement = write(
        tmp_path, "replacement.json", [{"disposition_status": "sold", "callback": True}]
    )
    assert (
        admin(
            database_url, "catalog", "set", "--tenant", "tenant1", "--file", replacement
        ).returncode
        == 0
    )
    assert json.loads(admin(database_url, "catalog", "list", "--tenant", "tenant1").stdout)[
        "dispositions"
    ] == [
        {
            "disposition_status": "sold",
            "label": "sold",
            "final": False,
            "do_not_call": False,
            "callback": True,
        }
    ]

    cleared = admin(database_url, "catalog", "clear", "--tenant", "tenant1")
    assert (cleared.returncode, json.loads(cleared.stdout)) == (
        0,
        {"tenant_id": "tenant1", "sub_tenant_id": "*", "cleared": 1},
    )
    again = admin(database_url, "catalog", "clear", "--tenant", "tenant1")
    assert (again.returncode, again.stdout) == (3, "")
    assert "tenant 'tenant1' has no catalog for sub-tenant '*'" in again.stderr


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (None, "cannot read"),
        ("{not json", "is not valid JSON"),
        ([], "the catalog lists no dispositions"),
        (
            [{"disposition_status": "a"}, {"disposition_status": "a"}],
            "[1].disposition_status 'a' is listed twice",
        ),
        (
            [{"disposition_status": "bad\u0007bell"}],
            "[0].disposition_status must not contain control characters",
        ),
        ([{"disposition_status": f"s{n}"} for n in range(501)], "at most 500 dispositions"),
    ],
)
def test_admin_catalog_set_refuses_a_bad_file(
    database_url: str, tmp_path: Path, content: object, error: str
) -> None:
    before = write(tmp_path, "before.json", [{"disposition_status": "kept"}])
    assert admin(database_url, "catalog", "set", "--tenant", "t", "--file", before).returncode == 0
    path = (
        str(tmp_path / "missing.json") if content is None else write(tmp_path, "bad.json", content)
    )
    done = admin(database_url, "catalog", "set", "--tenant", "t", "--file", path)
    assert (done.returncode, done.stdout) == (2, "")
    assert error in done.stderr and "Traceback" not in done.stderr
    kept = json.loads(admin(database_url, "catalog", "list", "--tenant", "t").stdout)
    assert [entry["disposition_status"] for entry in kept["dispositions"]] == ["kept"]


def test_admin_catalog_needs_a_real_tenant(database_url: str, tmp_path: Path) -> None:
    good = write(tmp_path, "c.json", [{"disposition_status": "a"}])
    for args in (["--tenant", "*"], ["--tenant", " "], []):
        done = admin(database_url, "catalog", "set", *args, "--file", good)
        assert done.returncode == 2 and "Traceback" not in done.stderr
