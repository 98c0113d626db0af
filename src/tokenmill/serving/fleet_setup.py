"""From declared deployments (models.yaml, or the --model flags) to what the app serves, before any weight is
read: each chat model's engine plan gives its memory (weights + KV cache) and context length, which make
the fleet's budget checks and the catalog's figures; each deployment's listing becomes the platform's."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from tokenmill.catalog.deployments import Deployment
from tokenmill.catalog.fleet_model import ModelDeployment
from tokenmill.catalog.lifecycle import Fleet
from tokenmill.config import ConfigError, EngineConfig
from tokenmill.engine.client import EngineClient
from tokenmill.platform.listing_terms import ListingSpec
from tokenmill.platform.pricing import Price
from tokenmill.serving.served import ServedModel
from tokenmill.serving.settings import CompletionLimits, LoraSpec, ModelSpec

logger = logging.getLogger(__name__)

DEFAULT_MAX_QUEUE = 64
"""Requests waiting per replica beyond those running: as many again as the engine's default max_num_seqs."""
WORKER_OVERHEAD_BYTES = 700 * 2**20
"""What a replica in a process of its own (a worker or a Ray actor) holds beyond its weights and KV cache:
Python, torch, the tokenizer. SmolLM2-135M's worker: 930 MiB resident for 271 MiB of weights + KV (1.1 GiB
at its peak), measured on 2026-12-01."""
MEMORY_BUDGET_SHARE = 0.8
"""The default budget: this share of the memory free at start (the rest is for the server itself, the
embedders, and what the estimate of weights + KV cache leaves out)."""


def deployments_from_flags(
    chat: Sequence[ModelSpec], embedding: Sequence[ModelSpec], replicas: int = 1
) -> list[Deployment]:
    """The quick path: every model named on the command line is pinned (loaded at start, as always) and
    listed by the platform with the defaults; each chat model runs `replicas` engines."""
    from tokenmill.engine.embedder import resolve_embedding_model
    from tokenmill.models.loader import resolve_model

    declared = [
        {
            "id": spec.model_id or resolve_model(spec.source).name,
            "source": spec.source,
            "pinned": True,
            "replicas": replicas,
        }
        for spec in chat
    ] + [
        {
            "id": spec.model_id or resolve_embedding_model(spec.source)[0],
            "source": spec.source,
            "task": "embedding",
            "pinned": True,
        }
        for spec in embedding
    ]
    ids = [d["id"] for d in declared]
    for model_id in ids:
        if ids.count(model_id) > 1:
            raise ConfigError(f"model: the id {model_id!r} is used twice; give one of them ID=PATH")
    return [Deployment.model_validate(d) for d in declared]


@dataclass(frozen=True, slots=True)
class ServingPlan:
    fleet: Fleet
    served: dict[str, ServedModel]
    completion_limits: dict[str, CompletionLimits]
    listings: dict[str, tuple[ListingSpec, str]]
    """Model id -> its declared listing and the digest of its declaration (see `listings.apply_listing`)."""


def plan_serving(
    deployments: Sequence[Deployment],
    engine_kwargs: Mapping[str, object],
    server_limits: CompletionLimits,
    *,
    memory_budget_bytes: int | None,
    default_max_queue: int = DEFAULT_MAX_QUEUE,
    workers: bool = False,
    routing: str = "prefix",
    ray_address: str | None = None,
) -> ServingPlan:
    """Raises ConfigError (naming the model and field) for settings that cannot work, before any load.
    `memory_budget_bytes` None: `MEMORY_BUDGET_SHARE` of the memory free now. A chat model's engines run in
    the server's process, or each in a worker process of its own when `workers` is set or the model has
    more than one replica (replicas in one process would share its GIL and die together), or, given
    `ray_address`, each in a Ray actor placed by the Ray cluster (whose memory the budget then leaves to
    Ray: by default there is none)."""
    from tokenmill.engine.setup import plan_engine

    if ray_address is not None and importlib.util.find_spec("ray") is None:
        raise ConfigError("ray-address: Ray is not installed here: pip install 'tokenmill[ray]'")
    fleet_models: list[ModelDeployment] = []
    served: dict[str, ServedModel] = {}
    limits: dict[str, CompletionLimits] = {}
    device = None
    for deployment in deployments:
        listing = listing_spec(deployment)
        if deployment.task == "embedding":
            served[deployment.id] = ServedModel(deployment.id, "embedding", None, listing)
            continue
        kwargs = {**engine_kwargs, **deployment.engine_kwargs()}
        config = EngineConfig.from_kwargs(deployment.source, **kwargs)
        try:
            plan = plan_engine(config)
        except ConfigError as exc:
            raise ConfigError(f"model {deployment.id!r}: {exc}") from None
        device = plan.device
        memory_bytes = plan.weight_bytes + plan.kv_cache_bytes
        if ray_address is not None or _in_worker(deployment, workers):
            memory_bytes += WORKER_OVERHEAD_BYTES
        fleet_models.append(
            ModelDeployment(
                deployment.id,
                memory_bytes,
                _replica_factory(deployment, kwargs, workers, deployments, ray_address, memory_bytes),
                pinned=deployment.pinned,
                num_replicas=deployment.num_replicas,
                max_running=config.scheduler.max_num_seqs,
                max_queue=default_max_queue if deployment.max_queue is None else deployment.max_queue,
                routing=routing,
                autoscaling=deployment.autoscaling_policy(),
            )
        )
        served[deployment.id] = ServedModel(
            deployment.id, "chat", plan.max_model_len, listing, source=deployment.source
        )
        if deployment.limits is not None:
            limits[deployment.id] = deployment.limits.apply_to(server_limits)
    if memory_budget_bytes is None and device is not None and ray_address is None:
        from tokenmill.engine.hardware import free_memory_bytes

        free = free_memory_bytes(device)
        if free is not None:
            memory_budget_bytes = int(free * MEMORY_BUDGET_SHARE)
            logger.info(
                "memory budget for chat models: %d MiB of %d MiB free", memory_budget_bytes >> 20, free >> 20
            )
    fleet = Fleet(fleet_models, memory_budget_bytes)
    return ServingPlan(
        fleet,
        served,
        limits,
        {d.id: (served[d.id].listing, _digest(d)) for d in deployments},  # type: ignore[misc]
    )


def _replica_factory(
    deployment: Deployment,
    kwargs: Mapping[str, object],
    workers: bool,
    deployments: Sequence[Deployment],
    ray_address: str | None,
    memory_bytes: int,
) -> Callable[[], EngineClient]:
    from tokenmill.engine.async_engine import AsyncLLM  # torch: only when serving

    if ray_address is not None:
        from tokenmill.cluster.ray_engine import RayEngine

        wanted = deployment.resources
        return partial(
            RayEngine,
            deployment.source,
            address=ray_address,
            num_cpus=wanted.num_cpus,
            num_gpus=wanted.num_gpus,
            memory_bytes=wanted.memory or memory_bytes,
            **kwargs,
        )
    if not _in_worker(deployment, workers):
        return partial(AsyncLLM, deployment.source, **kwargs)
    from tokenmill.cluster.process_engine import ProcessEngine

    # Worker processes split the cores between them rather than each spinning threads on all of them
    # (counting every replica autoscaling may start).
    num_workers = sum(d.max_replicas for d in deployments if d.task == "chat" and _in_worker(d, workers))
    threads = max(1, (os.cpu_count() or 1) // num_workers)
    return partial(ProcessEngine, deployment.source, torch_threads=threads, **kwargs)


def _in_worker(deployment: Deployment, workers: bool) -> bool:
    """Replicas in one process would share its GIL and die together: more than one runs in workers."""
    return workers or deployment.max_replicas > 1


def lora_models(loras: Sequence[LoraSpec], served: Mapping[str, ServedModel]) -> dict[str, ServedModel]:
    """`--lora` adapters as models served on their base model's engine (checked when their first request
    is submitted, like any adapter); their listings are the platform's defaults, as for `--model`."""
    from tokenmill.engine.lora import LoRARequest

    chat = [model for model, entry in served.items() if entry.task == "chat" and entry.lora is None]
    adapters: dict[str, ServedModel] = {}
    for spec in loras:
        if spec.name in served or spec.name in adapters:
            raise ConfigError(f"lora: the model id {spec.name!r} is used twice")
        base = spec.base
        if base is None:
            if len(chat) != 1:
                raise ConfigError(f"lora {spec.name!r}: name its base model, NAME=PATH@BASE (one of {chat})")
            base = chat[0]
        if base not in chat:
            raise ConfigError(f"lora {spec.name!r}: {base!r} is not a chat model this server runs ({chat})")
        path = str(Path(spec.path).expanduser().resolve())
        if not (Path(path) / "adapter_config.json").is_file():
            raise ConfigError(
                f"lora {spec.name!r}: {path} is not a PEFT adapter directory (no adapter_config.json)"
            )
        adapters[spec.name] = ServedModel(
            spec.name, "chat", served[base].context_length, base_model=base, lora=LoRARequest(spec.name, path)
        )
    return adapters


def listing_spec(deployment: Deployment) -> ListingSpec:
    declared = deployment.listing
    price = declared.price_micros()
    return ListingSpec(
        model=deployment.id,
        task=deployment.task,
        display_name=declared.display_name,
        description=declared.description,
        provider=declared.provider,
        tags=tuple(declared.tags),
        license=declared.license,
        price=None if price is None else Price(*price),
        visibility=declared.visibility,
        shared_with=tuple(declared.shared_with),
        status=declared.status,
        platform_fee_bps=declared.platform_fee_bps,
    )


def _digest(deployment: Deployment) -> str:
    """Of the listing as declared, so an unchanged file leaves a provider's later edits alone."""
    declared = {"task": deployment.task, **deployment.listing.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(declared, sort_keys=True).encode()).hexdigest()
