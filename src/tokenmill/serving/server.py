"""`tokenmill serve`: load the models, build the app, run uvicorn until a stop signal."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import uvicorn

from tokenmill.config import ConfigError
from tokenmill.engine.client import EngineClient
from tokenmill.engine.embedder import Embedder
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


def serve(
    settings: ServerSettings,
    models: list[ModelSpec],
    embedding_models: list[ModelSpec],
    engine_kwargs: Mapping[str, object],
    log_level: str = "info",
) -> None:
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engines = load_engines(models, engine_kwargs)
    embedders = load_embedders(embedding_models, engines)
    app = create_app(engines, embedders, settings)
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
