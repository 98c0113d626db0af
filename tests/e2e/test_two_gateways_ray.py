"""The production topology on one machine: a Ray cluster started with `ray start --head`, and two stateless
`tokenmill serve --ray-address auto` gateways sharing one PostgreSQL and one Redis, each running its model as
a Ray actor. The reliability checks hold across the pair: 120 streams split between the gateways on an account
that pays for some of them never overdraw it and reconcile to the micro, and a per-key request limit is one
limit whichever gateway a request reaches."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import MODEL, Platform
from tests.e2e.test_concurrent_billing import INPUT_MICROS, OUTPUT_MICROS, _stream, check_books
from tests.e2e.test_rate_limits_e2e import _chat, _start_of_a_window
from tests.platform.conftest import REDIS_URL, EmptyDatabase, redis_unavailable
from tests.serving.server_process import ServerProcess, free_port
from tokenmill import cli

pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

NUM_REQUESTS = 120
BALANCE_MICROS = 1_500
RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A one-node Ray cluster of 2 CPUs, as an operator starts one (never on Redis's port 6379)."""
    reason = redis_unavailable()
    if reason:
        pytest.skip(reason)
    log = tmp_path_factory.mktemp("ray") / "ray-start.log"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    command = [
        RAY, "start", "--head", "--port", str(free_port()), "--node-ip-address", "127.0.0.1",
        "--num-cpus", "2", "--include-dashboard=false", "--disable-usage-stats",
    ]  # fmt: skip
    with log.open("wb") as out:
        started = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=120)
    assert started.returncode == 0, log.read_text()
    try:
        yield
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)


@pytest.fixture
def pair(
    ray_head: None, tmp_path: Path, tiny_llama_dir: Path, servers: Callable[[ServerProcess], ServerProcess]
) -> Iterator[tuple[Platform, ServerProcess, ServerProcess]]:
    empty = EmptyDatabase("postgresql", tmp_path)
    platform = Platform(empty.url, tmp_path / "data", tiny_llama_dir, tmp_path)
    flags = ("--ray-address", "auto", "--redis-url", REDIS_URL)
    first = platform.server(*flags, name="first")
    platform.admin("set-price", MODEL, str(INPUT_MICROS), str(OUTPUT_MICROS))
    second = platform.server(*flags, name="second")
    servers(first)
    servers(second)
    yield platform, first, second
    for server in (first, second):
        server.stop()
    empty.drop()


def _replicas(platform: Platform, server: ServerProcess) -> list[dict[str, Any]]:
    admin_key = (platform.data_dir / "admin_key").read_text().strip()
    response = httpx.get(f"{server.url}/v1/admin/models", headers={"Authorization": f"Bearer {admin_key}"})
    assert response.status_code == 200, response.text
    return next(m for m in response.json()["data"] if m["id"] == MODEL)["replicas"]


async def _split(first: str, second: str, key: str) -> list[tuple[int, dict[str, Any]]]:
    limits = httpx.Limits(max_connections=NUM_REQUESTS + 10)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        return await asyncio.gather(
            *(_stream(http, (first, second)[i % 2], key, i) for i in range(NUM_REQUESTS))
        )


def test_two_gateways_on_postgres_redis_and_ray_keep_balances_and_limits(pair) -> None:
    platform, first, second = pair
    for server in (first, second):
        (replica,) = _replicas(platform, server)
        # A Ray actor on the cluster's node, not a process of the gateway's own.
        assert replica["healthy"] and replica["node"] and replica["pid"] != server.process.pid

    out = io.StringIO()
    with redirect_stdout(out):
        assert cli.main(["cluster", "status", "--url", first.url, "--data-dir", str(platform.data_dir)]) == 0
    (row,) = [line.split() for line in out.getvalue().splitlines()[1:2]]
    (on_first,) = _replicas(platform, first)
    assert row[:5] == [on_first["node"], MODEL, "0", str(on_first["pid"]), "serving"]

    key = platform.account(f"0.{BALANCE_MICROS:06d}")
    results = asyncio.run(_split(first.url, second.url, key))
    money = check_books(platform, key, results, BALANCE_MICROS)
    generated = sum(
        server.metric("tokenmill_engine_generated_tokens_total", MODEL) for server in (first, second)
    )
    assert generated == money.completion_tokens  # both gateways' actors served, nothing unbilled

    limited = platform.account("1", "--rpm", "3", tier="default")
    _start_of_a_window()
    assert [_chat(server, limited).status_code for server in (first, second, first)] == [200] * 3
    for server in (second, first):
        refused = _chat(server, limited)
        assert refused.status_code == 429 and "retry-after" in refused.headers


def test_a_replica_no_node_can_host_fails_its_model_alone(
    ray_head: None,
    sqlite_platform: Platform,
    tmp_path: Path,
    servers: Callable[[ServerProcess], ServerProcess],
) -> None:
    config = tmp_path / "models.yaml"
    config.write_text(
        f"""
models:
  - {{id: big, source: {sqlite_platform.model_dir}, pinned: true, resources: {{num_gpus: 1}}}}
  - {{id: {MODEL}, source: {sqlite_platform.model_dir}, pinned: true, engine: {{kv_cache_memory: 4M}}}}
"""
    )
    server = servers(
        ServerProcess(
            ["--config", str(config), "--database-url", sqlite_platform.url, "--ray-address", "auto"],
            tmp_path / "serve.log",
            data_dir=sqlite_platform.data_dir,
        )
    )
    admin_key = (sqlite_platform.data_dir / "admin_key").read_text().strip()
    listed = httpx.get(
        f"{server.url}/v1/admin/models", headers={"Authorization": f"Bearer {admin_key}"}
    ).json()
    big = next(m for m in listed["data"] if m["id"] == "big")
    assert big["state"] == "failed"
    assert "num_gpus" in big["reason"] and "asking for 1 CPU, 1 GPU" in big["reason"]
    key = sqlite_platform.account()
    assert _chat(server, key).status_code == 200  # the other model serves
    refused = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": "big", "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert refused.status_code == 503 and "num_gpus" in refused.json()["error"]["message"]
