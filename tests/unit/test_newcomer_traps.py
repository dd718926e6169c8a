"""The small traps a new user met, kept fixed: what `make help` names, the README's promises, and
the admin CLI's flag spelling. (The bigger ones have their own tests: taken ports and Envoy's
bind address in test_devstack.py, the admin CLI's database in test_admin_cli.py, the pasted
examples in test_doc_examples.py, SHUTDOWN_GRACE_SECONDS in test_rules.py.)"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ADMIN = Path(sys.executable).parent / "disposition-admin"


def test_make_help_names_every_variable_make_run_reads() -> None:
    shown = subprocess.run(
        ["make", "-s", "help"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    run_line = next(line for line in shown.splitlines() if line.strip().startswith("make run "))
    for variable in ("HTTP_HOST", "HTTP_PORT", "GRPC_PORT", "ENVOY_ADMIN_PORT", "VAR_DIR"):
        assert variable in run_line, f"make help's run line does not name {variable}"


def test_the_readme_is_a_front_door() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    headings = re.findall(r"^## (.+)$", readme, flags=re.MULTILINE)
    assert "Changing ports, resetting the demo" in headings
    assert "remove `var/` to start from nothing" in readme  # the documented reset
    for document in ("api", "operations", "architecture", "testing", "benchmarks"):
        assert f"docs/{document}.md" in readme


@pytest.mark.parametrize(
    "command",
    [("grant",), ("revoke",), ("catalog", "set"), ("catalog", "list"), ("catalog", "clear")],
)
def test_admin_commands_spell_the_tenant_flags_alike(command: tuple[str, ...]) -> None:
    usage = subprocess.run(
        [str(ADMIN), *command, "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--tenant-id TENANT_ID" in usage
    assert "--sub-tenant-id SUB_TENANT_ID" in usage
