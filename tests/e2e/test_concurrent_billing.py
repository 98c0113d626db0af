"""200 concurrent streaming requests on one account whose balance pays for only some of them, against a real
server on SQLite and on PostgreSQL: the account is never overdrawn, usage costs, ledger charges and tokens x
prices agree to the micro, and every refused request was refused before the engine generated anything."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import MODEL, NO_EOS, Books, Platform, books, org_of_key
from tests.serving.server_process import ServerProcess

pytestmark = pytest.mark.slow

NUM_REQUESTS = 200
MAX_TOKENS = 8
INPUT_MICROS, OUTPUT_MICROS = 1, 2
"""Per token: `set-price tiny 1 2` is 1 and 2 currency units per 1M tokens, so every cost is exact."""
BALANCE_MICROS = 2_000
"""About 40 requests' worth (a request costs ~30 prompt + 8 x 2 completion micros)."""


async def _stream(http: httpx.AsyncClient, url: str, key: str, i: int) -> tuple[int, dict[str, Any]]:
    """-> (status, the usage chunk for a stream, or the error body for a refusal)."""
    body = {
        "model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}, **NO_EOS,
        "messages": [{"role": "user", "content": f"Request {i:03d}: tell me about the sea."}],
    }  # fmt: skip
    headers = {"Authorization": f"Bearer {key}"}
    async with http.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as response:
        if response.status_code != 200:
            return response.status_code, json.loads(await response.aread())
        events = [line async for line in response.aiter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]", events[-3:]
    return 200, json.loads(events[-2].removeprefix("data: "))["usage"]


async def _all_at_once(url: str, key: str) -> list[tuple[int, dict[str, Any]]]:
    limits = httpx.Limits(max_connections=NUM_REQUESTS + 10)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        return await asyncio.gather(*(_stream(http, url, key, i) for i in range(NUM_REQUESTS)))


def check_books(
    platform: Platform, key: str, results: list[tuple[int, dict[str, Any]]], balance_micros: int
) -> Books:
    """The invariants of streams racing for one balance: only 429 insufficient_quota refusals, exactly as
    many served as the balance pays for, never overdrawn, and usage, charges and tokens x prices equal to the
    micro. Returns the account's books for the caller's own checks."""
    served = [usage for status, usage in results if status == 200]
    refused = [body for status, body in results if status != 200]
    assert all(status in (200, 429) for status, _ in results)
    assert all(body["error"]["code"] == "insufficient_quota" for body in refused)
    assert all(u["completion_tokens"] == MAX_TOKENS for u in served)  # EOS is biased away
    (prompt_tokens,) = {u["prompt_tokens"] for u in served}
    worst_case = prompt_tokens * INPUT_MICROS + MAX_TOKENS * OUTPUT_MICROS
    # Each served request costs exactly its worst case, so the balance admits exactly this many, whatever
    # the order in which the requests arrived.
    assert len(served) == balance_micros // worst_case and 0 < len(served) < len(results)

    db = platform.open()
    try:
        money = books(db, org_of_key(db, key))
    finally:
        db.close()
    tokens_times_prices = money.prompt_tokens * INPUT_MICROS + money.completion_tokens * OUTPUT_MICROS
    assert money.usage_cost_micros == -money.charges_micros == tokens_times_prices == len(served) * worst_case
    assert money.prompt_tokens == sum(u["prompt_tokens"] for u in served)
    assert money.completion_tokens == sum(u["completion_tokens"] for u in served)
    assert (
        money.lowest_running_balance_micros >= 0
        and money.balance_micros == balance_micros - tokens_times_prices
    )
    assert (money.num_open, money.num_released) == (0, 0)  # refusals never held a reservation
    assert money.num_settled == money.num_usage_records == len(served)
    return money


def test_concurrent_streams_never_overdraw_and_reconcile(
    platform: Platform, servers: Callable[[ServerProcess], ServerProcess]
) -> None:
    platform.admin("set-price", MODEL, str(INPUT_MICROS), str(OUTPUT_MICROS))
    key = platform.account(f"0.{BALANCE_MICROS:06d}")
    server = servers(platform.server())

    results = asyncio.run(_all_at_once(server.url, key))

    money = check_books(platform, key, results, BALANCE_MICROS)
    # The engine saw the served requests and nothing else: refusals happened before any token.
    assert server.metric("tokenmill_engine_prompt_tokens_total", MODEL) == money.prompt_tokens
    assert server.metric("tokenmill_engine_generated_tokens_total", MODEL) == money.completion_tokens
