"""The Lua filter by its own tool: luacheck (Debian's lua-check, installed by `make test` and
`make lint`), with the project's .luacheckrc, on gateway/envelope.lua and on the
build/envelope.lua that Envoy runs (rendered by `make gen`)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support.tools import DebianTool

REPO = Path(__file__).resolve().parents[2]
LUACHECK = DebianTool("luacheck", "lua-check")
pytestmark = LUACHECK.installed


def luacheck(*paths: Path) -> subprocess.CompletedProcess[str]:
    return LUACHECK.run("--no-color", "--formatter", "plain", *map(str, paths), cwd=REPO)


def test_the_filter_and_its_rendered_copy_are_clean() -> None:
    done = luacheck(REPO / "gateway" / "envelope.lua", REPO / "build" / "envelope.lua")
    assert (done.returncode, done.stdout) == (0, ""), done.stdout + done.stderr


def test_the_configuration_catches_what_it_should(tmp_path: Path) -> None:
    """The check can fail: a stray global, an unused local and a typo'd global are reported."""
    source = (REPO / "gateway" / "envelope.lua").read_text()
    broken = tmp_path / "envelope.lua"
    broken.write_text(
        source + "\nlocal unused = 1\nstray = 2\nlocal function f() return MESAGE_FOR_STATUS end\n"
    )
    done = luacheck(broken)
    assert done.returncode == 1
    found = done.stdout
    assert "unused variable 'unused'" in found
    assert "setting non-standard global variable 'stray'" in found
    assert "accessing undefined variable 'MESAGE_FOR_STATUS'" in found
