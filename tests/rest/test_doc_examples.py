"""The shell examples of docs/api.md and docs/operations.md run as pasted, against a live stack.

Each ```bash block runs with `bash -euo pipefail`, in document order (later examples use what
earlier ones created), against a stack that holds what `make run` makes (demo partner 123,
customer123), in a scratch directory laid out like the checkout after it (`.venv`,
`var/demo.env`), with API_KEY and API_SECRET exported, DATABASE_URL naming the stack's database
and make run's ports (127.0.0.1:8080 REST, 127.0.0.1:50051 gRPC) rewritten to the stack's. What a
block documents, in a comment of its own:

- `# → 200` (any HTTP status): every curl in the block answered that status;
- `# → streams until Ctrl-C`: it is interrupted once it has printed what the doc shows;
- no annotation: every command exits 0 (a block with a curl must name its status).

The fenced block right after it, when only blank lines lie between, is what it prints: JSON values
(```json: the same keys, and the same values but for timestamps, ids, cursors and tokens; a string
ending in "…" matches any string it begins, a last list item "…" any further items, a line "…"
any further values), a reply with its headers (```http), or lines that appear in order (```text).
"""

from __future__ import annotations

import json
import os
import re
import select
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.support import REPO
from tests.support.rest import Stack, start_stack

pytestmark = pytest.mark.envoy

DOCS = (REPO / "docs" / "api.md", REPO / "docs" / "operations.md")
REST, GRPC = "127.0.0.1:8080", "127.0.0.1:50051"  # make run's, as the examples show them
STREAM = "streams until Ctrl-C"
MORE = "…"
ANNOTATION = re.compile(r"(?:^|\s)#\s*→\s*(.+?)\s*$")
FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
HEADING = re.compile(r"^#{1,6}\s+(.+)$")
# curl appends this after each reply (CURL_HOME/.curlrc), so the runner reads every status.
WRITE_OUT = "\\n@@ %{http_code} @@\\n"
STATUS_MARK = re.compile(r"\n?@@ (\d{3}) @@\n")
# Values that differ from run to run; their type is still checked.
VARYING = frozenset(
    {
        "changed_at",
        "updated_at",
        "generated_at",
        "cursor",
        "request_id",
        "next_page_token",
        "api_key",
        "api_secret",
        "webhook_secret",
        "secret",
        "id",
        "created_at",
        "from",
        "to",
        "revision",
        "event_id",
        "endpoint_id",
        "last_attempt_at",
        "next_attempt_at",
        "delivered_at",
        "failing_since",
    }
)


@dataclass(frozen=True)
class Example:
    doc: str
    heading: str
    line: int  # of the ```bash fence
    script: str
    shown_lang: str | None  # the fenced block right after it, if any
    shown: str | None

    @property
    def outcome(self) -> str | None:
        """The `# → …` annotation."""
        found = [m[1] for m in map(ANNOTATION.search, self.script.splitlines()) if m]
        assert len(found) <= 1, f"{self.id}: one `# →` annotation at most"
        return found[0] if found else None

    @property
    def id(self) -> str:
        title = re.sub(r"[^A-Za-z0-9/._-]+", "-", self.heading.split(" — ")[0]).strip("-")
        return f"{self.doc}:{self.line}:{title}"

    def code(self) -> list[str]:
        """The script's lines without their comments."""
        return [re.sub(r"(^|\s)#.*$", "", line) for line in self.script.splitlines()]


def fenced_blocks(text: str) -> list[tuple[int, int, str, str, str]]:
    """(first line, last line, language, body, heading above) of each fenced block."""
    blocks = []
    lines = text.splitlines()
    heading, index = "", 0
    while index < len(lines):
        if found := HEADING.match(lines[index]):
            heading = found[1].replace("`", "")
        fence = FENCE.match(lines[index])
        if fence is None:
            index += 1
            continue
        indent, start = len(fence[1]), index
        index += 1
        body = []
        while not re.match(r"^\s*```\s*$", lines[index]):
            body.append(lines[index][indent:])
            index += 1
        blocks.append((start, index, fence[2], "\n".join(body) + "\n", heading))
        index += 1
    return blocks


def examples(path: Path) -> list[Example]:
    lines = path.read_text().splitlines()
    blocks = fenced_blocks(path.read_text())
    found = []
    for number, (start, end, lang, body, heading) in enumerate(blocks):
        if lang != "bash":
            continue
        after = blocks[number + 1] if number + 1 < len(blocks) else None
        adjacent = after is not None and not any(line.strip() for line in lines[end + 1 : after[0]])
        shown_lang, shown = (after[2], after[3]) if after is not None and adjacent else (None, None)
        found.append(Example(path.name, heading, start + 1, body, shown_lang, shown))
    return found


EXAMPLES = [example for doc in DOCS for example in examples(doc)]


def json_values(text: str, *, partial: bool = False) -> tuple[list[Any], bool]:
    """The JSON values in `text`, one after another, and whether a line "…" says that more may
    follow. `partial`: stop at an unfinished last value (a stream being read)."""
    decoder = json.JSONDecoder()
    values: list[Any] = []
    more, position = False, 0
    while True:
        while position < len(text) and text[position].isspace():
            position += 1
        if position == len(text):
            return values, more
        if text.startswith(MORE, position):
            more, position = True, position + len(MORE)
            continue
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            if partial:
                return values, more
            raise
        values.append(value)


def mismatches(shown: Any, actual: Any, path: str = "$") -> list[str]:
    """How `actual` differs from what the doc shows (see the module's docstring)."""
    if isinstance(shown, str) and shown.endswith(MORE):
        if isinstance(actual, str) and actual.startswith(shown[: -len(MORE)]):
            return []
        return [f"{path}: {actual!r} is not {shown!r}"]
    if isinstance(shown, dict):
        if not isinstance(actual, dict):
            return [f"{path}: {actual!r} is not an object"]
        if set(shown) != set(actual):
            return [f"{path}: keys {sorted(actual)}, the doc shows {sorted(shown)}"]
        problems = []
        for key, value in shown.items():
            if key in VARYING:
                if type(actual[key]) is not type(value):
                    problems.append(f"{path}.{key}: {actual[key]!r} is not like {value!r}")
            else:
                problems += mismatches(value, actual[key], f"{path}.{key}")
        return problems
    if isinstance(shown, list):
        if not isinstance(actual, list):
            return [f"{path}: {actual!r} is not a list"]
        more = bool(shown) and shown[-1] == MORE
        items = shown[:-1] if more else shown
        if len(actual) < len(items) or (not more and len(actual) != len(items)):
            return [f"{path}: {len(actual)} items, the doc shows {len(items)}"]
        return [
            problem
            for index, (item, got) in enumerate(zip(items, actual, strict=False))
            for problem in mismatches(item, got, f"{path}[{index}]")
        ]
    if type(shown) is not type(actual) or shown != actual:
        return [f"{path}: {actual!r}, the doc shows {shown!r}"]
    return []


def json_mismatches(shown: str, printed: str) -> list[str]:
    expected, more = json_values(shown)
    try:
        actual, _ = json_values(printed)
    except json.JSONDecodeError as exc:
        return [f"it printed no JSON ({exc})"]
    return mismatches([*expected, MORE] if more else expected, actual, "printed")


def http_mismatches(shown: str, printed: str) -> list[str]:
    """A reply printed by `curl -i`: the status line, the headers shown, the body."""
    shown_head, _, shown_body = shown.partition("\n\n")
    head, _, body = printed.replace("\r\n", "\n").partition("\n\n")
    status, *headers = shown_head.splitlines()
    actual_status, *actual_headers = head.splitlines()
    problems = [] if status == actual_status else [f"status line {actual_status!r}"]
    present = {line.lower() for line in actual_headers}
    problems += [
        f"no header {line!r}" for line in headers if line != MORE and line.lower() not in present
    ]
    return problems + json_mismatches(shown_body, body)


def text_mismatches(shown: str, printed: str) -> list[str]:
    lines = iter(printed.splitlines())
    return [
        f"no line {line!r} (in this order)"
        for line in shown.splitlines()
        if line != MORE and line not in lines
    ]


@dataclass
class Ran:
    returncode: int
    stdout: str  # without curl's status marks
    stderr: str
    statuses: list[int]


class DocRun:
    """Runs the examples in document order, each once, on one stack."""

    def __init__(self, stack: Stack, tmp: Path) -> None:
        self.stack = stack
        # As `make run` names its demo partner (the examples list it).
        stack.sql("UPDATE partners SET name = 'Demo Partner' WHERE partner_id = '123'")
        self.cwd = tmp / "checkout"
        (self.cwd / "var").mkdir(parents=True)
        (self.cwd / ".venv").symlink_to(REPO / ".venv")
        key, secret = stack.partner.api_key, stack.partner.api_secret
        (self.cwd / "var" / "demo.env").write_text(  # as `make run` writes it
            f"export API_KEY={shlex.quote(key)} API_SECRET={shlex.quote(secret)}\n"
        )
        curl_home = tmp / "curl"
        curl_home.mkdir()
        (curl_home / ".curlrc").write_text(f'write-out = "{WRITE_OUT}"\n')
        self.env = {
            **os.environ,
            "PATH": f"{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}",
            "API_KEY": key,
            "API_SECRET": secret,
            "DATABASE_URL": stack.database_url,
            "CURL_HOME": str(curl_home),
        }
        self.results: list[Ran] = []

    def result(self, example: Example) -> Ran:
        """`example`'s run, after every example before it has run."""
        index = EXAMPLES.index(example)
        while len(self.results) <= index:
            self.results.append(self._run(EXAMPLES[len(self.results)]))
        return self.results[index]

    def _run(self, example: Example) -> Ran:
        script = example.script.replace(REST, f"127.0.0.1:{self.stack.envoy.http_port}")
        script = script.replace(GRPC, f"127.0.0.1:{self.stack.server.port}")
        argv = ["bash", "-euo", "pipefail", "-c", script]
        if example.outcome == STREAM:
            return self._stream(argv, example)
        done = subprocess.run(
            argv, cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=120
        )
        return _ran(done.returncode, done.stdout, done.stderr)

    def _stream(self, argv: list[str], example: Example) -> Ran:
        """Read until it has printed as many values as the doc shows (bounded), then Ctrl-C."""
        assert example.shown is not None, f"{example.id}: show what the stream prints"
        wanted = len(json_values(example.shown)[0])
        process = subprocess.Popen(
            argv, cwd=self.cwd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True,
        )  # fmt: skip
        assert process.stdout is not None
        printed = b""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            text = printed.decode(errors="ignore")
            if len(json_values(text, partial=True)[0]) >= wanted:
                break
            if select.select([process.stdout], [], [], 1.0)[0]:
                chunk = os.read(process.stdout.fileno(), 65536)
                if not chunk:
                    break
                printed += chunk
        os.killpg(process.pid, signal.SIGINT)
        rest, stderr = process.communicate(timeout=30)
        return _ran(0, (printed + rest).decode(), stderr.decode())


def _ran(returncode: int, stdout: str, stderr: str) -> Ran:
    statuses = [int(code) for code in STATUS_MARK.findall(stdout)]
    return Ran(returncode, STATUS_MARK.sub("\n", stdout), stderr, statuses)


@pytest.fixture(scope="module")
def doc_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DocRun]:
    tmp = tmp_path_factory.mktemp("doc-examples")
    # As `make run` starts it: webhook URLs on the loopback are accepted, and a worker delivers.
    env = {"WEBHOOK_ALLOW_PRIVATE_URLS": "true"}
    for stack in start_stack(tmp, server_env=env, webhook_workers=1):
        yield DocRun(stack, tmp)


@pytest.mark.parametrize("example", EXAMPLES, ids=[example.id for example in EXAMPLES])
def test_example_runs_as_pasted_with_its_documented_outcome(
    doc_run: DocRun, example: Example
) -> None:
    ran = doc_run.result(example)
    said = f"\n--- stdout:\n{ran.stdout}\n--- stderr:\n{ran.stderr}"
    outcome = example.outcome
    if outcome is not None and re.fullmatch(r"\d{3}", outcome):
        assert ran.returncode == 0, said
        assert ran.statuses, f"no curl in a block annotated with a status{said}"
        assert set(ran.statuses) == {int(outcome)}, f"statuses {ran.statuses}{said}"
    elif outcome is None:
        assert ran.returncode == 0, said
        assert not ran.statuses, f"a curl example says its status (`# → 200`){said}"
    else:
        assert outcome == STREAM, f"unknown annotation {outcome!r}"
    if example.shown is None:
        return
    compare = {"json": json_mismatches, "http": http_mismatches, "text": text_mismatches}
    assert example.shown_lang in compare, f"output shown as ```{example.shown_lang}"
    problems = compare[example.shown_lang](example.shown, ran.stdout)
    assert not problems, "\n".join(problems) + said


def test_the_examples_hold_nothing_to_fill_in_by_hand() -> None:
    """No `[--optional flag]`, no `…` body, no pasted-in key: the traps of issue 14."""
    for example in EXAMPLES:
        for line in example.code():
            assert "[--" not in line, f"{example.id}: brackets cannot be pasted: {line}"
            assert MORE not in line, f"{example.id}: a placeholder cannot be pasted: {line}"
            assert not re.search(r"\b(dk|ds)_", line), f"{example.id}: use $API_KEY: {line}"
    assert any("--rate-limit-per-minute 600" in e.script for e in EXAMPLES)


def _only(word: str) -> Example:
    [example] = [example for example in EXAMPLES if word in example.script]
    return example


def test_the_summary_example_asks_about_a_window_that_includes_now(doc_run: DocRun) -> None:
    example = _only("disposition-summary")
    [reply], _ = json_values(doc_run.result(example).stdout)
    window = reply["data"]
    now = datetime.now(UTC)
    assert datetime.fromisoformat(window["from"]) <= now
    assert window["to"] == "" or datetime.fromisoformat(window["to"]) > now
    assert window["total_changes"] > 0  # the examples' own changes are counted


def test_the_feed_example_shows_what_grpcurl_prints(doc_run: DocRun) -> None:
    """grpcurl leaves out default values (proto3 JSON): the first reply, cursor 0, prints as {}
    and an empty previous_status is not printed at all."""
    example = _only("WatchDispositionChanges")
    assert example.shown is not None
    printed, _ = json_values(doc_run.result(example).stdout)
    shown, _ = json_values(example.shown)
    assert printed[0] == shown[0] == {}
    first_change = printed[1]["changes"][0]
    assert "previous_status" not in first_change
    assert "previous_status" not in shown[1]["changes"][0]


def test_after_every_example_the_demo_partner_still_works(doc_run: DocRun) -> None:
    for example in EXAMPLES:
        doc_run.result(example)
    reply = doc_run.stack.put({"customer_id": "customer123", "disposition_status": "anything"})
    assert (reply.status, reply.body) == (200, b'{"success":true}')
