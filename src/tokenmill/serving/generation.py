"""Running engine requests for HTTP: surface validation errors before any response header is sent, and
abort the engine request the moment nobody will read its output (client gone, request cancelled)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import aclosing
from typing import Any, TypeVar

from starlette.types import Receive

from tokenmill.engine.client import EngineClient, EngineError
from tokenmill.engine.request import RequestOutput
from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.serving.deltas import DeltaTracker
from tokenmill.serving.errors import ClientDisconnected
from tokenmill.serving.metrics import RequestTimer

logger = logging.getLogger(__name__)

T = TypeVar("T")
Spawn = Callable[[Coroutine[Any, Any, None]], None]


class EngineRequest:
    """One prompt's request in the engine. `close()` is synchronous on purpose: it runs in `finally` blocks
    of cancelled tasks, where any await would itself be cancelled, so the abort goes to a background task."""

    def __init__(
        self,
        engine: EngineClient,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str,
        spawn: Spawn,
        reroute: Callable[[EngineClient], EngineClient | None] | None = None,
        prompt_done: Callable[[RequestOutput], None] | None = None,
    ) -> None:
        """`reroute(failed engine)`: another replica to submit to when this one fails before the first
        output (the ticket's `reroute`), or None; `prompt_done(first output)`: told once the prompt is
        computed (the ticket's `prompt_done`, for the router's count of work outstanding)."""
        self.engine = engine
        self.prompt = prompt
        self.params = params
        self.request_id = request_id
        self._spawn = spawn
        self._reroute = reroute
        self._prompt_done = prompt_done
        self._outputs: AsyncIterator[RequestOutput] | None = None
        self._first: RequestOutput | None = None
        self.finished = False
        self._closed = False

    async def start(self) -> None:
        """Submit and wait for the first output: the engine validates on submission, and its errors must
        become a 400 while the HTTP status can still say so. A replica that fails before that (its worker
        died) hands the request to another one: the client has seen nothing yet."""
        while True:
            self._outputs = self.engine.generate(self.prompt, self.params, self.request_id)
            try:
                self._first = await anext(self._outputs)
                break
            except StopAsyncIteration:
                raise RuntimeError(f"engine ended request {self.request_id} without any output") from None
            except EngineError as error:
                engine = None if self._reroute is None else self._reroute(self.engine)
                if engine is None:
                    raise
                logger.warning("request %s: %s; submitted again to another replica", self.request_id, error)
                self.engine = engine
        self.finished = self._first.finished
        if self._prompt_done is not None:
            self._prompt_done(self._first)

    async def outputs(self) -> AsyncGenerator[RequestOutput, None]:
        """Cumulative snapshots, the one `start()` waited for first."""
        assert self._outputs is not None and self._first is not None, "start() first"
        first, self._first = self._first, None
        if first is not None:
            yield first
        async for output in self._outputs:
            self.finished = output.finished
            yield output

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.finished and self._outputs is not None:
            self._spawn(self._abandon(self._outputs))

    async def _abandon(self, outputs: AsyncIterator[RequestOutput]) -> None:
        aclose = getattr(outputs, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except RuntimeError as exc:  # still running in a task that is being cancelled right now
                logger.debug("request %s: closing its output stream: %s", self.request_id, exc)
        await self.engine.abort(self.request_id)
        logger.info("request %s aborted", self.request_id)


async def start_requests(receive: Receive, requests: list[EngineRequest]) -> None:
    """Submit all; afterwards the caller owns closing them (normally via `collect_outputs` or SSEResponse)."""
    try:
        await until_disconnected(receive, start_all(requests))
    except BaseException:
        close_all(requests)
        raise


async def collect_outputs(
    receive: Receive, requests: list[EngineRequest], tracker: DeltaTracker, timer: RequestTimer
) -> list[RequestOutput]:
    """The final snapshot of each request (non-streaming responses), feeding the tracker and the timer."""

    async def collect() -> list[RequestOutput]:
        finals: list[RequestOutput | None] = [None] * len(requests)
        async with aclosing(merged(requests)) as outputs:
            async for index, output in outputs:
                deltas = tracker.update(index, output)
                timer.on_tokens(max((d.num_new_tokens for d in deltas), default=0))
                finals[index] = output
        assert all(final is not None for final in finals)
        return finals  # type: ignore[return-value]

    try:
        return await until_disconnected(receive, collect())
    except ClientDisconnected:
        raise
    except Exception:
        timer.failed()
        raise
    finally:
        close_all(requests)
        timer.finish(tracker.num_prompt_tokens, tracker.num_completion_tokens)


async def start_all(requests: list[EngineRequest]) -> None:
    """Start every request concurrently; on any failure, the others are closed and the first error raised
    (all have settled by then, so nothing is left half-submitted)."""
    results = await asyncio.gather(*(r.start() for r in requests), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        close_all(requests)
        raise errors[0]


def close_all(requests: list[EngineRequest]) -> None:
    for request in requests:
        request.close()


async def merged(requests: list[EngineRequest]) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """(prompt index, snapshot) from all requests as they come. Consumers must close this generator (or
    call `close_all`) if they stop early."""
    if len(requests) == 1:
        async with aclosing(requests[0].outputs()) as outputs:
            async for output in outputs:
                yield 0, output
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, request: EngineRequest) -> None:
        try:
            async with aclosing(request.outputs()) as outputs:
                async for output in outputs:
                    queue.put_nowait((index, output))
        except Exception as exc:  # noqa: BLE001 - re-raised by the consumer below
            queue.put_nowait((index, exc))
            return
        queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


async def until_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """Await `work`, unless the client disconnects first: then `work` is cancelled (its cleanup aborts the
    engine requests) and ClientDisconnected raised. Starlette does not notice the disconnect of a
    non-streaming request by itself."""
    work_task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
    try:
        await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work_task.done():
            work_task.cancel()
    if work_task.done() and not work_task.cancelled():
        return work_task.result()
    await asyncio.gather(work_task, return_exceptions=True)
    raise ClientDisconnected()


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
