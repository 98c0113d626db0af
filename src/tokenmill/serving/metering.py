"""The bill of one generation or embedding request. `admit` reserves the worst case (and takes the rate-limit
slot) before the engine sees the request; afterwards exactly one of settle or release happens, whichever way
the request ends:

    engine submission fails (validation) ........ release: nothing ran, nothing is charged
    finished normally ........................... settle "ok"
    client left (disconnect, dropped stream) .... settle "client_disconnected": what was generated
    engine or server error ...................... settle "error": nothing is charged

A batch line's meter is deferred (`Origin.on_admitted`): its success is settled by the dispatcher together
with the line's answer (`settle_answered`), and any other ending charges nothing (the line runs again).

Token counts are the engine's (`DeltaTracker`), never re-estimated. Database and Redis calls run in worker
threads; from contexts that cannot await (a cancelled task, a response's close callback) they are spawned."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager

from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from tokenmill.platform.admission import Admission
from tokenmill.platform.billing import UsageStatus
from tokenmill.platform.gateway import Gateway
from tokenmill.platform.listings import ListingInfo
from tokenmill.platform.principal import KeyPrincipal
from tokenmill.serving.errors import ClientDisconnected
from tokenmill.serving.generation import Spawn
from tokenmill.serving.origin import LIVE, Origin

logger = logging.getLogger(__name__)

Counts = Callable[[], tuple[int, int]]
"""-> (prompt tokens, completion tokens) as the engine reported them, read when the request ends."""


class Meter:
    """Idempotent: the first settle or release wins, later calls do nothing. Without a gateway (`--no-auth`)
    every method is a no-op."""

    def __init__(
        self,
        gateway: Gateway | None,
        admission: Admission | None,
        spawn: Spawn,
        request_id: str,
        *,
        deferred: bool = False,
    ) -> None:
        self._gateway = gateway
        self._admission = admission
        self._spawn = spawn
        self._request_id = request_id
        self._start = time.monotonic()
        self._closed = admission is None
        self._deferred = deferred
        """A batch line's meter: success is settled by `settle_answered`, and an unfinished line is
        charged nothing (it will run again), where a live request is charged what it generated."""
        self._answered_counts: Counts | None = None
        self._unfinished = UsageStatus.ERROR if deferred else UsageStatus.CLIENT_DISCONNECTED

    @property
    def headers(self) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers for the response."""
        if self._admission is None or self._admission.rate_limit is None:
            return {}
        return self._admission.rate_limit.headers()

    async def settle(self, status: UsageStatus, counts: Counts) -> None:
        if self._take():
            await run_in_threadpool(self._settle, status, *counts())

    def settle_soon(self, status: UsageStatus, counts: Counts) -> None:
        """For code that must not await (it may already be cancelled)."""
        if self._take():
            self._spawn(run_in_threadpool(self._logged, self._settle, status, *counts()))

    async def release(self) -> None:
        if self._take():
            await run_in_threadpool(self._release)

    def release_soon(self) -> None:
        if self._take():
            self._spawn(run_in_threadpool(self._logged, self._release))

    @asynccontextmanager
    async def submitting(self) -> AsyncIterator[None]:
        """Around the engine submission: if it fails, no token was generated, so nothing is charged."""
        try:
            yield
        except asyncio.CancelledError:
            self.release_soon()
            raise
        except BaseException:
            await self.release()
            raise

    @asynccontextmanager
    async def running(self, counts: Counts) -> AsyncIterator[None]:
        """Around a non-streaming request's work: settles however the block ends."""
        try:
            yield
        except ClientDisconnected:
            await self.settle(self._unfinished, counts)
            raise
        except asyncio.CancelledError:
            self.settle_soon(self._unfinished, counts)
            raise
        except Exception:
            await self.settle(UsageStatus.ERROR, counts)
            raise
        if self._deferred:
            self._answered_counts = counts
        else:
            await self.settle(UsageStatus.OK, counts)

    async def settle_answered(self, also: Callable[[Session], None]) -> None:
        """A deferred meter whose request succeeded: charge it and run `also` (write the answer) in one
        transaction. If that transaction fails, nothing was charged or written, and the reservation is
        released."""
        counts = self._answered_counts
        if counts is None or not self._take():
            raise RuntimeError(f"request {self._request_id}: nothing to settle")
        try:
            await run_in_threadpool(self._settle, UsageStatus.OK, *counts(), also)
        except BaseException:
            self._spawn(run_in_threadpool(self._logged, self._release))
            raise

    async def stream(self, events: AsyncGenerator[str, None], counts: Counts) -> AsyncGenerator[str, None]:
        """Passes `events` through. A stream that ends normally is settled before its last event ([DONE])
        goes out, so a client that saw [DONE] can already see its usage; a dropped one is settled as soon as
        the response closes."""
        try:
            async with aclosing(events):
                async for event in events:
                    yield event
        except Exception:
            await self.settle(UsageStatus.ERROR, counts)
            raise
        except BaseException:  # GeneratorExit or cancellation: the client is gone
            self.settle_soon(self._unfinished, counts)
            raise
        await self.settle(UsageStatus.OK, counts)

    def close(self, counts: Counts) -> None:
        """The response's close callback: settles a stream that closed before its generator ever ran."""
        self.settle_soon(self._unfinished, counts)

    # -- in worker threads -----------------------------------------------------------------------------

    def _take(self) -> bool:
        if self._closed:
            return False
        self._closed = True
        return True

    def _settle(
        self,
        status: UsageStatus,
        prompt_tokens: int,
        completion_tokens: int,
        also: Callable[[Session], None] | None = None,
    ) -> None:
        assert self._gateway is not None and self._admission is not None
        usage = self._gateway.admission.finish(
            self._admission,
            prompt_tokens,
            completion_tokens,
            status,
            time.monotonic() - self._start,
            also=also,
        )
        logger.info(
            "request %s: %s, %d+%d tokens, %d micros (%s)",
            self._request_id,
            usage.model,
            prompt_tokens,
            completion_tokens,
            usage.cost_micros,
            status.value,
        )

    def _release(self) -> None:
        assert self._gateway is not None and self._admission is not None
        self._gateway.admission.abort(self._admission)

    def _logged(self, work: Callable[..., None], *args: object) -> None:
        try:
            work(*args)
        except Exception:
            # The reservation stays open; the next start of this gateway releases it (nothing is charged).
            logger.exception("request %s: closing its bill failed", self._request_id)


async def admit(
    gateway: Gateway | None,
    spawn: Spawn,
    principal: KeyPrincipal,
    listing: ListingInfo,
    num_prompt_tokens: int,
    max_completion_tokens: int,
    request_id: str,
    origin: Origin = LIVE,
) -> Meter:
    """Raises the platform's refusals (429) having held nothing. `listing` is what `resolve` found for this
    caller: its price (less the `origin`'s discount), provider and fee are quoted on the reservation. The
    admission runs in a worker thread; if this task is cancelled meanwhile, whatever the thread admits is
    released when it finishes."""
    if gateway is None:
        return Meter(None, None, spawn, request_id)
    work = asyncio.ensure_future(
        run_in_threadpool(
            functools.partial(gateway.admission.admit, rate_limited=origin.rate_limited),
            principal,
            origin.priced(listing),
            num_prompt_tokens,
            max_completion_tokens,
        )
    )
    try:
        admission = await asyncio.shield(work)
    except asyncio.CancelledError:
        work.add_done_callback(lambda done: _release_orphan(done, gateway, spawn, request_id))
        raise
    meter = Meter(gateway, admission, spawn, request_id, deferred=origin.on_admitted is not None)
    if origin.on_admitted is not None:
        origin.on_admitted(meter)
    return meter


def _release_orphan(done: asyncio.Future[Admission], gateway: Gateway, spawn: Spawn, request_id: str) -> None:
    if not done.cancelled() and done.exception() is None:
        Meter(gateway, done.result(), spawn, request_id).release_soon()
