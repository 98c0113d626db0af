"""Admission under overload, through a real `tokenmill serve --config`: one small replica (2 running, a queue
of 4) gets 50 requests at once. The excess is refused at once (before any accepted request finishes; one
at a time within 100 ms) with 503 + Retry-After in OpenAI's error shape, the accepted requests all complete,
and the ledger charged exactly the accepted ones.

The burst is sent over raw sockets, one connection per request: an HTTP client library spends milliseconds
of Python per request, on the same two cores as the server, and would measure itself."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from sqlalchemy import func, select

from tests.e2e.conftest import NO_EOS, Platform
from tests.serving.server_process import ServerProcess
from tokenmill.platform.pricing import Price, cost_micros
from tokenmill.platform.tables import LedgerEntry, UsageRecord

PRICE = Price(input_micros_per_mtok=1_234_567, output_micros_per_mtok=9_876_543)
NUM_REQUESTS = 50
MAX_TOKENS = 128
CAPACITY = 2 + 4
"""max_num_seqs running + max_queue waiting."""
LONG_TOKENS = 200
WARM_TOKENS = 1
NUM_PROBES = 10


def _config(path: Path, model_dir: Path) -> Path:
    path.write_text(
        f"""
models:
  - id: small
    source: {model_dir}
    pinned: true
    max_queue: 4
    engine: {{max_num_seqs: 2, kv_cache_memory: 4M, max_model_len: 256}}
    listing:
      price: {{input: "1.234567", output: "9.876543"}}
"""
    )
    return path


def _body(max_tokens: int) -> dict[str, object]:
    messages = [{"role": "user", "content": "Tell me a long story."}]
    return {"model": "small", "messages": messages, "max_tokens": max_tokens, **NO_EOS}


@dataclass
class _Answer:
    status_code: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


async def _post(url: str, key: str, body: dict[str, object]) -> tuple[_Answer, float]:
    """POST /v1/chat/completions on a connection of its own; the answer and the seconds it took."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {key}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(payload)}\r\nconnection: close\r\n\r\n"
    )
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head.encode() + payload)
    status_line, *header_lines = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in header_lines if line)
    answer = _Answer(
        int(status_line.split()[1]), headers, await reader.readexactly(int(headers["content-length"]))
    )
    seconds = time.perf_counter() - start
    writer.close()
    return answer, seconds


async def _timed(client: httpx.AsyncClient, max_tokens: int) -> tuple[httpx.Response, float]:
    start = time.perf_counter()
    response = await client.post("/v1/chat/completions", json=_body(max_tokens))
    return response, time.perf_counter() - start


async def _burst(url: str, key: str) -> list[tuple[_Answer, float]]:
    return await asyncio.gather(*(_post(url, key, _body(MAX_TOKENS)) for _ in range(NUM_REQUESTS)))


async def _probe_while_full(
    client: httpx.AsyncClient, admin_key: str
) -> tuple[list[httpx.Response], list[float]]:
    """Fill the replica with long requests, then send requests one at a time: each is refused at once."""
    filling = [asyncio.create_task(_timed(client, LONG_TOKENS)) for _ in range(CAPACITY)]
    admin = {"authorization": f"Bearer {admin_key}"}
    deadline = time.monotonic() + 60
    while True:  # until the router holds all of them
        (model,) = (await client.get("/v1/admin/models", headers=admin)).json()["data"]
        if model["replicas"][0]["in_flight_seqs"] == CAPACITY:
            break
        assert time.monotonic() < deadline, model
        await asyncio.sleep(0.01)
    probes = [await _timed(client, MAX_TOKENS) for _ in range(NUM_PROBES)]
    assert not any(task.done() for task in filling)  # the replica stayed full throughout
    return [response for response, _ in await asyncio.gather(*filling)], [
        (response.status_code, seconds) for response, seconds in probes
    ]


def test_a_full_replica_refuses_the_excess_at_once_and_bills_only_what_it_served(
    sqlite_platform: Platform, tmp_path: Path
) -> None:
    config = _config(tmp_path / "models.yaml", sqlite_platform.model_dir)
    server = ServerProcess(
        ["--config", str(config), "--database-url", sqlite_platform.url],
        tmp_path / "serve.log",
        data_dir=sqlite_platform.data_dir,
    ).start(timeout_s=120)
    try:
        key = sqlite_platform.account("100")
        admin_key = (sqlite_platform.data_dir / "admin_key").read_text().strip()

        async def run() -> tuple[list[tuple[_Answer, float]], list[httpx.Response], list[tuple[int, float]]]:
            headers = {"authorization": f"Bearer {key}"}
            limits = httpx.Limits(max_connections=NUM_REQUESTS)
            async with httpx.AsyncClient(
                base_url=server.url, headers=headers, timeout=120, limits=limits
            ) as client:
                # Warm: a server's very first request compiles its chat template and database queries.
                warm, _ = await _timed(client, WARM_TOKENS)
                burst = await _burst(server.url, key)
                filled, probes = await _probe_while_full(client, admin_key)
                return burst, [warm, *filled], probes

        results, served_alone, probes = asyncio.run(run())
    finally:
        server.stop()

    accepted = [r for r, _ in results if r.status_code == 200]
    refused = [(r, seconds) for r, seconds in results if r.status_code != 200]
    assert CAPACITY <= len(accepted) < NUM_REQUESTS  # what runs and waits; never all of them
    for response, _ in refused:
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "1"
        error = response.json()["error"]
        assert (error["code"], error["type"], error["param"]) == ("model_overloaded", "server_error", "model")
    # Refused at once, never held until capacity frees up: one at a time while the replica is full within
    # 100 ms each; in the burst, before the first accepted request finishes and within 250 ms. The burst's
    # 44 refusals queue behind each other and behind the engine's thread for the same two cores and GIL:
    # 15-35 ms on a quiet machine, up to 140 ms seen on a loaded CI host; a request held for capacity would
    # take seconds.
    assert max(seconds for _, seconds in refused) < 0.25, [
        round(s * 1000) for s in sorted(s for _, s in refused)
    ]
    assert max(seconds for _, seconds in refused) < min(s for r, s in results if r.status_code == 200)
    assert [status for status, _ in probes] == [503] * NUM_PROBES
    assert max(seconds for _, seconds in probes) < 0.1, probes
    print(
        f"burst: {len(accepted)} accepted, {len(refused)} refused in "
        f"{min(s for _, s in refused) * 1000:.0f}-{max(s for _, s in refused) * 1000:.0f} ms; "
        f"one at a time while full: {max(s for _, s in probes) * 1000:.0f} ms at most"
    )
    assert [r.status_code for r in served_alone] == [200] * (1 + CAPACITY)
    accepted += served_alone
    for response in accepted:
        assert response.json()["usage"]["completion_tokens"] in (MAX_TOKENS, LONG_TOKENS, WARM_TOKENS)

    expected = [
        cost_micros(r.json()["usage"]["prompt_tokens"], r.json()["usage"]["completion_tokens"], PRICE)
        for r in accepted
    ]
    db = sqlite_platform.open()
    try:
        with db.read() as session:
            records = session.scalars(select(UsageRecord)).all()
            charged = session.scalar(
                select(func.coalesce(func.sum(LedgerEntry.amount_micros), 0)).where(
                    LedgerEntry.kind == "charge"
                )
            )
    finally:
        db.close()
    assert len(records) == len(accepted)  # a refused request left no usage record, no reservation charge
    assert sorted(r.cost_micros for r in records) == sorted(expected)
    assert -int(charged) == sum(expected)
