"""The real `disposition-admin` (.venv/bin) as a process, on a database given by URL."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.support import BIN


def admin(database_url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`disposition-admin ARGS` with DATABASE_URL (and `env`) set; its exit status and output."""
    return subprocess.run(
        [str(BIN / "disposition-admin"), *args],
        env={**os.environ, "DATABASE_URL": database_url, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def write(tmp_path: Path, name: str, content: object) -> str:
    """A file for the CLI to read (`--file`): text as it is, anything else as JSON; its path."""
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)
