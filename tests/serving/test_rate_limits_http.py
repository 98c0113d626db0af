"""Rate limits through a live server (real sockets, requests held in flight by an endless FakeEngine): a new
organization's key serves a team's concurrent SDK calls to a free model, a key's own concurrency limit is
exact, `unlimited` is unlimited, `tokenmill admin set-tier-limits` applies from the next request, and every
429 says which limit refused: with Retry-After when waiting helps, without when the request can never fit."""

from __future__ import annotations

import io
import re
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, redirect_stderr, redirect_stdout
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.platform.helpers import Account, make_account
from tests.serving.conftest import LiveServer
from tests.serving.fake_engine import FakeEngine
from tokenmill import cli
from tokenmill.platform.gateway import Gateway
from tokenmill.platform.pricing import set_model_price
from tokenmill.serving.app import create_app
from tokenmill.serving.settings import ServerSettings

USER = [{"role": "user", "content": "Tell me something."}]
STREAM = {"model": "fake-chat", "messages": USER, "max_tokens": 500, "stream": True}
"""The engine never ends a reply by itself: each such stream stays in flight until its client closes it."""


def _poll(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def _admin(gateway: Gateway, *args: str) -> str:
    """`tokenmill admin ...` on the gateway's database, in this process, as the operator would run it."""
    url = gateway.db.url.render_as_string(hide_password=False)
    argv = ["admin", *args, "--data-dir", str(gateway.settings.data_dir), "--database-url", url]
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        assert cli.main(argv) == 0, err.getvalue()
    return out.getvalue()


class Streams:
    """Streaming chat requests opened one after another and held open, so all are in flight at once."""

    def __init__(self, url: str, engine: FakeEngine, stack: ExitStack) -> None:
        self.url = url
        self.engine = engine
        self.http = stack.enter_context(httpx.Client(timeout=30, limits=httpx.Limits(max_connections=200)))
        self.open: list[httpx.Response] = []
        stack.callback(self.close)

    def start(self, account: Account) -> httpx.Response:
        """-> the response, once its status is known: a 200 stays open (generating), a refusal is read."""
        headers = {"Authorization": f"Bearer {account.key.key}"}
        request = self.http.build_request(
            "POST", f"{self.url}/v1/chat/completions", json=STREAM, headers=headers
        )
        response = self.http.send(request, stream=True)
        if response.status_code == 200:
            self.open.append(response)
        else:
            response.read()
            response.close()
        return response

    def start_many(self, account: Account, num_requests: int) -> list[int]:
        statuses = [self.start(account).status_code for _ in range(num_requests)]
        _poll(lambda: len(self.engine.running) == len(self.open))  # all of them generating together
        return statuses

    def close(self) -> None:
        for response in self.open:
            response.close()  # the server sees the disconnect, aborts and settles
        self.open.clear()
        _poll(lambda: not self.engine.running)


@pytest.fixture
def streams(fake_engine: FakeEngine, gateway: Gateway) -> Iterator[Streams]:
    gateway.register_models(["fake-chat"])  # free, as every served model without a price
    fake_engine.endless, fake_engine.step_delay_s = True, 0.05
    with ExitStack() as stack:
        live = stack.enter_context(
            LiveServer(create_app({"fake-chat": fake_engine}, {}, ServerSettings(), gateway))
        )
        _poll(lambda: httpx.get(f"{live.url}/ready").status_code == 200)
        yield Streams(live.url, fake_engine, stack)


def _refusal(response: httpx.Response, status: int = 429, code: str = "rate_limit_exceeded") -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    return error["message"]


def test_a_new_organizations_key_serves_16_concurrent_requests_to_a_free_model(
    streams: Streams, gateway: Gateway
) -> None:
    account = make_account(gateway.db)  # a new organization, on the default tier
    assert streams.start_many(account, 16) == [200] * 16


def test_a_keys_own_concurrency_limit_is_exact(streams: Streams, gateway: Gateway) -> None:
    account = make_account(gateway.db, max_concurrent_requests=3)
    assert streams.start_many(account, 3) == [200] * 3
    refused = streams.start(account)
    message = _refusal(refused)
    assert (
        message
        == "Too many concurrent requests: this API key's limit of 3 concurrent requests for free models."
    )
    assert refused.headers["retry-after"] == "1"  # a slot frees when a request ends
    assert len(streams.engine.running) == 3


def test_a_key_on_the_unlimited_tier_is_never_limited(streams: Streams, gateway: Gateway) -> None:
    account = make_account(gateway.db, tier="unlimited")
    assert streams.start_many(account, 50) == [200] * 50
    assert not any(header.startswith("x-ratelimit") for header in streams.open[0].headers)


def test_a_tier_change_applies_from_the_next_request(streams: Streams, gateway: Gateway) -> None:
    account = make_account(gateway.db)
    assert streams.start_many(account, 2) == [200, 200]
    shown = _admin(gateway, "set-tier-limits", "default", "--free-max-concurrent", "2")
    assert shown.splitlines()[1].split()[:7] == ["default", "600", "1000000", "32", "120", "200000", "2"]
    refused = streams.start(account)
    assert _refusal(refused) == (
        "Too many concurrent requests: the 'default' tier's limit of 2 concurrent requests for free models."
    )
    assert refused.headers["retry-after"] == "1"
    newcomer = make_account(gateway.db)
    assert [streams.start(newcomer).status_code for _ in range(3)] == [200, 200, 429]


def _chat(client: TestClient, account: Account, max_tokens: int) -> Any:
    body = {"model": "fake-chat", "messages": USER, "max_tokens": max_tokens}
    return client.post(
        "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {account.key.key}"}
    )


TOO_LARGE = re.compile(
    r"This request needs ([\d,]+) tokens \(prompt ([\d,]+) \+ max_tokens 200\), more than this API key's "
    r"limit of 100 tokens per minute for free models; lower max_tokens or ask for a higher limit\."
)


def test_a_request_that_can_never_fit_is_a_400_that_says_why(
    billed_client: TestClient, gateway: Gateway, fake_engine: FakeEngine
) -> None:
    """Not a 429: no wait helps, and clients retry 429s."""
    account = make_account(gateway.db, tokens_per_minute=100)
    refused = _chat(billed_client, account, max_tokens=200)
    found = TOO_LARGE.fullmatch(_refusal(refused, 400, "request_too_large"))
    assert found is not None, refused.text
    needed, prompt = (int(group.replace(",", "")) for group in found.groups())
    assert needed == prompt + 200 and 0 < prompt < 100
    assert (
        "retry-after" not in refused.headers and "retry-after-ms" not in refused.headers
    )  # waiting won't help
    assert refused.headers["x-ratelimit-limit-tokens"] == "100"
    assert fake_engine.submitted == []


def test_a_request_over_the_minutes_tokens_waits_for_the_next_minute(
    billed_client: TestClient, gateway: Gateway, fake_engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Windows are wall-clock minutes: both requests must fall in one, whenever the suite runs.
    monkeypatch.setattr(gateway.limiter, "_clock", lambda: 1_800_000_030.0)
    set_model_price(gateway.db, "fake-chat", 1, 1)
    fake_engine.endless, fake_engine.step_delay_s = True, 0.0  # generates all of max_tokens: all counted
    account = make_account(gateway.db, 1_000_000, tokens_per_minute=1_000)
    assert _chat(billed_client, account, max_tokens=600).status_code == 200
    refused = _chat(billed_client, account, max_tokens=600)
    assert _refusal(refused).startswith("Rate limit reached for tokens per minute: this request needs ")
    assert "this API key's limit of 1,000 tokens per minute for paid models" in _refusal(refused)
    assert 1 <= int(refused.headers["retry-after"]) <= 60


def test_user_info_shows_the_limits_admission_applies(streams: Streams, gateway: Gateway) -> None:
    account = make_account(gateway.db, max_concurrent_requests=3)
    headers = {"Authorization": f"Bearer {account.key.key}"}
    limits = httpx.get(f"{streams.url}/v1/user/info", headers=headers).json()["data"]["rate_limits"]
    assert limits == {
        "tier": "default",
        "paid_models": {
            "requests_per_minute": 600,
            "tokens_per_minute": 1_000_000,
            "max_concurrent_requests": 3,
        },
        "free_models": {
            "requests_per_minute": 120,
            "tokens_per_minute": 200_000,
            "max_concurrent_requests": 3,
        },
    }
    shown = _admin(gateway, "show-limits", account.key.info.id)
    assert re.search(r"free\s+concurrent\s+3\s+key", shown) and re.search(
        r"free\s+rpm\s+120\s+tier default", shown
    )
    assert streams.start_many(account, 3) == [200] * 3
    assert streams.start(account).status_code == 429  # the fourth, as shown
