"""The console in a real browser: one `tokenmill serve --config models.yaml --signup invite` process for the
whole package (two tiny chat models, one free from the platform and one paid from the provider "acme",
and the real MiniLM embedding model), Debian's Chromium driven headless by Playwright, and per test a
fresh browser context that fails the test on any console error, page error or failed request it did not
expect, and leaves a screenshot under test-artifacts/console/."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.serving.server_process import ServerProcess
from tests.tiny_models import build_tiny_model

playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (make test does)")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ARTIFACTS = Path(__file__).parents[2] / "test-artifacts" / "console"
AXE = Path(__file__).parent / "vendor" / "axe-core" / "axe.min.js"

FREE_MODEL = "tiny-chat"
PAID_MODEL = "acme/tiny-pro"
EMBEDDING_MODEL = "all-MiniLM-L6-v2"
PROVIDER_ORG = "acme"
XSS_PAYLOAD = '<script>window.__xss = 1</script><img src="x" onerror="window.__xss = 2">'
"""In the paid model's description: the console must show it as text and run none of it."""
PASSWORD = "correct horse battery staple"
CONTEXT_LENGTH = 4096


def _models_yaml(model_dir: Path) -> dict[str, Any]:
    engine = {
        "dtype": "float32",
        "max_model_len": CONTEXT_LENGTH,
        "kv_cache_memory": "16M",
        "max_num_seqs": 8,
    }
    return {
        "models": [
            {
                "id": FREE_MODEL, "source": str(model_dir), "pinned": True, "engine": engine,
                "listing": {
                    "display_name": "Tiny Chat", "description": "A small random-weight Llama for trying things.",
                    "tags": ["chat", "tiny"], "license": "apache-2.0", "price": "free",
                },
            },
            {
                "id": PAID_MODEL, "source": str(model_dir), "pinned": True, "engine": engine,
                "listing": {
                    "display_name": "Acme Tiny Pro", "description": f"Fast drafts. {XSS_PAYLOAD}",
                    "provider": PROVIDER_ORG, "tags": ["chat", "pro"], "license": "apache-2.0",
                    "price": {"input": "0.500000", "output": "1.500000"},
                },
            },
            {
                "id": EMBEDDING_MODEL, "source": "all-MiniLM-L6-v2", "task": "embedding", "pinned": True,
                "listing": {
                    "display_name": "MiniLM sentence embeddings", "description": "384 dimensions.",
                    "tags": ["embedding", "search"], "license": "apache-2.0", "price": "free",
                },
            },
            {
                # A draft of acme's that test_provider_admin publishes and then retires in the browser;
                # unpinned, so it costs no load at startup (the square lists it without serving it).
                "id": "acme/tiny-draft", "source": str(model_dir), "engine": engine,
                "listing": {
                    "display_name": "Acme Tiny Draft", "description": "Made to be published, then retired.",
                    "provider": PROVIDER_ORG, "tags": ["chat", "draft"], "license": "apache-2.0",
                    "price": "free", "status": "draft",
                },
            },
        ]
    }  # fmt: skip


@dataclass
class ConsoleServer:
    server: ServerProcess
    admin_key: str

    @property
    def url(self) -> str:
        return self.server.url

    def api(self, method: str, path: str, key: str | None = None, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key or self.admin_key}"}
        return httpx.request(method, f"{self.url}{path}", headers=headers, timeout=60, **kwargs)

    def admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        response = self.api(method, f"/v1/admin{path}", json=body)
        assert response.status_code in (200, 201), f"{method} {path}: {response.status_code} {response.text}"
        return response.json()

    def invite(self) -> str:
        return self.admin("POST", "/invites", {"note": "browser test"})["code"]

    def sign_up(self, email: str | None = None, organization: str | None = None) -> str:
        """A new user through the public sign-up API (with an invite); returns the email."""
        email = email or f"dev-{secrets.token_hex(4)}@example.com"
        body = {"email": email, "password": PASSWORD, "name": "Dev", "invite_code": self.invite()}
        if organization:
            body["organization"] = organization
        response = httpx.post(f"{self.url}/v1/auth/signup", json=body, timeout=60)
        assert response.status_code == 201, response.text
        return email


@pytest.fixture(scope="package")
def console_server(
    tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer: Any
) -> Iterator[ConsoleServer]:
    work = tmp_path_factory.mktemp("console")
    # A long context, so that a reply the playground stops is still being generated when Stop arrives.
    model_dir = build_tiny_model(
        "llama", work / "tiny-llama", smollm2_tokenizer, max_position_embeddings=CONTEXT_LENGTH
    )
    config = work / "models.yaml"
    config.write_text(yaml.safe_dump(_models_yaml(model_dir), sort_keys=False))
    args = ["--config", str(config), "--signup", "invite", "--database-url", f"sqlite:///{work / 'tm.db'}"]
    server = ServerProcess(args, work / "serve.log", data_dir=work / "data").start(timeout_s=180)
    try:
        yield ConsoleServer(server, (work / "data" / "admin_key").read_text().strip())
    finally:
        server.stop()


@pytest.fixture(scope="package")
def browser() -> Iterator[Any]:
    """Package-scoped, not session-scoped: Playwright's sync API keeps an event loop of its own in this thread
    while it runs, and the asyncio tests of later packages must not start beside it."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (make test does)")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@dataclass
class Watch:
    """What went wrong in the page: console errors, uncaught exceptions, failed or 4xx/5xx requests. A test
    that provokes an error on purpose says so with `expect(status)` first."""

    problems: list[str] = field(default_factory=list)
    expected_statuses: set[int] = field(default_factory=set)

    def expect(self, *statuses: int) -> None:
        self.expected_statuses.update(statuses)

    def on_console(self, message: Any) -> None:
        if message.type != "error":
            return
        # Chromium logs every 4xx/5xx response as a console error too; those are judged by status below.
        if re.match(r"Failed to load resource: the server responded with a status of (\d+)", message.text):
            return
        self.problems.append(f"console error: {message.text}")

    def on_response(self, response: Any) -> None:
        if response.status >= 400 and response.status not in self.expected_statuses:
            self.problems.append(f"HTTP {response.status} {response.request.method} {response.url}")

    def on_request_failed(self, request: Any) -> None:
        failure = request.failure or ""
        if "ERR_ABORTED" in failure:
            return  # the page cancelled it: a stopped stream, or a page left while it loaded
        self.problems.append(f"request failed: {request.method} {request.url} {failure}")


@dataclass
class ConsolePage:
    page: Any
    watch: Watch
    server: ConsoleServer

    def open(self, route: str = "") -> None:
        self.page.goto(f"{self.server.url}/#/{route}")

    def sign_in(self, email: str) -> None:
        """Through the API from inside the browser context: the cookie lands where the page will use it."""
        response = self.page.request.post(
            f"{self.server.url}/v1/auth/login", data={"email": email, "password": PASSWORD}
        )
        assert response.status == 200, response.text()

    def sign_in_as_admin(self) -> None:
        response = self.page.request.post(
            f"{self.server.url}/v1/auth/login", data={"api_key": self.server.admin_key}
        )
        assert response.status == 200, response.text()

    def axe_violations(self) -> list[dict[str, Any]]:
        """axe-core's serious and critical findings on the page as it is now."""
        self.page.evaluate(f"() => {{ {AXE.read_text()}\n }}")
        result = self.page.evaluate(
            "async () => (await axe.run(document, {resultTypes: ['violations']})).violations"
            ".map(v => ({id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.map(n => n.target.join(' '))}))"
        )
        return [v for v in result if v["impact"] in ("serious", "critical")]


@pytest.fixture
def console(
    request: pytest.FixtureRequest, browser: Any, console_server: ConsoleServer
) -> Iterator[ConsolePage]:
    viewport = getattr(request, "param", {"width": 1280, "height": 860})
    context = browser.new_context(viewport=viewport, locale="en-US", color_scheme="light")
    context.set_default_timeout(20_000)
    page = context.new_page()
    watch = Watch()
    page.on("console", watch.on_console)
    page.on("pageerror", lambda error: watch.problems.append(f"page error: {error}"))
    page.on("response", watch.on_response)
    page.on("requestfailed", watch.on_request_failed)
    try:
        yield ConsolePage(page, watch, console_server)
    finally:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
        page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
        context.close()
    assert not watch.problems, "\n".join(watch.problems)
