"""Feeds batch lines to the engines at batch priority, keeping each model just full: a few lines in flight
per model (`TidalSettings.batch_lines_in_flight`, more off peak), never a flood, so live requests always find
a seat at the router and the engine's scheduler can give batch work exactly the capacity live work leaves.

Each line runs through the same route function as a live request (the same validation, tools, guidance,
errors), with an `Origin` that makes it batch priority, unrated, discounted and settled by the dispatcher:
the line's answer is written in the transaction that charges it. A line refused for a moment (503: the
model is loading or full) stays pending and is tried again; any other refusal is its answer. Lines in
flight when the server stops are charged nothing and run again on the next start; those of a cancelled
batch are stopped and charged nothing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from tokenmill.engine.sampling_params import Priority
from tokenmill.platform import batch_results, batches
from tokenmill.platform.auth import active_principal_of_key
from tokenmill.platform.batches import BatchInfo, LineAlreadyAnswered, PendingLine
from tokenmill.platform.errors import PlatformError
from tokenmill.platform.principal import KeyPrincipal
from tokenmill.serving.batch_input import parse_body, response_json
from tokenmill.serving.errors import (
    error_response,
    handled_response,
    internal_error_response,
    validation_error,
)
from tokenmill.serving.metering import Meter
from tokenmill.serving.origin import Origin
from tokenmill.serving.state import ServingState
from tokenmill.serving.tidal import Tide

logger = logging.getLogger(__name__)

RATE_WINDOW_S = 60.0
POLL_S = 1.0
"""How often open batches are looked at without a reason (expiry, another gateway's cancel)."""
RETRY_S = 1.0
"""How long a model's lines wait after it refused one for a moment (503), or answering one failed."""

Route = Callable[..., Awaitable[Response]]
"""A generation route function: (body, request, state, principal, request_id, origin) -> Response."""


class BatchDispatcher:
    def __init__(self, state: ServingState, routes: Mapping[str, Route]) -> None:
        assert state.gateway is not None and state.data is not None, "batches need the platform"
        self.state = state
        self.db = state.gateway.db
        self.store = state.data.store
        self.owner = state.gateway.settings.gateway_id
        self.routes = dict(routes)
        self._wake = asyncio.Event()
        self._lines: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._in_flight: Counter[str] = Counter()
        """Lines in flight per model."""
        self._paused_until: dict[str, float] = {}
        self.lines_answered: Counter[tuple[str, str]] = Counter()
        """(model, "succeeded" | "failed") -> lines answered since start, for /metrics."""
        self.queued_lines = 0
        """Pending lines of this gateway's open batches, as of the last look."""
        self._recent: deque[float] = deque()
        """When lines were answered in the last `RATE_WINDOW_S`."""

    @property
    def lines_in_flight(self) -> dict[str, int]:
        return {model: count for model, count in self._in_flight.items() if count}

    @property
    def lines_per_s(self) -> float:
        """Lines answered per second over the last minute."""
        horizon = time.monotonic() - RATE_WINDOW_S
        while self._recent and self._recent[0] < horizon:
            self._recent.popleft()
        return len(self._recent) / RATE_WINDOW_S

    def collector(self) -> Collector:
        return _BatchCollector(self)

    def wake(self) -> None:
        """Something changed (a batch created or cancelled, a line answered): look again now."""
        self._wake.set()

    async def run_forever(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self._tick()
            except Exception:
                logger.exception("batch dispatcher: a pass over the open batches failed; trying again")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=POLL_S)

    async def stop(self) -> None:
        """Lines in flight are cancelled (charged nothing, still pending): the next start runs them."""
        tasks = list(self._lines.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- one pass ----------------------------------------------------------------------------------------

    async def _tick(self) -> None:
        tide = self.state.tidal.at()
        for _, _, engine in self.state.fleet.engines():
            engine.set_batch_budget(tide.batch_budget)
        open_batches = await run_in_threadpool(batches.open_batches, self.db, self.owner)
        now = self.db.now()
        queued = 0
        for batch in open_batches:
            running = any(key[0] == batch.id for key in self._lines)
            if batch.status == "in_progress" and now < batch.expires_at:
                pending = await self._dispatch(batch, tide)
                queued += pending
                if pending or running:
                    continue
            elif running:
                if batch.status == "cancelling":  # stopped within seconds: running lines are charged nothing
                    self._abort_lines(batch.id)
                continue
            elif batch.status == "in_progress":
                expired = await run_in_threadpool(batch_results.expire_pending, self.db, batch.id)
                logger.info("batch %s: completion window passed, %d line(s) expired", batch.id, expired)
            closed = await run_in_threadpool(batch_results.finalize, self.db, self.store, batch.id)
            logger.info("batch %s %s: %s", closed.id, closed.status, closed.request_counts)
        self.queued_lines = queued

    def _abort_lines(self, batch_id: str) -> None:
        for (owner, _), task in self._lines.items():
            if owner == batch_id:
                task.cancel()

    async def _dispatch(self, batch: BatchInfo, tide: Tide) -> int:
        """Start what the models have room for; returns how many lines are still pending."""
        in_flight = sum(1 for key in self._lines if key[0] == batch.id)
        pending = await run_in_threadpool(
            batches.pending_lines,
            self.db,
            batch.id,
            after_line=0,
            limit=in_flight + 4 * tide.batch_lines_in_flight,
        )
        waiting = [line for line in pending if (batch.id, line.line) not in self._lines]
        if not waiting:
            return len(pending)
        principal: KeyPrincipal | PlatformError
        try:
            principal = await run_in_threadpool(active_principal_of_key, self.db, batch.key_id)
        except PlatformError as exc:  # the key was revoked or has expired: its lines fail with that error
            principal = exc
        clock = time.monotonic()
        for line in waiting:
            if self._in_flight[line.model] >= tide.batch_lines_in_flight:
                continue
            if self._paused_until.get(line.model, 0.0) > clock:
                continue
            self._in_flight[line.model] += 1
            task = asyncio.create_task(self._run(batch, line, principal), name=f"{batch.id}:{line.line}")
            self._lines[(batch.id, line.line)] = task
        return len(pending)

    # -- one line ----------------------------------------------------------------------------------------

    async def _run(
        self, batch: BatchInfo, line: PendingLine, principal: KeyPrincipal | PlatformError
    ) -> None:
        meters: list[Meter] = []
        origin = Origin(Priority.BATCH, batch.discount_bps, rate_limited=False, on_admitted=meters.append)
        request_id = f"{batch.id}-{line.line}"
        request = _line_request(batch.endpoint)
        try:
            response = await self._respond(batch, line, principal, origin, request, request_id)
            await self._answer(batch, line, request_id, response, meters)
        except Exception:
            logger.exception("batch %s line %d: answering failed; it stays pending", batch.id, line.line)
            self._paused_until[line.model] = time.monotonic() + RETRY_S  # not a tight loop of failures
        finally:
            for meter in meters:
                meter.release_soon()  # a no-op once settled; else the line is charged nothing
            del self._lines[(batch.id, line.line)]
            self._in_flight[line.model] -= 1
            self._wake.set()

    async def _respond(
        self,
        batch: BatchInfo,
        line: PendingLine,
        principal: KeyPrincipal | PlatformError,
        origin: Origin,
        request: Request,
        request_id: str,
    ) -> Response:
        try:
            if isinstance(principal, PlatformError):
                raise principal
            try:
                body = parse_body(batch.endpoint, line.body)
            except ValidationError as exc:  # checked at creation: only a server upgrade could get here
                message, param = validation_error(exc.errors())
                return error_response(400, message, param)
            return await self.routes[batch.endpoint](body, request, self.state, principal, request_id, origin)
        except Exception as exc:
            response = await handled_response(request, exc)
            if response is None:
                logger.exception("request %s: batch line failed", request_id)
                return internal_error_response(request_id)
            return response

    async def _answer(
        self, batch: BatchInfo, line: PendingLine, request_id: str, response: Response, meters: list[Meter]
    ) -> None:
        status, payload = response.status_code, response_json(response)
        if status == 503:  # loading, draining or full: the line waits its turn
            retry_after = float(response.headers.get("retry-after") or RETRY_S)
            self._paused_until[line.model] = time.monotonic() + min(retry_after, 10 * RETRY_S)
            return
        if status == 200:
            assert meters, "a batch line that succeeded was admitted"

            def write(session: Any) -> None:
                batches.record_answer(
                    session,
                    batch.id,
                    line.line,
                    status_code=200,
                    request_id=request_id,
                    result=payload,
                    now=now,
                )

            now = self.db.now()
            try:
                await meters[0].settle_answered(write)
            except LineAlreadyAnswered:
                logger.warning(
                    "batch %s line %d was answered elsewhere; not charged twice", batch.id, line.line
                )
                return
        else:
            await run_in_threadpool(
                batches.fail_line,
                self.db,
                batch.id,
                line.line,
                status_code=status,
                request_id=request_id,
                error=payload.get("error") or {},
            )
        self.lines_answered[(line.model, "succeeded" if status == 200 else "failed")] += 1
        self._recent.append(time.monotonic())


class _BatchCollector(Collector):
    """Read when /metrics is scraped. The engine's side (batch tokens vs live tokens per step, preemptions
    of batch work) is exported with the other engine figures."""

    def __init__(self, dispatcher: BatchDispatcher) -> None:
        self._dispatcher = dispatcher

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        d = self._dispatcher
        queued = GaugeMetricFamily("tokenmill_batch_queued_lines", "Lines of open batches not yet answered.")
        queued.add_metric([], float(d.queued_lines))
        in_flight = GaugeMetricFamily(
            "tokenmill_batch_lines_in_flight", "Batch lines being answered now.", labels=["model"]
        )
        for model, count in d.lines_in_flight.items():
            in_flight.add_metric([model], float(count))
        answered = CounterMetricFamily(
            "tokenmill_batch_lines_answered", "Batch lines answered.", labels=["model", "outcome"]
        )
        for (model, outcome), count in d.lines_answered.items():
            answered.add_metric([model, outcome], float(count))
        yield from (queued, in_flight, answered)


def _line_request(endpoint: str) -> Request:
    """What a route reads of its HTTP request: the receive channel, on which no disconnect ever comes."""

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    scope = {
        "type": "http",
        "method": "POST",
        "path": endpoint,
        "headers": [],
        "query_string": b"",
        "state": {},
    }
    return Request(scope, receive)
