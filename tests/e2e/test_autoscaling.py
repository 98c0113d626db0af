"""Autoscaling through a real `tokenmill serve --config`: under a burst a model goes from one worker-process
replica to two, back to one once idle (the drained worker process exits), and a `min_replicas: 0` model is
unloaded when idle and loaded again by its next request, whose cold start the admin API reports. Every
request on the way is answered."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import NO_EOS, Platform
from tests.e2e.test_replicas import worker_pids
from tests.serving.server_process import ServerProcess

pytestmark = pytest.mark.slow

SAFETY_S = 120.0
"""Only turns a broken build's hang into a failure; each wait ends in seconds."""


def _config(path: Path, model_dir: Path | str) -> Path:
    path.write_text(
        f"""
models:
  - id: busy
    source: {model_dir}
    pinned: true
    autoscaling: {{min_replicas: 1, max_replicas: 2, target_in_flight: 4, scale_down_delay_s: 3}}
    engine: {{kv_cache_memory: 4M, max_num_seqs: 32}}
  - id: rare
    source: {model_dir}
    autoscaling: {{min_replicas: 0, scale_down_delay_s: 1}}
    engine: {{kv_cache_memory: 4M}}
"""
    )
    return path


class Admin:
    def __init__(self, url: str, key: str) -> None:
        self.url, self.headers = url, {"Authorization": f"Bearer {key}"}

    def model(self, model_id: str) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/v1/admin/models", headers=self.headers, timeout=10)
        assert response.status_code == 200, response.text
        return next(m for m in response.json()["data"] if m["id"] == model_id)

    def wait_for(self, model_id: str, condition: Any, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + SAFETY_S
        while not condition(model := self.model(model_id)):
            assert time.monotonic() < deadline, f"{what}: {model}"
            time.sleep(0.1)
        return model


async def _burst(url: str, key: str, model: str, n: int) -> list[int]:
    body = {"model": model, "max_tokens": 48, "temperature": 0, "messages": [], **NO_EOS}
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=SAFETY_S, limits=httpx.Limits(max_connections=n)) as http:
        responses = await asyncio.gather(
            *(
                http.post(
                    f"{url}/v1/chat/completions",
                    json={**body, "messages": [{"role": "user", "content": f"Burst {i}: the sea."}]},
                    headers=headers,
                )
                for i in range(n)
            )
        )
    return [r.status_code for r in responses]


def _serving(model: dict[str, Any]) -> int:
    return sum(r["healthy"] and not r["draining"] for r in model["replicas"])


def test_a_model_scales_out_under_a_burst_back_when_idle_and_to_zero(
    sqlite_platform: Platform, tmp_path: Path
) -> None:
    config = _config(tmp_path / "models.yaml", sqlite_platform.model_dir)
    server = ServerProcess(
        ["--config", str(config), "--database-url", sqlite_platform.url],
        tmp_path / "serve.log",
        data_dir=sqlite_platform.data_dir,
    ).start(timeout_s=120)
    try:
        key = sqlite_platform.account()
        admin = Admin(server.url, (sqlite_platform.data_dir / "admin_key").read_text().strip())
        busy = admin.model("busy")
        assert _serving(busy) == 1 and busy["autoscaling"]["max_replicas"] == 2
        assert len(worker_pids(server)) == 1
        assert admin.model("rare")["state"] == "unloaded"

        # Bursts of 16 (4 per replica wanted) until the autoscaler has seen one: it adds the second replica.
        deadline = time.monotonic() + SAFETY_S
        while admin.model("busy")["num_scale_ups"] == 0:
            assert time.monotonic() < deadline, "no scale-up under load"
            assert asyncio.run(_burst(server.url, key, "busy", 16)) == [200] * 16
        busy = admin.wait_for("busy", lambda m: _serving(m) == 2, "the second replica never served")
        assert busy["last_scaling"].startswith("1 -> 2 replicas")
        assert len(worker_pids(server)) == 2
        assert asyncio.run(_burst(server.url, key, "busy", 16)) == [200] * 16
        busy = admin.model("busy")
        assert all(r["prompt_tokens"] > 0 for r in busy["replicas"])  # both took part

        # Idle: after the delay the newer replica is drained and its worker process stops.
        busy = admin.wait_for("busy", lambda m: len(m["replicas"]) == 1, "never scaled back to one")
        assert busy["num_scale_downs"] == 1 and busy["last_scaling"].startswith("2 -> 1 replicas")
        deadline = time.monotonic() + SAFETY_S
        while len(worker_pids(server)) != 1:
            assert time.monotonic() < deadline, "the drained worker process is still running"
            time.sleep(0.1)
        assert asyncio.run(_burst(server.url, key, "busy", 2)) == [200] * 2

        # A min_replicas 0 model: loaded by a request, unloaded when idle, loaded again by the next one.
        assert asyncio.run(_burst(server.url, key, "rare", 1)) == [200]
        rare = admin.wait_for("rare", lambda m: m["state"] == "unloaded", "never scaled to zero")
        assert rare["num_loads"] == 1 and rare["num_scale_downs"] == 1 and rare["memory_bytes"] > 0
        assert asyncio.run(_burst(server.url, key, "rare", 1)) == [200]
        rare = admin.model("rare")
        assert rare["state"] == "loaded" and rare["num_loads"] == 2 and rare["last_load_s"] > 0

        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        assert 'tokenmill_model_scalings_total{direction="up",model="busy"} 1.0' in metrics
        assert 'tokenmill_model_replicas{model="busy"} 1.0' in metrics
    finally:
        server.stop()
