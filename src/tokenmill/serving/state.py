"""What the routes of one app share: its engines and embedders, settings, the platform gateway (None with
--no-auth), metrics and readiness, plus the background tasks that must outlive a request (aborting an engine
request or settling its bill after its client left)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any

from tokenmill.engine.client import EngineClient, EngineStats
from tokenmill.engine.embedder import Embedder
from tokenmill.platform.auth import KeyPrincipal, authorize_model
from tokenmill.platform.gateway import Gateway
from tokenmill.serving.errors import APIError, model_not_found
from tokenmill.serving.logprobs import TokenTexts
from tokenmill.serving.metrics import ServingMetrics
from tokenmill.serving.settings import ServerSettings

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class ServingState:
    engines: dict[str, EngineClient]
    embedders: dict[str, Embedder]
    settings: ServerSettings
    gateway: Gateway | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    ready: bool = False
    """True once every engine and embedder has started; /ready and the model routes answer 503 before."""
    startup_error: str | None = None
    metrics: ServingMetrics = field(init=False)
    _started: list[EngineClient | Embedder] = field(default_factory=list)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    _token_texts: dict[str, TokenTexts] = field(default_factory=dict)

    def __post_init__(self) -> None:
        overlap = set(self.engines) & set(self.embedders)
        if overlap:
            raise ValueError(f"model ids used twice: {sorted(overlap)}")
        self.metrics = ServingMetrics(self.engine_stats)

    # -- lookups for routes ------------------------------------------------------------------------

    def engine(self, model: str, principal: KeyPrincipal) -> EngineClient:
        """403 before 404: a key limited to some models learns nothing about the others."""
        authorize_model(principal, model)
        if model not in self.engines:
            if model in self.embedders:
                raise APIError(
                    400,
                    f"`{model}` is an embedding model; use /v1/embeddings.",
                    param="model",
                    code="model_not_supported",
                )
            raise model_not_found(model)
        self._require_ready(model)
        return self.engines[model]

    def embedder(self, model: str, principal: KeyPrincipal) -> Embedder:
        authorize_model(principal, model)
        if model not in self.embedders:
            if model in self.engines:
                raise APIError(
                    400, f"`{model}` is not an embedding model.", param="model", code="model_not_supported"
                )
            raise model_not_found(model)
        self._require_ready(model)
        return self.embedders[model]

    def token_texts(self, model: str) -> TokenTexts:
        if model not in self._token_texts:
            self._token_texts[model] = TokenTexts(self.engines[model].tokenizer)
        return self._token_texts[model]

    def engine_stats(self) -> Iterator[tuple[str, EngineStats]]:
        if self.ready:
            for model, engine in self.engines.items():
                yield model, engine.stats()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` outside the current request; safe to call from a cancelled task's cleanup."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Started in the background by the app's lifespan, so the port answers /health while models load."""
        try:
            parts: list[tuple[str, EngineClient | Embedder]] = [
                *self.engines.items(),
                *self.embedders.items(),
            ]
            for model, part in parts:
                logger.info("starting model %s", model)
                await part.start()
                self._started.append(part)
        except Exception as exc:
            self.startup_error = f"{type(exc).__name__}: {exc}"
            logger.exception("a model failed to start; the server stays unready")
            return
        self.ready = True
        logger.info("ready: %s", ", ".join([*self.engines, *self.embedders]))

    async def shutdown(self) -> None:
        self.ready = False
        for task in list(self._tasks):
            await asyncio.gather(task, return_exceptions=True)
        for part in reversed(self._started):
            await part.shutdown()
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
