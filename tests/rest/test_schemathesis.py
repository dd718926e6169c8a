"""Schemathesis, as an outside client runs it, with every check it has, against a real stack.

`schemathesis run --checks all` (the CLI, in a process of its own) reads the document the stack
serves and runs all its phases (examples, coverage, fuzzing, stateful) through Envoy with the
fuzzing partner's credentials. `--checks all` includes positive_data_acceptance (a request the
document allows must not be refused: the document states every limit the server enforces) and
negative_data_rejection (a request the document forbids must be refused), besides no 5xx,
documented statuses, headers and bodies, and 405 for undocumented methods. The hooks
(tests/rest/schemathesis_hooks.py) keep the few rules that need more than one field.

The stack lets webhook URLs be http and local (WEBHOOK_ALLOW_PRIVATE_URLS, as make run) and
delivers nothing (WEBHOOK_DELIVERY=worker without a worker), so generated URLs are neither
resolved nor called: no request leaves the machine.

The credentials go in as the document's two API-key schemes (so schemathesis can also leave them
out), the tenant headers through the hooks. FUZZ_ALL_EXAMPLES sets the examples per operation
and phase (default 8 in `make test`; `make fuzz` runs 100).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import openapi
from tests.support.payloads import batch_item
from tests.support.rest import Stack, start_stack

pytestmark = pytest.mark.envoy

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = int(os.environ.get("FUZZ_ALL_EXAMPLES", "8"))
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
SEED = os.environ.get("FUZZ_SEED", "1")  # the same cases each run; `make fuzz` draws one


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = {"WEBHOOK_ALLOW_PRIVATE_URLS": "true", "WEBHOOK_DELIVERY": "worker"}
    yield from start_stack(tmp_path_factory.mktemp("schemathesis"), server_env=env)


def test_schemathesis_with_all_checks_finds_nothing(stack: Stack, tmp_path: Path) -> None:
    partner = stack.onboard("schemathesis", rate_limit_per_minute=1_000_000_000)
    # Customers whose ids the generator is likely to hit, so reads get past 404.
    items = [batch_item(f"st-call-{c}", c, "new") for c in ("0", "a", "A", "00", "customer")]
    assert stack.ingest(partner, *items).status == 200
    base = f"http://127.0.0.1:{stack.envoy.http_port}"
    headers = partner.headers()
    streams = [
        path
        for path, operations in json.loads(Path(openapi.DEFAULT_OUT).read_text())["paths"].items()
        for operation in operations.values()
        if "text/event-stream" in operation["responses"]["200"]["content"]
    ]
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        f'[auth.openapi.ApiKey]\napi_key = "{headers["x-api-key"]}"\n\n'
        f'[auth.openapi.ApiSecret]\napi_key = "{headers["x-api-secret"]}"\n\n'
        # An event stream never ends: each is read to its first event (the starting cursor).
        + "".join(f'[[operations]]\ninclude-path = "{p}"\nmax-stream-events = 1\n' for p in streams)
    )
    command = [
        str(SCHEMATHESIS), "--config-file", str(config), "run", f"{base}{openapi.SPEC_PATH}",
        "--url", base, "--checks", "all", "--max-examples", str(EXAMPLES), "--seed", SEED,
        "--no-color", "--request-timeout", "30",
    ]  # fmt: skip
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "tests.rest.schemathesis_hooks",
        "PYTHONPATH": str(REPO),
        "FUZZ_BASE_URL": base,
        "FUZZ_HEADERS": json.dumps(headers),
    }
    run = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True)
    report = run.stdout + run.stderr
    (tmp_path / "schemathesis.txt").write_text(report)
    summary = report[report.rfind("SUMMARY") :]
    print(summary)
    assert run.returncode == 0, report[-20_000:]
    operations = len([o for ops in json.loads(openapi.DEFAULT_OUT.read_text())["paths"].values()
                      for o in ops])  # fmt: skip
    assert f"Tested: {operations}" in summary, summary  # every operation ran, none skipped
    generated = re.search(r"(\d+) generated", summary)
    assert generated is not None and int(generated.group(1)) >= operations * EXAMPLES, summary
