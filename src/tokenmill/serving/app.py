"""`create_app`: wires engines, embedders and settings into one FastAPI app. No globals: two apps in one
process (as in tests) share nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from tokenmill.engine.client import EngineClient
from tokenmill.engine.embedder import Embedder
from tokenmill.serving.errors import install_error_handlers
from tokenmill.serving.middleware import RequestContext
from tokenmill.serving.routes import chat, completions, embeddings, health, models
from tokenmill.serving.settings import ServerSettings
from tokenmill.serving.state import ServingState


def create_app(
    engines: dict[str, EngineClient], embedders: dict[str, Embedder], settings: ServerSettings
) -> FastAPI:
    """`engines` and `embedders` are keyed by the model id clients send; the app starts them in the
    background when it starts (so /health answers at once and /ready says 503 until they are loaded) and
    shuts them down when it stops."""
    state = ServingState(dict(engines), dict(embedders), settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        startup = asyncio.create_task(state.start(), name="tokenmill-startup")
        try:
            yield
        finally:
            startup.cancel()
            await asyncio.gather(startup, return_exceptions=True)
            await state.shutdown()

    app = FastAPI(title="tokenmill", summary="OpenAI-compatible API", lifespan=lifespan)
    app.state.tokenmill = state
    install_error_handlers(app)
    for module in (chat, completions, embeddings, models, health):
        app.include_router(module.router)
    app.add_middleware(RequestContext, max_body_bytes=settings.max_body_bytes, metrics=state.metrics)
    return app
