"""What the routes of one app share: the fleet of chat models and the embedders, what each served model is
and how it is listed, settings, the platform gateway (None with --no-auth), the organizations' stored data
(the file store, its limits and the other owners of content), metrics and live figures, plus the background
tasks that must outlive a request (aborting an engine request or settling its bill after its client left)
and the data sweeper (files past their expiry or their organization's retention)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool

from tokenmill.catalog.fleet_model import ModelDeployment, ModelState, ModelUnavailable, UnknownModel
from tokenmill.catalog.lifecycle import Fleet, Ticket
from tokenmill.catalog.live import LiveStats
from tokenmill.engine.client import EngineClient, EngineStats
from tokenmill.engine.embedder import Embedder
from tokenmill.platform.auth import authorize_model
from tokenmill.platform.data_controls import ContentOwner, sweep
from tokenmill.platform.file_store import FileStore
from tokenmill.platform.files import FileLimits
from tokenmill.platform.fine_tuned_models import find_adapter_models
from tokenmill.platform.gateway import Gateway
from tokenmill.platform.listings import ListingInfo, callable_listings
from tokenmill.platform.principal import KeyPrincipal
from tokenmill.serving.errors import APIError, model_not_found
from tokenmill.serving.logprobs import TokenTexts
from tokenmill.serving.metrics import ServingMetrics
from tokenmill.serving.served import ServedModel, local_listing
from tokenmill.serving.settings import ServerSettings
from tokenmill.serving.tidal import TidalSchedule

if TYPE_CHECKING:
    from tokenmill.serving.batch_dispatcher import BatchDispatcher

logger = logging.getLogger(__name__)


def fleet_of(engines: Mapping[str, EngineClient]) -> Fleet:
    """Engines built by the caller (tests, embedding the server in a program): pinned, outside any budget."""
    return Fleet(
        [
            ModelDeployment(model_id, 0, (lambda engine=engine: engine), pinned=True, max_running=1 << 20)
            for model_id, engine in engines.items()
        ]
    )


@dataclass(frozen=True, slots=True)
class DataServices:
    """Where organizations' content lives, for the Files API and the data controls."""

    store: FileStore
    limits: FileLimits
    owners: tuple[ContentOwner, ...] = ()
    """Content besides files (fine-tuning artifacts...) that delete-all, retention and export reach."""


@dataclass(eq=False)
class ServingState:
    fleet: Fleet
    embedders: dict[str, Embedder]
    settings: ServerSettings
    gateway: Gateway | None = None
    served: dict[str, ServedModel] = field(default_factory=dict)
    """Every model this server answers for; a model missing here is described from its engine once started."""
    data: DataServices | None = None
    """None with --no-auth: files need a database."""
    job_queued: Callable[[], None] = lambda: None
    """Called after a fine-tuning job is queued: `serve` starts its trainer workers with the first job."""
    batches: BatchDispatcher | None = None
    """Answers this gateway's batch lines (None with --no-auth: batches need the platform)."""
    live: LiveStats = field(default_factory=LiveStats)
    created: int = field(default_factory=lambda: int(time.time()))
    ready: bool = False
    """True once the pinned models and the embedders have started; model routes answer 503 before."""
    metrics: ServingMetrics = field(init=False)
    tidal: TidalSchedule = field(init=False)
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
        self.tidal = TidalSchedule(self.settings.tidal)

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
        if model not in self.served and not await self._learn_adapter_models([model]):
            raise model_not_found(model)  # listed in the shared database, but served by another gateway
        return listing

    async def visible_listings(self, principal: KeyPrincipal) -> list[ListingInfo]:
        """What `principal` may call here, by model id: the same rules as `resolve`, for a whole list."""
        if self.gateway is None:
            listings = [local_listing(served) for served in self.served.values()]
        else:
            listings = await run_in_threadpool(callable_listings, self.gateway.db, principal.org_id)
            await self._learn_adapter_models([x.model for x in listings if x.model not in self.served])
        found = [
            listing
            for listing in listings
            if listing.model in self.served and principal.may_use(listing.model)
        ]
        return sorted(found, key=lambda listing: listing.model)

    async def _learn_adapter_models(self, models: list[str]) -> bool:
        """Fine-tuned models (rows of the shared database) whose base model this server runs become served
        models here: a gateway learns of a new fine-tune on its first request, not at a restart. Returns
        whether all of `models` are served now."""
        if self.gateway is None or not models:
            return not models
        from tokenmill.engine.lora import LoRARequest  # torch: only where engines run

        found = await run_in_threadpool(find_adapter_models, self.gateway.db, models)
        for adapter in found.values():
            base = self.served.get(adapter.base_model)
            if base is not None and base.task == "chat" and base.lora is None:
                self.served[adapter.model] = ServedModel(
                    adapter.model,
                    "chat",
                    base.context_length,
                    base_model=adapter.base_model,
                    lora=LoRARequest(adapter.model, adapter.path),
                    owner_org_id=adapter.org_id,
                )
        return all(model in self.served for model in models)

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
        served = self.served[listing.model]
        engine_model = served.base_model or listing.model  # an adapter runs on its base model's engine
        self._require_ready(engine_model)
        try:
            ticket = await self.fleet.checkout(engine_model)
        except UnknownModel:
            raise model_not_found(listing.model) from None
        except ModelUnavailable:
            self.live.record_refusal(listing.model)
            raise
        ticket.lora = served.lora
        return ticket

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
        served = self.served.get(model)
        return self.fleet.status_of(served.base_model if served and served.base_model else model).state

    def engine_stats(self) -> Iterator[tuple[str, EngineStats]]:
        for model, _, engine in self.fleet.engines():
            yield model, engine.stats()

    def batches_changed(self) -> None:
        """A batch was created or cancelled: the dispatcher looks at once rather than at its next poll."""
        if self.batches is not None:
            self.batches.wake()

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

    async def sweep_data_forever(self) -> None:
        """Every `data_sweep_interval_s` (the first right away): delete what is past its expiry or its
        organization's retention. A failed sweep is logged and tried again at the next interval."""
        interval = self.settings.data_sweep_interval_s
        if self.gateway is None or self.data is None or interval <= 0:
            return
        db, data = self.gateway.db, self.data
        while True:
            try:
                report = await run_in_threadpool(sweep, db, data.store, owners=data.owners)
                if report.total:
                    logger.info(
                        "data sweep: deleted %d expired file(s), %d past retention, other content %s",
                        report.expired_files,
                        report.retained_files,
                        report.owners,
                    )
            except Exception:
                logger.exception("data sweep failed; trying again in %d s", interval)
            await asyncio.sleep(interval)

    def _require_ready(self, model: str) -> None:
        if not self.ready:
            raise APIError(
                503, f"The model `{model}` is still loading; retry shortly.", code="model_not_ready"
            )

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("background task failed", exc_info=task.exception())
