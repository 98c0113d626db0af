"""`create_app`: wires engines, embedders, settings and the platform gateway into one FastAPI app. No globals:
two apps in one process (as in tests) share nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from tokenmill import console
from tokenmill.catalog.lifecycle import Fleet
from tokenmill.config import ConfigError
from tokenmill.engine.client import EngineClient
from tokenmill.engine.embedder import Embedder
from tokenmill.platform.content_owners import platform_owners
from tokenmill.platform.data_controls import ContentOwner
from tokenmill.platform.file_store import FileStore, local_store
from tokenmill.platform.files import FileLimits
from tokenmill.platform.gateway import Gateway
from tokenmill.serving.batch_dispatcher import BatchDispatcher
from tokenmill.serving.deps import get_admin, get_principal, require_valid_text
from tokenmill.serving.errors import install_error_handlers
from tokenmill.serving.middleware import RequestContext
from tokenmill.serving.openapi import openapi_schema
from tokenmill.serving.routes import (
    account,
    admin,
    admin_batches,
    admin_invites,
    admin_market,
    admin_models,
    auth,
    batches,
    catalog,
    chat,
    completions,
    data_controls,
    embeddings,
    files,
    fine_tuning,
    health,
    history,
    keys,
    models,
)
from tokenmill.serving.served import ServedModel
from tokenmill.serving.settings import ServerSettings
from tokenmill.serving.state import DataServices, ServingState, fleet_of

V1_ROUTES = (
    chat,
    completions,
    embeddings,
    models,
    catalog,
    account,
    history,
    keys,
    data_controls,
    fine_tuning,
    batches,
)
"""Every /v1 route authenticates and refuses invalid text (router-level dependencies), so a new route cannot
forget to."""
BATCH_ROUTES = {
    "/v1/chat/completions": chat.create_chat_completion,
    "/v1/completions": completions.create_completion,
    "/v1/embeddings": embeddings.create_embeddings,
}
"""The routes a batch line runs through, by the batch's endpoint."""
STREAMED_ROUTES = (files,)
"""/v1 routes that read their body as a stream (file uploads): they authenticate like the others, but no
dependency may read the body first; they check the text of their fields themselves."""


def data_services(
    settings: ServerSettings,
    gateway: Gateway | None,
    file_store: FileStore | None,
    content_owners: Sequence[ContentOwner] | None,
) -> DataServices | None:
    """Files live in `<data dir>/files` unless a store is given; the other content defaults to the platform's
    own owners (fine-tuning's `<data dir>/fine_tuning`, batches' lines)."""
    if gateway is None:
        return None
    data_dir = gateway.settings.data_dir
    return DataServices(
        store=file_store or local_store(data_dir),
        limits=FileLimits(settings.max_file_bytes, settings.max_org_file_bytes),
        owners=tuple(platform_owners(gateway.db, data_dir) if content_owners is None else content_owners),
    )


def create_app(
    chat_models: Fleet | Mapping[str, EngineClient],
    embedders: Mapping[str, Embedder],
    settings: ServerSettings,
    gateway: Gateway | None = None,
    served: Mapping[str, ServedModel] | None = None,
    *,
    file_store: FileStore | None = None,
    content_owners: Sequence[ContentOwner] | None = None,
    job_queued: Callable[[], None] | None = None,
) -> FastAPI:
    """`chat_models` (a fleet under a memory budget, or engines already built, served pinned) and
    `embedders` are keyed by the model id clients send; the app starts the pinned models and the embedders
    in the background when it starts (so /health answers at once and /ready says 503 until they are
    loaded) and drains and shuts them down when it stops. `served` describes the models before they load
    (task, context length, models.yaml listing). `gateway` (accounts, billing, rate limits) is required
    unless `settings.no_auth`; its owner opens and closes it, the app only uses it. `file_store` and
    `content_owners` (see `data_services`) are where organizations' files and other content live;
    `job_queued` is called whenever a fine-tuning job is queued (to start trainer workers)."""
    if gateway is None and not settings.no_auth:
        raise ConfigError(
            "gateway: authentication is on, so the app needs a platform Gateway "
            "(or ServerSettings(no_auth=True) for a private single-user deployment)"
        )
    if gateway is not None and settings.no_auth:
        raise ConfigError("gateway: no_auth serves without a platform; pass no gateway")
    served = dict(served or {})
    if isinstance(chat_models, Fleet):
        fleet = chat_models
    else:
        fleet = fleet_of(chat_models)
        for model_id, engine in chat_models.items():
            served.setdefault(model_id, ServedModel(model_id, "chat", engine.max_model_len))
    data = data_services(settings, gateway, file_store, content_owners)
    state = ServingState(fleet, dict(embedders), settings, gateway, served, data=data)
    if job_queued is not None:
        state.job_queued = job_queued
    dispatcher = None if gateway is None else BatchDispatcher(state, BATCH_ROUTES)
    if dispatcher is not None:
        state.batches = dispatcher
        state.metrics.registry.register(dispatcher.collector())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        tasks = [
            asyncio.create_task(state.start(), name="tokenmill-startup"),
            asyncio.create_task(state.sweep_data_forever(), name="tokenmill-data-sweeper"),
        ]
        if dispatcher is not None:
            tasks.append(asyncio.create_task(dispatcher.run_forever(), name="tokenmill-batches"))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if dispatcher is not None:
                await dispatcher.stop()  # before the engines drain: unfinished lines stay pending
            await state.shutdown()

    # /openapi.json only: FastAPI's /docs and /redoc pages load their scripts from a CDN, which an offline
    # deployment cannot reach.
    app = FastAPI(
        title="tokenmill", summary="OpenAI-compatible API", lifespan=lifespan, docs_url=None, redoc_url=None
    )
    app.state.tokenmill = state
    app.openapi = lambda: openapi_schema(app)  # type: ignore[method-assign]
    install_error_handlers(app)
    for module in V1_ROUTES:
        app.include_router(module.router, dependencies=[Depends(get_principal), Depends(require_valid_text)])
    for module in STREAMED_ROUTES:
        app.include_router(module.router, dependencies=[Depends(get_principal)])
    for module in (
        admin,
        admin_invites,
        admin_market,
        admin_models,
        admin_batches,
    ):  # the operator's routes: the admin key, never a user key
        app.include_router(module.router, dependencies=[Depends(get_admin), Depends(require_valid_text)])
    # Signing in is how one gets a principal: these routes authenticate themselves where they need to.
    app.include_router(auth.router, dependencies=[Depends(require_valid_text)])
    app.include_router(health.router)
    app.router.routes.extend(console.routes())  # the web console at /: static pages over this same API
    app.add_middleware(
        RequestContext,
        max_body_bytes=settings.max_body_bytes,
        metrics=state.metrics,
        streamed=[("POST", files.FILES_PATH)],  # the Files route holds uploads to its own limits
    )
    return app
