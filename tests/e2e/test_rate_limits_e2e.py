"""Rate limits over HTTP against real servers: the N+1-th request of a window gets 429 with Retry-After and
OpenAI's x-ratelimit-* headers; with the Redis backend two server processes share one limit."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest

from tests.e2e.conftest import MODEL, Platform
from tests.platform.conftest import REDIS_URL, redis_unavailable
from tests.serving.server_process import ServerProcess

pytestmark = pytest.mark.slow

RPM = 3
BODY = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi."}]}


def _start_of_a_window(margin_s: float = 8.0) -> None:
    """Windows are fixed minutes: a burst that starts late in one could straddle two and see two budgets."""
    into_window_s = time.time() % 60
    if into_window_s > 60 - margin_s:
        time.sleep(60 - into_window_s + 0.2)


def _chat(server: ServerProcess, key: str) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/chat/completions", json=BODY, headers={"Authorization": f"Bearer {key}"}, timeout=60
    )


def test_the_request_after_the_limit_gets_429_with_retry_after(
    sqlite_platform: Platform, servers: Callable[[ServerProcess], ServerProcess]
) -> None:
    key = sqlite_platform.account(None, "--rpm", str(RPM), tier="default")
    server = servers(sqlite_platform.server())
    _start_of_a_window()
    allowed = [_chat(server, key) for _ in range(RPM)]
    assert [r.status_code for r in allowed] == [200] * RPM
    assert [r.headers["x-ratelimit-remaining-requests"] for r in allowed] == ["2", "1", "0"]
    assert {r.headers["x-ratelimit-limit-requests"] for r in allowed} == {str(RPM)}
    refused = _chat(server, key)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    other_key = sqlite_platform.account(None, "--rpm", str(RPM), tier="default")
    assert _chat(server, other_key).status_code == 200  # limits are per key


def test_two_servers_share_one_limit_through_redis(
    sqlite_platform: Platform, servers: Callable[[ServerProcess], ServerProcess]
) -> None:
    reason = redis_unavailable()
    if reason:
        pytest.skip(reason)
    key = sqlite_platform.account(None, "--rpm", str(RPM), tier="default")
    first = sqlite_platform.server("--redis-url", REDIS_URL, name="first")
    second = sqlite_platform.server("--redis-url", REDIS_URL, name="second")
    servers(first)
    servers(second)  # same database and data dir, its own port and so its own gateway id
    _start_of_a_window()
    statuses = [_chat(server, key).status_code for server in (first, second, first)]
    assert statuses == [200, 200, 200]
    for server in (second, first):
        refused = _chat(server, key)
        assert refused.status_code == 429 and "retry-after" in refused.headers
