"""`tokenmill cluster` against a real server (uvicorn in a thread) whose model runs two fake replicas: status
lists each replica by node with its load, drain takes one out while the model serves on, drain-node takes out
what runs on a node and refuses to take a model's last replica."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from typing import Any

import pytest

from tests.serving.conftest import LiveServer
from tests.serving.fake_engine import FakeEngine
from tokenmill import cli
from tokenmill.catalog.fleet_model import ModelDeployment
from tokenmill.catalog.lifecycle import Fleet
from tokenmill.platform.gateway import Gateway
from tokenmill.serving.app import create_app
from tokenmill.serving.settings import ServerSettings
from tokenmill.terminal.cluster import render_status, replicas_on


@pytest.fixture
def server(smollm2_tokenizer: Any, gateway: Gateway) -> Iterator[tuple[str, str]]:
    def replica() -> FakeEngine:
        return FakeEngine(smollm2_tokenizer, model_id="m")

    fleet = Fleet([ModelDeployment("m", 64 * 2**20, replica, pinned=True, num_replicas=2)])
    gateway.register_models(["m"])
    app = create_app(fleet, {}, ServerSettings(shutdown_timeout_s=5), gateway)
    with LiveServer(app) as live:
        live.wait_ready()
        yield live.url, (gateway.settings.data_dir / "admin_key").read_text().strip()


def _cluster(url: str, *args: str, data_dir: str | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    where = ["--url", url, "--data-dir", data_dir] if data_dir else ["--url", url]
    with redirect_stdout(out), redirect_stderr(err):
        status = cli.main(["cluster", args[0], *where, *args[1:]])
    return status, out.getvalue(), err.getvalue()


def test_status_then_drain_one_replica_then_a_node(server, gateway: Gateway) -> None:
    url, _ = server
    data_dir = str(gateway.settings.data_dir)  # the admin key is read from there
    status, out, _ = _cluster(url, "status", data_dir=data_dir)
    assert status == 0
    header, first, second = out.splitlines()[:3]
    assert header.split()[:5] == ["NODE", "MODEL", "REPLICA", "PID", "STATE"]
    assert first.split()[:5] == ["local", "m", "0", "-", "serving"] and second.split()[2] == "1"
    assert first.split()[-2:] == ["64", "MiB"]
    assert "m: loaded, 2 replica(s), routing prefix" in out and "memory: 128 MiB booked" in out

    status, out, _ = _cluster(url, "drain", "m", "1", data_dir=data_dir)
    assert (status, out.strip()) == (0, "m replica 1: drained; 1 replica(s) left")
    status, out, _ = _cluster(url, "status", data_dir=data_dir)
    assert [line.split()[:3] for line in out.splitlines()[1:2]] == [["local", "m", "0"]]
    assert "m: loaded, 1 replica(s)" in out and "memory: 64 MiB booked" in out

    status, _, err = _cluster(url, "drain-node", "local", data_dir=data_dir)
    assert status == 1 and "m replica 0: 409" in err and "drain the model" in err
    status, _, err = _cluster(url, "drain-node", "10.0.0.9", data_dir=data_dir)
    assert status == 1 and "no replica runs on '10.0.0.9'" in err
    status, _, err = _cluster(url, "status", "--admin-key", "wrong")
    assert status == 1 and "401" in err


def test_status_groups_replicas_by_node() -> None:
    def replica(index: int, node: str | None, draining: bool = False) -> dict[str, Any]:
        return {
            "index": index, "node": node, "pid": 100 + index, "healthy": True, "draining": draining,
            "running_seqs": 1, "waiting_seqs": 0, "in_flight_seqs": 1, "kv_cache_usage": 0.25,
        }  # fmt: skip

    listing = {
        "data": [
            {
                "id": "m", "task": "chat", "state": "loaded", "reason": None, "routing": "prefix",
                "memory_bytes": 3 * 2**30, "prefix_cache_hit_rate": 0.5, "last_scaling": "1 -> 3 replicas",
                "autoscaling": {"min_replicas": 1, "max_replicas": 3, "target_in_flight": 8},
                "replicas": [replica(0, "10.0.0.2"), replica(1, None), replica(2, "10.0.0.2", draining=True)],
            }
        ],
        "memory_budget_bytes": None,
        "memory_used_bytes": 3 * 2**30,
    }  # fmt: skip
    lines = render_status(listing).splitlines()
    assert [line.split()[0] for line in lines[1:4]] == ["local", "10.0.0.2", "10.0.0.2"]
    assert lines[3].split()[4] == "draining" and "25%" in lines[1]
    assert "autoscaling 1-3 at 8 in flight per replica, prefix-cache hits 50%" in render_status(listing)
    assert replicas_on(listing, "10.0.0.2") == [("m", 0)]  # the draining one is already on its way out
