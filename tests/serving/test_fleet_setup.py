"""From declared deployments to the fleet, before any weight is read: which kind of replica each model gets
(in the server's process, worker processes, Ray actors), how the cores are split between workers, and the
memory each replica is booked for (a process of its own costs its runtime too)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tokenmill.catalog.deployments import Deployment
from tokenmill.catalog.fleet_model import ModelDeployment
from tokenmill.cluster.process_engine import ProcessEngine
from tokenmill.engine.async_engine import AsyncLLM
from tokenmill.serving.fleet_setup import WORKER_OVERHEAD_BYTES, plan_serving
from tokenmill.serving.settings import CompletionLimits

ENGINE = {"dtype": "float32", "kv_cache_memory": 4 * 2**20}


def _plan(models: list[dict[str, Any]], **options: Any) -> dict[str, ModelDeployment]:
    deployments = [Deployment.model_validate(m) for m in models]
    plan = plan_serving(deployments, ENGINE, CompletionLimits(), memory_budget_bytes=2**34, **options)
    return {d.id: plan.fleet.deployment(d.id) for d in deployments}


def test_each_model_gets_the_replica_kind_its_deployment_asks_for(tiny_llama_dir: Path) -> None:
    source = str(tiny_llama_dir)
    planned = _plan(
        [
            {"id": "alone", "source": source},
            {"id": "pair", "source": source, "replicas": 2},
            {"id": "scaled", "source": source, "autoscaling": {"min_replicas": 0, "max_replicas": 2}},
        ]
    )
    alone, pair, scaled = planned["alone"], planned["pair"], planned["scaled"]
    assert alone.make_replica.func is AsyncLLM  # type: ignore[attr-defined]
    assert pair.make_replica.func is ProcessEngine and scaled.make_replica.func is ProcessEngine  # type: ignore[attr-defined]
    # A worker's own runtime is booked beside its weights and KV cache.
    assert pair.memory_bytes == scaled.memory_bytes == alone.memory_bytes + WORKER_OVERHEAD_BYTES
    assert (pair.num_replicas, scaled.num_replicas, scaled.autoscaling.max_replicas) == (2, 1, 2)  # type: ignore[union-attr]
    # Four workers at most (two and up to two): the cores are split four ways.
    threads = max(1, (os.cpu_count() or 1) // 4)
    assert pair.make_replica.keywords["torch_threads"] == threads  # type: ignore[attr-defined]

    everyone = _plan([{"id": "alone", "source": source}], workers=True)["alone"]
    assert everyone.make_replica.func is ProcessEngine  # type: ignore[attr-defined]


def test_with_a_ray_address_every_replica_is_an_actor_asking_for_its_resources(tiny_llama_dir: Path) -> None:
    pytest.importorskip("ray")
    from tokenmill.cluster.ray_engine import RayEngine

    source = str(tiny_llama_dir)
    planned = _plan(
        [
            {"id": "small", "source": source},
            {"id": "big", "source": source, "resources": {"num_cpus": 2, "num_gpus": 1, "memory": "3G"}},
        ],
        ray_address="auto",
    )
    small, big = planned["small"].make_replica, planned["big"].make_replica
    assert small.func is RayEngine and big.func is RayEngine  # type: ignore[attr-defined]
    assert small.keywords["address"] == "auto" and small.keywords["num_cpus"] == 1  # type: ignore[attr-defined]
    assert small.keywords["memory_bytes"] == planned["small"].memory_bytes  # type: ignore[attr-defined]
    assert (big.keywords["num_cpus"], big.keywords["num_gpus"], big.keywords["memory_bytes"]) == (
        2,
        1,
        3 * 2**30,
    )  # type: ignore[attr-defined]
