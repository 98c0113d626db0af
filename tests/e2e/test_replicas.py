"""A chat model served by two worker-process replicas behind one router: `kill -9` of one replica under load
ends every request in flight (finished, or a clean OpenAI-shaped error: never a hang), the ledger reconciles
to the micro-unit, the survivor keeps serving and the killed replica comes back."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from tests.e2e.conftest import MODEL, NO_EOS, Platform, books, org_of_key
from tests.serving.server_process import ServerProcess
from tokenmill.platform.tables import UsageRecord

pytestmark = pytest.mark.slow

NUM_REQUESTS = 32
MAX_TOKENS = 64
INPUT_MICROS, OUTPUT_MICROS = 1, 2


def worker_pids(server: ServerProcess) -> set[int]:
    """The engine worker processes the server started (children running tokenmill.cluster.worker)."""
    assert server.process is not None
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue  # exited meanwhile
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == server.process.pid and b"tokenmill.cluster.worker" in cmdline:
            pids.add(int(entry.name))
    return pids


async def _stream(http: httpx.AsyncClient, url: str, key: str, i: int, first_tokens: asyncio.Event) -> dict:
    """-> {"status", "tokens" (content chunks seen), "usage" or "error"}."""
    body = {
        "model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}, **NO_EOS,
        "messages": [{"role": "user", "content": f"Request {i:03d}: tell me about the sea."}],
    }  # fmt: skip
    headers = {"Authorization": f"Bearer {key}"}
    outcome: dict[str, Any] = {"tokens": 0}
    async with http.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as response:
        outcome["status"] = response.status_code
        if response.status_code != 200:
            outcome["error"] = json.loads(await response.aread())["error"]
            return outcome
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            if "error" in event:
                outcome["error"] = event["error"]
            elif event.get("usage"):
                outcome["usage"] = event["usage"]
            elif event["choices"] and event["choices"][0]["delta"].get("content"):
                outcome["tokens"] += 1
                first_tokens.set()
    return outcome


async def _load_and_kill(url: str, key: str, victim: int) -> list[dict]:
    # Every request streaming before the kill: a request that had no token yet would move to the survivor
    # (failover before the first token), and the kill must also hit requests that cannot move.
    first_tokens = [asyncio.Event() for _ in range(NUM_REQUESTS)]
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=NUM_REQUESTS + 4)) as http:
        tasks = [
            asyncio.create_task(_stream(http, url, key, i, first_tokens[i])) for i in range(NUM_REQUESTS)
        ]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in first_tokens)), timeout=60)
        os.kill(victim, signal.SIGKILL)
        # The bound only keeps a broken build from hanging the suite; every request ends long before.
        return await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)


def _admin_models(server: ServerProcess, admin_key: str) -> dict:
    response = httpx.get(
        f"{server.url}/v1/admin/models", headers={"Authorization": f"Bearer {admin_key}"}, timeout=10
    )
    assert response.status_code == 200, response.text
    return next(m for m in response.json()["data"] if m["id"] == MODEL)


def test_killing_one_replica_ends_every_request_cleanly_and_the_books_reconcile(
    sqlite_platform: Platform, servers: Callable[[ServerProcess], ServerProcess]
) -> None:
    platform = sqlite_platform
    platform.admin("set-price", MODEL, str(INPUT_MICROS), str(OUTPUT_MICROS))
    key = platform.account("10")
    # Least-load routing spreads the requests over both replicas (they share the chat template's system
    # prompt, so prefix routing would keep them all on one): the kill then hits some requests, not all.
    server = servers(platform.server("--replicas", "2", "--routing", "least-load"))
    admin_key = (platform.data_dir / "admin_key").read_text().strip()
    before = worker_pids(server)
    assert len(before) == 2
    assert [r["healthy"] for r in _admin_models(server, admin_key)["replicas"]] == [True, True]

    results = asyncio.run(_load_and_kill(server.url, key, victim=min(before)))

    finished = [r for r in results if "usage" in r]
    failed = [r for r in results if "error" in r]
    assert len(finished) + len(failed) == NUM_REQUESTS  # every request ended, one way or the other
    assert all(r["usage"]["completion_tokens"] == MAX_TOKENS for r in finished)
    assert failed and finished  # the killed replica's requests failed, the survivor's finished
    for outcome in failed:
        assert outcome["error"]["code"] in ("engine_failed", "model_overloaded"), outcome
        assert "Traceback" not in outcome["error"]["message"]

    db = platform.open()
    try:
        org_id = org_of_key(db, key)
        money = books(db, org_id)
        with db.read() as session:
            records = session.scalars(select(UsageRecord).where(UsageRecord.org_id == org_id)).all()
    finally:
        db.close()
    assert money.num_open == 0  # every reservation settled or released: nothing left hanging
    ok = [r for r in records if r.status == "ok"]
    errors = [r for r in records if r.status != "ok"]
    assert len(ok) == len(finished) and all(r.completion_tokens == MAX_TOKENS for r in ok)
    # The finished requests pay tokens x prices to the micro; one that failed under way is recorded with
    # what it streamed and charged nothing (the platform's policy for server errors).
    billed = sum(r.prompt_tokens * INPUT_MICROS + r.completion_tokens * OUTPUT_MICROS for r in ok)
    assert money.usage_cost_micros == -money.charges_micros == billed
    assert all(r.status == "error" and r.cost_micros == 0 for r in errors)
    # What a failed request streamed: at least a token per content chunk its client saw (a chunk may carry
    # several when the client falls behind), never a whole answer.
    assert (
        sum(r["tokens"] for r in failed)
        <= sum(r.completion_tokens for r in errors)
        < len(errors) * MAX_TOKENS
    )

    # The killed replica is restarted (a new worker process) and both serve again.
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        replicas = _admin_models(server, admin_key)["replicas"]
        if all(r["healthy"] for r in replicas) and len(worker_pids(server)) == 2:
            break
        time.sleep(0.2)
    after = worker_pids(server)
    assert len(after) == 2 and min(before) not in after
    results = asyncio.run(_load_only(server.url, key))
    assert all("usage" in r for r in results), results


async def _load_only(url: str, key: str) -> list[dict]:
    async with httpx.AsyncClient(timeout=120) as http:
        return await asyncio.gather(*(_stream(http, url, key, i, asyncio.Event()) for i in range(8)))


def test_bench_compare_routing_finds_prefix_routing_keeps_the_caches_warm(
    sqlite_platform: Platform, servers: Callable[[ServerProcess], ServerProcess], tmp_path: Path
) -> None:
    """`tokenmill bench serve --compare-routing` across two worker replicas, on prompts that share ten system
    prompts: least-load routing spreads each prefix over both replicas (each computes it), prefix routing
    keeps each on one, so more of the prompt tokens come from a cache. Ten, not fewer: while the first
    requests are cold, prefix routing sends a repeat away from a replica busy computing another prefix
    (weighing load against the cache), and with five prefixes that chain sometimes ran through all of
    them, leaving prefix routing no better than least-load in that run."""
    from tokenmill.bench import serve

    platform = sqlite_platform
    key = platform.account()
    server = servers(platform.server("--replicas", "2"))
    admin_key = (platform.data_dir / "admin_key").read_text().strip()
    result = serve.main(
        [
            "--base-url", f"{server.url}/v1", "--api-key", key, "--admin-key", admin_key,
            "--extra-body", json.dumps(NO_EOS), "--workload", "shared-prefix", "--prefix-len", "96",
            "--num-prefixes", "10", "--input-len", "16", "--output-len", "4", "--concurrency", "2",
            "--num-requests", "60", "--compare-routing", "--no-progress", "--output-dir", str(tmp_path),
        ]
    )  # fmt: skip
    assert [p["label"] for p in result["points"]] == [
        "concurrency 2 least-load routing, round 1",
        "concurrency 2 prefix routing, round 1",
    ]
    assert all(p["metrics"]["num_ok"] == 60 for p in result["points"])
    compared = json.loads((tmp_path / "routing.json").read_text())["median"]
    assert compared["hit_rate_prefix"] > compared["hit_rate_least_load"]
    assert "admin_key" not in result["config"]  # the key is not written to the results
    assert _admin_models(server, admin_key)["routing"] == "prefix"  # left as the server's default
