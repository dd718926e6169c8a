"""The alert rules (ops/prometheus/alerts.yml) by Prometheus's own tool: `promtool check rules`
and `promtool test rules` (Debian's prometheus package, installed by `make test`), and every
metric they name is one the service exports."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.support.tools import DebianTool

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "ops" / "prometheus"
PROMTOOL = DebianTool("promtool", "prometheus")
needs_promtool = PROMTOOL.installed


def promtool(*args: str, cwd: Path = RULES) -> subprocess.CompletedProcess[str]:
    return PROMTOOL.run(*args, cwd=cwd)


@needs_promtool
def test_the_rules_are_valid_and_fire_as_their_tests_say() -> None:
    checked = promtool("check", "rules", "alerts.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", "alerts_test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


@needs_promtool
def test_a_rule_that_does_not_fire_as_expected_fails(tmp_path: Path) -> None:
    """The rule tests can fail: with the error-rate threshold raised, its test does."""
    rules = (RULES / "alerts.yml").read_text()
    assert rules.count("> 0.01\n") == 1
    (tmp_path / "alerts.yml").write_text(rules.replace("> 0.01\n", "> 0.5\n"))
    (tmp_path / "alerts_test.yml").write_text((RULES / "alerts_test.yml").read_text())
    tested = promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert tested.returncode != 0
    assert "DispositionHighErrorRate" in tested.stdout + tested.stderr


def test_every_metric_the_rules_name_is_exported() -> None:
    named = set(re.findall(r"\bdisposition_[a-z_]+", (RULES / "alerts.yml").read_text()))
    exported = set(re.findall(r'"(disposition_[a-z_]+)"', (REPO / "server/metrics.py").read_text()))
    suffixes = re.compile(r"_(total|bucket|count|sum)$")
    assert named, "the rules name no metric"
    assert {name for name in named if suffixes.sub("", name) not in exported} == set()
