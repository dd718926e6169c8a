"""The docs page (GET /docs): Swagger UI over the OpenAPI document, served by Envoy from build/docs/
(make gen), rendered in headless Chromium, its try-it-out calling the service on the same origin."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, Page, Request, Response, expect, sync_playwright

from gateway.envoy_config import DEFAULT_DESCRIPTOR, DOCS_FILES
from tests.support.http_client import call
from tests.support.rest import UPDATE, Stack, start_stack
from tests.support.tools import DebianTool

pytestmark = pytest.mark.envoy

BUILD = Path(DEFAULT_DESCRIPTOR).parent
DOCS = BUILD / "docs"
CHROMIUM = DebianTool("chromium", "chromium")
CHROMIUM_PATH = "/usr/bin/chromium"
# Nothing but the page: no network of its own (the machine has none), no GPU, no sandbox (root).
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
CONTENT_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "swagger-initializer.js": "text/javascript; charset=utf-8",
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon-32x32.png": "image/png",
}
METHOD_NOT_ALLOWED = {"success": False, "message": "Method not allowed"}
NOT_FOUND = {"success": False, "message": "Not found"}

Operation = tuple[str, str, str, str]  # method, path, operationId, tag


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from start_stack(tmp_path_factory.mktemp("docs-page"))


def _url(name: str) -> str:
    return "/docs/" if name == "index.html" else f"/docs/{name}"


def test_every_file_of_the_page_is_served_as_built(stack: Stack) -> None:
    built = {path.name for path in DOCS.iterdir()} - {".built"}
    assert built == set(DOCS_FILES) == set(CONTENT_TYPES), "run `make gen`"
    for name in DOCS_FILES:
        reply = call(stack.envoy.http_port, "GET", _url(name), None, {})  # no credentials
        assert reply.status == 200, (name, reply.body[:200])
        assert reply.body == (DOCS / name).read_bytes(), f"{name} was changed on the way"
        assert reply.header("content-type") == CONTENT_TYPES[name]
        assert reply.header("cache-control") == "public, max-age=300"
    for path in ("/docs", "/docs?filter=webhook"):
        page = call(stack.envoy.http_port, "GET", path, None, {})
        assert (page.status, page.body) == (200, (DOCS / "index.html").read_bytes())
        assert "default-src 'self'" in (page.header("content-security-policy") or "")


def test_other_methods_get_405_and_other_files_404(stack: Stack) -> None:
    for path in ("/docs", "/docs/", *(_url(name) for name in DOCS_FILES)):
        for method in ("POST", "DELETE"):
            reply = call(stack.envoy.http_port, method, path, b"{}")
            assert (reply.status, reply.header("allow")) == (405, "GET"), (method, path)
            assert json.loads(reply.body) == METHOD_NOT_ALLOWED
    for path in ("/docs/swagger-ui.js", "/docs/index.html", "/docs/x/", "/docsx"):
        reply = call(stack.envoy.http_port, "GET", path)
        assert (reply.status, json.loads(reply.body)) == (404, NOT_FOUND), path


def _documented() -> list[Operation]:
    document: dict[str, Any] = json.loads((BUILD / "openapi.json").read_text())
    return sorted(
        (verb.upper(), path, operation["operationId"], operation["tags"][0])
        for path, operations in document["paths"].items()
        for verb, operation in operations.items()
    )


@dataclass
class DocsPage:
    """The page in a browser tab, and what the tab fetched and complained about meanwhile."""

    page: Page
    origin: str
    requests: list[Request] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def listed(self) -> list[Operation]:
        """Every operation the page shows, as (method, path, operationId, tag)."""
        listed = []
        for section in self.page.locator(".opblock-tag-section").all():
            tag = section.locator(".opblock-tag").get_attribute("data-tag") or ""
            for block in section.locator(".opblock").all():
                method = block.locator(".opblock-summary-method").inner_text()
                path = block.locator(".opblock-summary-path").get_attribute("data-path") or ""
                operation_id = block.locator(".opblock-summary-operation-id").inner_text()
                listed.append((method, path, operation_id, tag))
        return sorted(listed)

    def assert_self_contained(self) -> None:
        """Everything came from this origin (no CDN, no CORS preflight), and nothing failed."""
        origins = {urlsplit(r.url).netloc for r in self.requests if r.url.startswith("http")}
        assert origins == {urlsplit(self.origin).netloc}
        assert [r.url for r in self.requests if r.method == "OPTIONS"] == []
        assert self.problems == []


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM_PATH, args=CHROMIUM_ARGS, headless=True
        )
        yield chromium
        chromium.close()


@pytest.fixture
def docs(browser: Browser, stack: Stack, tmp_path: Path) -> Iterator[DocsPage]:
    """/docs loaded in a fresh tab (its own storage), with its operations rendered; a screenshot
    of what it shows in the end is left in the test's tmp_path."""
    context = browser.new_context(viewport={"width": 1280, "height": 2000})
    page = context.new_page()
    page.set_default_timeout(15_000)
    docs = DocsPage(page, f"http://127.0.0.1:{stack.envoy.http_port}")
    page.on("request", lambda request: docs.requests.append(request))
    page.on("requestfailed", lambda r: docs.problems.append(f"failed: {r.url} {r.failure}"))
    page.on("pageerror", lambda error: docs.problems.append(f"page error: {error}"))
    page.on("console", lambda m: docs.problems.extend([m.text] if m.type == "error" else []))
    try:
        loaded = page.goto(f"{docs.origin}/docs")
        assert loaded is not None and loaded.status == 200
        assert loaded.headers["content-type"] == CONTENT_TYPES["index.html"], loaded.text()
        page.locator(".opblock").first.wait_for()
        yield docs
    finally:
        page.screenshot(path=str(tmp_path / "docs-page.png"))
        context.close()


@CHROMIUM.installed
def test_the_page_lists_every_operation_of_the_document(docs: DocsPage) -> None:
    operations = _documented()
    assert len(operations) >= 14
    assert docs.page.locator(".info .title").inner_text().startswith("Disposition service")
    assert docs.listed() == operations
    docs.assert_self_contained()


@CHROMIUM.installed
def test_the_search_box_filters_by_tag_or_path(docs: DocsPage) -> None:
    operations = _documented()
    search = docs.page.locator("input.operation-filter-input")
    blocks = docs.page.locator(".opblock")
    search.fill("webhook-endpoints")
    webhooks = [operation for operation in operations if "webhook-endpoints" in operation[1]]
    expect(blocks).to_have_count(len(webhooks))
    assert docs.listed() == webhooks
    search.fill("CallIngestion")
    expect(blocks).to_have_count(1)
    assert [operation[2] for operation in docs.listed()] == ["IngestBatchCalls"]
    search.fill("")
    expect(blocks).to_have_count(len(operations))
    docs.assert_self_contained()


@CHROMIUM.installed
def test_try_it_out_updates_a_status_through_envoy(docs: DocsPage, stack: Stack) -> None:
    _authorize(docs.page, stack)
    body = {"customer_id": "customer123", "disposition_status": "tried_from_docs"}
    reply = _try_it_out(docs.page, stack, ("PUT", UPDATE), body)
    # What Chromium sent (headers as Swagger UI set them) reached the service via the transcoder.
    request = reply.request
    sent = request.all_headers()
    assert (request.method, request.url) == ("PUT", f"{docs.origin}{UPDATE}")
    assert sent["content-type"] == "application/json"
    assert sent["accept"] in {"*/*", "application/json"}  # Swagger UI's; the transcoder ignores it
    assert (sent["x-api-key"], sent["x-api-secret"]) == (
        stack.partner.api_key,
        stack.partner.api_secret,
    )
    assert (sent["x-tenant-id"], sent["x-sub-tenant-id"]) == ("tenant1", "subtenant1")
    assert json.loads(request.post_data or "") == body
    assert (reply.status, reply.json()) == (200, {"success": True})
    request_id = reply.headers["x-request-id"]
    docs.assert_self_contained()
    # The server has it: the status reads back, and the history row is this request's.
    status = stack.request("GET", "/api/v1/partner/customers/customer123/disposition-status")
    assert status.status == 200, status.body
    assert json.loads(status.body)["data"]["disposition_status"] == "tried_from_docs"
    *_, (previous, new, _source, recorded_request_id) = stack.history("customer123")
    assert (previous, new, recorded_request_id) == (None, "tried_from_docs", request_id)


def _authorize(page: Page, stack: Stack) -> None:
    """The Authorize dialog: the partner's key and secret (the document's two API key schemes)."""
    page.locator(".auth-wrapper .btn.authorize").click()
    credentials = {"ApiKey": stack.partner.api_key, "ApiSecret": stack.partner.api_secret}
    for scheme, value in credentials.items():
        form = page.locator(".modal-ux form", has=page.locator(f'h4 > code:text-is("{scheme}")'))
        form.locator("input").fill(value)
        form.locator(".btn.modal-btn.auth.authorize").click()
        expect(form.locator("h6")).to_have_text("Authorized")
    page.locator(".modal-ux .btn.modal-btn.auth.btn-done").first.click()
    page.locator(".auth-wrapper .btn.authorize.locked").wait_for()


def _try_it_out(
    page: Page, stack: Stack, operation: tuple[str, str], body: dict[str, Any]
) -> Response:
    """Try it out on `operation` (method, path): the tenant headers and `body` filled in,
    executed; checks that the page shows a 200 and the success body; the reply Chromium got."""
    (tag, operation_id), *_ = [(op[3], op[2]) for op in _documented() if op[:2] == operation]
    block = page.locator(f"#operations-{tag}-{operation_id}")
    block.locator(".opblock-summary-control").click()
    block.locator(".try-out__btn").click()
    block.locator('tr[data-param-name="x-tenant-id"] input').fill(stack.partner.tenant_id)
    block.locator('tr[data-param-name="x-sub-tenant-id"] input').fill(stack.partner.sub_tenant_id)
    block.locator("textarea.body-param__text").fill(json.dumps(body))
    with page.expect_response(lambda r: r.url.endswith(operation[1])) as response:
        block.locator(".btn.execute").click()
    shown = block.locator(".live-responses-table .response")
    expect(shown.locator(".response-col_status")).to_have_text("200")
    shown_body = shown.locator(".response-col_description pre").first.inner_text()
    assert json.loads(shown_body) == {"success": True}
    shown.scroll_into_view_if_needed()  # for the screenshot
    return response.value
