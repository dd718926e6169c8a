"""Command-line tools from Debian's packages that `make test` and `make lint` install when they
are missing (`make debian-tools`); tests that need one skip, saying so, when it is absent."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class DebianTool:
    command: str
    package: str

    @property
    def installed(self) -> pytest.MarkDecorator:
        """Skips the test when the tool is absent."""
        return pytest.mark.skipif(
            shutil.which(self.command) is None,
            reason=f"{self.command} is not installed (Debian's {self.package}: `make test` "
            "installs it)",
        )

    def run(self, *args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        path = shutil.which(self.command)
        assert path is not None, f"{self.command} is not installed"
        return subprocess.run(
            [path, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
        )
