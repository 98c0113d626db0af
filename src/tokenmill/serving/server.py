"""`tokenmill serve`: open the platform (unless --no-auth), load the models, build the app, run uvicorn until
a stop signal."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping

import uvicorn

from tokenmill.config import ConfigError
from tokenmill.engine.client import EngineClient
from tokenmill.engine.embedder import Embedder
from tokenmill.platform.admin_key import admin_key_path
from tokenmill.platform.gateway import Gateway, PlatformSettings
from tokenmill.serving.app import create_app
from tokenmill.serving.settings import ModelSpec, ServerSettings

logger = logging.getLogger(__name__)


def _unique(model_id: str, taken: Mapping[str, object]) -> str:
    if model_id in taken:
        raise ConfigError(f"model: the id {model_id!r} is used twice; give one of them ID=PATH")
    return model_id


def load_engines(specs: list[ModelSpec], engine_kwargs: Mapping[str, object]) -> dict[str, EngineClient]:
    from tokenmill.engine.async_engine import AsyncLLM  # imports torch: only when serving

    engines: dict[str, EngineClient] = {}
    for spec in specs:
        logger.info("loading chat model %s", spec.source)
        engine = AsyncLLM(spec.source, **engine_kwargs)
        engines[_unique(spec.model_id or engine.model_id, engines)] = engine
    return engines


def load_embedders(specs: list[ModelSpec], taken: Mapping[str, object]) -> dict[str, Embedder]:
    embedders: dict[str, Embedder] = {}
    for spec in specs:
        embedder = Embedder(spec.source, model_id=spec.model_id)
        embedders[_unique(embedder.model_id, {**taken, **embedders})] = embedder
    return embedders


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


def serve(
    settings: ServerSettings,
    platform: PlatformSettings,
    models: list[ModelSpec],
    embedding_models: list[ModelSpec],
    engine_kwargs: Mapping[str, object],
    log_level: str = "info",
) -> None:
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    gateway = None if settings.no_auth else open_gateway(platform)  # a bad database fails before models load
    try:
        engines = load_engines(models, engine_kwargs)
        embedders = load_embedders(embedding_models, engines)
        if gateway is not None:
            gateway.register_models([*engines, *embedders])
        else:
            logger.warning("--no-auth: no API keys, no billing, no rate limits; do not expose this server")
        app = create_app(engines, embedders, settings, gateway)
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
            ", ".join([*engines, *embedders]) or "none",
        )
        uvicorn.Server(config).run()
    finally:
        if gateway is not None:
            gateway.close()
