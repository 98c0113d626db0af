"""`tokenmill serve`: open the platform (unless --no-auth), plan the models (memory, context, listings),
build the app (which loads the pinned models), run uvicorn until a stop signal, which drains the models."""

from __future__ import annotations

import gc
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import uvicorn

from tokenmill.catalog.deployments import Deployment, load_deployments
from tokenmill.engine.embedder import Embedder
from tokenmill.jobs.worker_supervisor import WorkerSupervisor
from tokenmill.platform.admin_key import admin_key_path
from tokenmill.platform.fine_tuning_runs import has_unfinished_jobs, recover_stale_jobs
from tokenmill.platform.gateway import Gateway, PlatformSettings
from tokenmill.platform.listings import apply_listing
from tokenmill.serving.app import create_app
from tokenmill.serving.fleet_setup import (
    DEFAULT_MAX_QUEUE,
    ServingPlan,
    deployments_from_flags,
    lora_models,
    plan_serving,
)
from tokenmill.serving.settings import LoraSpec, ModelSpec, ServerSettings

logger = logging.getLogger(__name__)


def load_embedders(deployments: Sequence[Deployment]) -> dict[str, Embedder]:
    return {d.id: Embedder(d.source, model_id=d.id) for d in deployments if d.task == "embedding"}


def open_gateway(platform: PlatformSettings) -> Gateway:
    """Before any request: migrate, release what a crash of this gateway left open, and on the very first
    start create the admin key and show it, once, on stderr (the operator's console, not the log file)."""
    gateway = Gateway.open(platform)
    try:
        report = gateway.start()
    except BaseException:
        gateway.close()
        raise
    if report.released_reservation_ids:
        logger.warning(
            "released %d reservation(s) an earlier run left open (nothing was charged for them)",
            len(report.released_reservation_ids),
        )
    if report.admin_key is not None:
        print(
            f"\ntokenmill: created the admin key (shown only this once; also written to "
            f"{admin_key_path(platform.data_dir)}, readable by you only):\n\n    {report.admin_key}\n",
            file=sys.stderr,
            flush=True,
        )
    logger.info(
        "accounts and billing: %s (gateway id %s, rate limits %s)",
        gateway.db.url.render_as_string(hide_password=True),
        platform.gateway_id,
        "in Redis" if platform.redis_url else "in this process",
    )
    return gateway


def publish_listings(gateway: Gateway, plan: ServingPlan, *, declared: bool) -> None:
    """models.yaml's listings are applied (creating provider organizations it names), except where the
    file's entry is unchanged since it was last applied, so a provider's edits survive restarts; models
    named by flags are listed by the platform unless listed already."""
    if declared:
        for spec, digest in plan.listings.values():
            apply_listing(gateway.db, spec, digest=digest, create_provider=True)
        return
    for task in ("chat", "embedding"):
        gateway.register_models([m for m, served in plan.served.items() if served.task == task], task=task)


def trainer_workers(
    settings: ServerSettings, platform: PlatformSettings, gateway: Gateway
) -> WorkerSupervisor:
    """`settings.fine_tuning_workers` `tokenmill worker` processes on this server's database and data dir,
    started by `start()`; when one exits, the job it ran is recovered at once (resumed by the next worker,
    or failed)."""

    def worker_args(name: str) -> list[str]:
        args = ["worker", "--name", name, "--data-dir", str(platform.data_dir)]
        return args + ["--database-url", platform.resolved_database_url]

    def on_exit(name: str, returncode: int) -> None:
        recover_stale_jobs(gateway.db, stale_after_s=0, worker=name)

    names = [f"{platform.gateway_id}/trainer-{i}" for i in range(settings.fine_tuning_workers)]
    return WorkerSupervisor(names, worker_args, on_exit)


def serve(
    settings: ServerSettings,
    platform: PlatformSettings,
    models: Sequence[ModelSpec],
    embedding_models: Sequence[ModelSpec],
    engine_kwargs: Mapping[str, object],
    *,
    loras: Sequence[LoraSpec] = (),
    config: Path | None = None,
    memory_budget_bytes: int | None = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
    workers: bool = False,
    replicas: int = 1,
    routing: str = "prefix",
    ray_address: str | None = None,
    log_level: str = "info",
) -> None:
    """The models come from `config` (models.yaml, whose listings are applied) or else from the flags."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config is not None:
        deployments = load_deployments(config).models
    else:
        deployments = deployments_from_flags(models, embedding_models, replicas)
    gateway = None if settings.no_auth else open_gateway(platform)  # a bad database fails before models load
    try:
        embedders = load_embedders(deployments)
        plan = plan_serving(
            deployments,
            engine_kwargs,
            settings.completion_limits,
            memory_budget_bytes=memory_budget_bytes,
            default_max_queue=max_queue,
            workers=workers,
            routing=routing,
            ray_address=ray_address,
        )
        settings = replace(settings, model_completion_limits=plan.completion_limits)
        adapters = lora_models(loras, plan.served)
        plan.served.update(adapters)
        if gateway is not None:
            publish_listings(gateway, plan, declared=config is not None)
            gateway.register_models(list(adapters), task="chat")
        else:
            logger.warning("--no-auth: no API keys, no billing, no rate limits; do not expose this server")
        workers = None
        if gateway is not None and settings.fine_tuning_workers:
            workers = trainer_workers(settings, platform, gateway)
        app = create_app(
            plan.fleet,
            embedders,
            settings,
            gateway,
            plan.served,
            job_queued=workers.start if workers is not None else None,
        )
        config = uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_config=None,  # our logging setup above, one format for everything
            log_level=log_level,
            timeout_graceful_shutdown=settings.shutdown_timeout_s,
        )
        logger.info(
            "tokenmill: OpenAI-compatible API at %s/v1 (models: %s)",
            settings.base_url,
            ", ".join(plan.served) or "none",
        )
        # What startup built (models, tokenizers, libraries) lives as long as the process: out of the
        # collector's sight, a full collection no longer walks it and stalls every request for ~0.3 s.
        gc.freeze()
        if workers is not None and has_unfinished_jobs(gateway.db):
            workers.start()  # else with the first job: a server nobody fine-tunes on runs no worker
        try:
            uvicorn.Server(config).run()
        finally:
            if workers is not None:
                workers.stop()
    finally:
        if gateway is not None:
            gateway.close()
