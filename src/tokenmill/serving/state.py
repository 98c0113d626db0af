"""What the routes of one app share: the fleet of chat models and the embedders, what each served model is
and how it is listed, settings, the platform gateway (None with --no-auth), metrics and live figures, plus
the background tasks that must outlive a request (aborting an engine request or settling its bill after its
client left)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from starlette.concurrency import run_in_threadpool

from tokenmill.catalog.fleet_model import ModelDeployment, ModelState, ModelUnavailable, UnknownModel
from tokenmill.catalog.lifecycle import Fleet, Ticket
from tokenmill.catalog.live import LiveStats
from tokenmill.engine.client import EngineClient, EngineStats
from tokenmill.engine.embedder import Embedder
from tokenmill.platform.auth import authorize_model
from tokenmill.platform.gateway import Gateway
from tokenmill.platform.listings import ListingInfo, callable_listings
from tokenmill.platform.principal import KeyPrincipal
from tokenmill.serving.errors import APIError, model_not_found
from tokenmill.serving.logprobs import TokenTexts
from tokenmill.serving.metrics import ServingMetrics
from tokenmill.serving.served import ServedModel, local_listing
from tokenmill.serving.settings import ServerSettings

logger = logging.getLogger(__name__)


def fleet_of(engines: Mapping[str, EngineClient]) -> Fleet:
    """Engines built by the caller (tests, embedding the server in a program): pinned, outside any budget."""
    return Fleet(
        [
            ModelDeployment(model_id, 0, (lambda engine=engine: engine), pinned=True, max_running=1 << 20)
            for model_id, engine in engines.items()
        ]
    )


@dataclass(eq=False)
class ServingState:
    fleet: Fleet
    embedders: dict[str, Embedder]
    settings: ServerSettings
    gateway: Gateway | None = None
    served: dict[str, ServedModel] = field(default_factory=dict)
    """Every model this server answers for; a model missing here is described from its engine once started."""
    live: LiveStats = field(default_factory=LiveStats)
    created: int = field(default_factory=lambda: int(time.time()))
    ready: bool = False
    """True once the pinned models and the embedders have started; model routes answer 503 before."""
    metrics: ServingMetrics = field(init=False)
    _started: list[Embedder] = field(default_factory=list)
    _failed_embedders: dict[str, str] = field(default_factory=dict)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    _token_texts: dict[str, TokenTexts] = field(default_factory=dict)

    def __post_init__(self) -> None:
        chat = {status.model_id for status in self.fleet.status()}
        overlap = chat & set(self.embedders)
        if overlap:
            raise ValueError(f"model ids used twice: {sorted(overlap)}")
        for model_id in chat:
            self.served.setdefault(model_id, ServedModel(model_id, "chat", None))
        for model_id, embedder in self.embedders.items():
            served = self.served.get(model_id) or ServedModel(model_id, "embedding", None)
            self.served[model_id] = replace(served, context_length=embedder.max_input_tokens)
        self.metrics = ServingMetrics(self.engine_stats, self.fleet, self.live)

    # -- lookups for routes ------------------------------------------------------------------------

    async def resolve(self, model: str, principal: KeyPrincipal) -> ListingInfo:
        """Who may call what: 403 for a model outside the key's allow-list, then one identical 404 for a model
        that does not exist, is not this caller's to see, or is retired (its provider gets a 410)."""
        if self.gateway is None:
            authorize_model(principal, model)
            served = self.served.get(model)
            if served is None:
                raise model_not_found(model)
            return local_listing(served)
        gateway = self.gateway
        listing = gateway.remembered_listing(principal, model) or await run_in_threadpool(
            gateway.resolve, principal, model
        )
        if model not in self.served:  # listed in the shared database, but served by another gateway
            raise model_not_found(model)
        return listing

    async def visible_listings(self, principal: KeyPrincipal) -> list[ListingInfo]:
        """What `principal` may call here, by model id: the same rules as `resolve`, for a whole list."""
        if self.gateway is None:
            listings = [local_listing(served) for served in self.served.values()]
        else:
            listings = await run_in_threadpool(callable_listings, self.gateway.db, principal.org_id)
        found = [
            listing
            for listing in listings
            if listing.model in self.served and principal.may_use(listing.model)
        ]
        return sorted(found, key=lambda listing: listing.model)

    def context_length(self, listing: ListingInfo) -> int | None:
        """Declared, else planned before loading, else the loaded engine's own."""
        return listing.context_length or self.served[listing.model].context_length

    async def checkout(self, listing: ListingInfo) -> Ticket:
        """A hold on a loaded chat model (a cold start loads it now); release it when the request ends."""
        if self.served[listing.model].task != "chat":
            raise APIError(
                400,
                f"`{listing.model}` is an embedding model; use /v1/embeddings.",
                param="model",
                code="model_not_supported",
            )
        self._require_ready(listing.model)
        try:
            return await self.fleet.checkout(listing.model)
        except UnknownModel:
            raise model_not_found(listing.model) from None
        except ModelUnavailable:
            self.live.record_refusal(listing.model)
            raise

    def embedder(self, listing: ListingInfo) -> Embedder:
        if self.served[listing.model].task != "embedding":
            raise APIError(
                400,
                f"`{listing.model}` is not an embedding model.",
                param="model",
                code="model_not_supported",
            )
        self._require_ready(listing.model)
        if listing.model in self._failed_embedders:
            raise ModelUnavailable(listing.model, ModelState.FAILED, self._failed_embedders[listing.model])
        return self.embedders[listing.model]

    def token_texts(self, ticket: Ticket) -> TokenTexts:
        if ticket.model_id not in self._token_texts:
            self._token_texts[ticket.model_id] = TokenTexts(ticket.tokenizer)
        return self._token_texts[ticket.model_id]

    def model_state(self, model: str) -> str:
        if model in self.embedders:
            if model in self._failed_embedders:
                return ModelState.FAILED
            return ModelState.LOADED if self.ready else ModelState.LOADING
        return self.fleet.status_of(model).state

    def engine_stats(self) -> Iterator[tuple[str, EngineStats]]:
        for model, _, engine in self.fleet.engines():
            yield model, engine.stats()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` outside the current request; safe to call from a cancelled task's cleanup."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    @property
    def failed_models(self) -> dict[str, str]:
        """Model id -> why it failed to load."""
        failed = {s.model_id: s.reason or "" for s in self.fleet.status() if s.state == ModelState.FAILED}
        return failed | self._failed_embedders

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Started in the background by the app's lifespan, so the port answers /health while models load.
        A model that fails to load is marked failed (with its reason); the others serve."""
        await self.fleet.start()
        for model, embedder in self.embedders.items():
            logger.info("starting embedding model %s", model)
            try:
                await embedder.start()
            except Exception as exc:
                logger.exception("embedding model %s failed to start; the other models serve", model)
                self._failed_embedders[model] = f"{type(exc).__name__}: {exc}"
                continue
            self._started.append(embedder)
        self.ready = True
        logger.info("ready: %s", ", ".join(self.served))

    async def shutdown(self) -> None:
        """Drains: requests still running finish (within the shutdown timeout) before the engines stop."""
        self.ready = False
        await self.fleet.shutdown(self.settings.shutdown_timeout_s)
        for task in list(self._tasks):
            await asyncio.gather(task, return_exceptions=True)
        for embedder in reversed(self._started):
            await embedder.shutdown()
        self._started.clear()

    def _require_ready(self, model: str) -> None:
        if not self.ready:
            raise APIError(
                503, f"The model `{model}` is still loading; retry shortly.", code="model_not_ready"
            )

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("background task failed", exc_info=task.exception())
