"""ProcessEngine: an engine replica in a worker process, behind the same `EngineClient` as the in-process
`AsyncLLM`, so the router, metering, abort-on-disconnect and /metrics need no change.

The worker sends, per engine step, one message with every request's news (deltas, `snapshots.py`); a reader
thread hands it to the event loop in one callback, which updates each request's totals and wakes its
reader. A slow reader skips straight to the newest snapshot. When the worker dies, its connection closes:
every request in flight on it ends at once with `EngineError`, new ones are refused the same way, and
(unless turned off) a new worker is started after a pause that doubles with each failure in a row."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tokenmill.cluster.protocol import FitLimits, WorkerOptions
from tokenmill.cluster.snapshots import OutputDelta, SnapshotBuilder
from tokenmill.cluster.stats import StatsAcrossWorkers
from tokenmill.cluster.worker_process import WorkerProcess
from tokenmill.config import BatchBudget, EngineConfig
from tokenmill.engine.block_pool import BlockPool
from tokenmill.engine.client import EngineError, EngineStats
from tokenmill.engine.request import RequestOutput
from tokenmill.engine.sampling_params import Guidance, InvalidRequestError, SamplingParams
from tokenmill.engine.scheduler import Scheduler

if TYPE_CHECKING:
    from tokenmill.engine.lora import LoRARequest

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0
"""How long a stopping worker may take to exit before it is killed."""
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
HEALTHY_AFTER_S = 60.0
"""A worker that ran this long before it died restarts after the first pause again: not a crash loop."""
HUNG_AFTER_S = 60.0
"""A worker says it is alive every second (`worker.HEARTBEAT_S`), whatever its steps do: one silent this long
is stuck (stopped, or wedged holding the GIL) and is killed, then restarted like a crashed one."""


@dataclass(slots=True)
class _Stream:
    builder: SnapshotBuilder
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    error: Exception | None = None

    def fail(self, error: Exception) -> None:
        if not self.builder.finished:  # a finished request keeps its last snapshot
            self.error = error
            self.ready.set()


class ProcessEngine:
    def __init__(
        self,
        model: str | None = None,
        *,
        torch_threads: int | None = None,
        auto_restart: bool = True,
        hung_after_s: float | None = HUNG_AFTER_S,
        **engine_kwargs: object,
    ) -> None:
        """As `AsyncLLM(model, **engine_kwargs)`, and like it slow (the worker loads the model before this
        returns): call it from a worker thread. `torch_threads`: the worker's CPU threads (None: all cores).
        `auto_restart`: start a new worker after one dies; otherwise only `restart()` does. `hung_after_s`:
        kill a worker silent this long (None: never)."""
        self.config = EngineConfig.from_kwargs(model, **engine_kwargs)
        self.auto_restart = auto_restart
        self.hung_after_s = hung_after_s
        self._last_heard_s = 0.0
        """When the serving worker last reported (written by the reader thread)."""
        self._watchdog: asyncio.Task[None] | None = None
        self._options = WorkerOptions(torch_threads, logging.getLogger().getEffectiveLevel())
        loaded = self._new_worker()
        info = loaded.info
        assert info.tokenizer is not None
        self.model_id: str = info.model_id
        self.max_model_len: int = info.fit.max_model_len
        self.tokenizer = info.tokenizer
        self._options = dataclasses.replace(self._options, send_tokenizer=False)
        self._fits = _fit_checker(info.fit)
        self._loaded: WorkerProcess | None = loaded
        """Loaded by the constructor, not yet serving: `start()` takes it."""
        self._worker: WorkerProcess | None = None
        """The worker serving requests; None before start, while restarting and after shutdown."""
        self._worker_started_s = 0.0
        self._down_reason = "the engine is not running; call start() first"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, _Stream] = {}
        self._stats = StatsAcrossWorkers(info.stats)
        self._batch_budget: BatchBudget | None = None
        self._replace_lock = asyncio.Lock()
        self._restart_task: asyncio.Task[None] | None = None
        self._failures_in_a_row = 0
        self._closing = False

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """Serving now. False before start, after the worker died (until a new one is up), after shutdown."""
        worker = self._worker
        return worker is not None and worker.alive

    @property
    def pid(self) -> int | None:
        """The serving worker's process id."""
        worker = self._worker
        return worker.pid if worker is not None else None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._closing = False
        if self.hung_after_s is not None and self._watchdog is None:
            self._watchdog = self._loop.create_task(
                self._watch(self.hung_after_s), name=f"watch {self.model_id}"
            )
        async with self._replace_lock:
            if self._worker is not None:
                return
            if self._loaded is not None:
                loaded, self._loaded = self._loaded, None
                self._attach(loaded)
            else:  # started again after a shutdown
                await self._spawn()

    async def restart(self) -> None:
        """A fresh worker in place of the current one, whether it runs, hangs or died: requests in flight on
        the old one end with EngineError. Raises the new worker's load error."""
        self._cancel_restart_task()
        async with self._replace_lock:
            old = self._worker
            if old is not None:
                self._retire("the engine is restarting")
                await asyncio.to_thread(old.stop, STOP_TIMEOUT_S)
            await self._spawn()

    async def shutdown(self) -> None:
        """Stops the worker (it takes no new work and exits; killed after STOP_TIMEOUT_S). Requests still in
        flight end with EngineError. `start()` may start a new worker later."""
        self._closing = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        task = self._cancel_restart_task()
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
        async with self._replace_lock:
            workers = [w for w in (self._worker, self._loaded) if w is not None]
            self._loaded = None
            if self._worker is not None:
                self._retire("the engine shut down")
            await asyncio.gather(*(asyncio.to_thread(w.stop, STOP_TIMEOUT_S) for w in workers))

    # -- requests ----------------------------------------------------------------------------------

    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Answered here, exactly: the scheduler's own check over the worker's limits (no round trip)."""
        self._fits.check_fits(num_prompt_tokens, max_tokens)

    def check_guidance(self, guidance: Guidance) -> None:
        """Compiled (and cached) by the worker; this thread waits for its answer. Thread-safe; not for the
        event loop."""
        self._serving_worker().call("guidance", guidance)

    def check_lora(self, lora: LoRARequest) -> None:
        """Checked (and cached) by the worker, which reads the adapter's files; this thread waits for its
        answer. Thread-safe; not for the event loop."""
        self._serving_worker().call("lora", lora)

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        worker = self._serving_worker()
        if request_id in self._streams:
            raise InvalidRequestError(f"request_id: {request_id!r} is already running", param="request_id")
        stream = _Stream(SnapshotBuilder(request_id, prompt if isinstance(prompt, str) else None))
        self._streams[request_id] = stream
        finished = False
        try:
            # The worker validates before any work, as AsyncLLM does; a refusal is this stream's first news.
            worker.send(("add", request_id, prompt, params))
            while not finished:
                await stream.ready.wait()
                stream.ready.clear()
                if stream.error is not None:
                    raise stream.error
                output = stream.builder.snapshot()
                finished = output.finished
                yield output
        finally:
            if self._streams.get(request_id) is stream:
                del self._streams[request_id]
            if not finished and stream.error is None:
                _send_quietly(worker, ("abort", request_id))

    async def abort(self, request_id: str) -> None:
        worker = self._worker
        if worker is not None:
            _send_quietly(worker, ("abort", request_id))

    def stats(self) -> EngineStats:
        """The worker's last report (it reports after every step, and on each idle wake-up), plus the totals
        of the workers before it. Thread-safe; never waits for the worker."""
        return self._stats.current()

    def set_batch_budget(self, budget: BatchBudget) -> None:
        """Thread-safe; remembered, so a restarted worker gets it too."""
        self._batch_budget = budget
        worker = self._worker
        if worker is not None:
            _send_quietly(worker, ("budget", budget))

    # -- workers -----------------------------------------------------------------------------------

    def _new_worker(self) -> WorkerProcess:
        """A worker that has loaded the model; blocking. (RayEngine starts a Ray actor instead.)"""
        return WorkerProcess(self.config, self._options)

    def _serving_worker(self) -> WorkerProcess:
        worker = self._worker
        if worker is None:
            raise EngineError(self._down_reason)
        return worker

    async def _spawn(self) -> None:
        """Start a worker and make it the serving one (the caller holds the replace lock)."""
        loop = asyncio.get_running_loop()
        spawning = loop.run_in_executor(None, self._new_worker)
        try:
            worker = await asyncio.shield(spawning)
        except asyncio.CancelledError:
            spawning.add_done_callback(_stop_unused)  # it still loads: stop it once it has
            raise
        if self._closing:
            await asyncio.to_thread(worker.stop, STOP_TIMEOUT_S)
            raise EngineError("the engine shut down while its worker was starting")
        self._attach(worker)

    def _attach(self, worker: WorkerProcess) -> None:
        self._worker = worker
        self._worker_started_s = self._last_heard_s = time.monotonic()
        self._stats.serve(worker, worker.info.stats)
        worker.start_reading(
            on_step=lambda message: self._on_step(worker, message),
            on_lost=lambda: self._post(self._on_lost, worker),
        )
        if self._batch_budget is not None:
            _send_quietly(worker, ("budget", self._batch_budget))
        logger.info("engine worker pid %s serves %s", worker.pid, self.model_id)

    def _retire(self, reason: str) -> None:
        """The serving worker serves no more: its requests end with EngineError(reason), its totals carry on
        in stats()."""
        self._worker = None
        self._down_reason = reason
        self._stats.retire()
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.fail(EngineError(reason))

    # -- from the reader thread --------------------------------------------------------------------

    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody is left to tell
            logger.debug("engine worker message after the event loop closed")

    def _on_step(self, worker: WorkerProcess, message: tuple) -> None:
        if worker is self._worker:
            self._last_heard_s = time.monotonic()
        if message[0] == "alive":
            return
        _, deltas, failures, stats = message
        self._stats.report(worker, stats)
        if deltas or failures:
            self._post(self._deliver, worker, deltas, failures)

    # -- on the event loop -------------------------------------------------------------------------

    def _deliver(
        self, worker: WorkerProcess, deltas: list[OutputDelta], failures: list[tuple[str, Exception]]
    ) -> None:
        if worker is not self._worker:
            return
        for delta in deltas:
            stream = self._streams.get(delta.request_id)
            if stream is not None:
                stream.builder.apply(delta)
                stream.ready.set()
        for request_id, error in failures:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.fail(error)

    def _on_lost(self, worker: WorkerProcess) -> None:
        if worker is not self._worker:
            return  # retired on purpose (restart, shutdown): its requests were ended then
        error = worker.lost_error()
        logger.error("%s; failing %d request(s) of %s", error, len(self._streams), self.model_id)
        self._retire(str(error))
        if time.monotonic() - self._worker_started_s >= HEALTHY_AFTER_S:
            self._failures_in_a_row = 0
        if self.auto_restart and not self._closing:
            self._restart_task = asyncio.get_running_loop().create_task(
                self._restart_with_backoff(), name=f"restart {self.model_id} worker"
            )

    async def _watch(self, hung_after_s: float) -> None:
        """Kills the serving worker once it has been silent for `hung_after_s`: its death is then handled as
        any other (its requests end with EngineError, a new worker starts)."""
        while True:
            await asyncio.sleep(min(hung_after_s / 4, 5.0))
            worker = self._worker
            silent_s = time.monotonic() - self._last_heard_s
            if worker is not None and worker.alive and silent_s > hung_after_s:
                logger.error(
                    "engine worker pid %s of %s sent nothing for %.0f s: killing it",
                    worker.pid,
                    self.model_id,
                    silent_s,
                )
                await asyncio.to_thread(worker.kill)

    async def _restart_with_backoff(self) -> None:
        while not self._closing:
            delay = min(FIRST_BACKOFF_S * 2**self._failures_in_a_row, MAX_BACKOFF_S)
            self._failures_in_a_row += 1
            logger.warning("restarting the engine worker of %s in %.1f s", self.model_id, delay)
            await asyncio.sleep(delay)
            async with self._replace_lock:
                if self._worker is not None or self._closing:
                    return  # restarted by hand meanwhile, or shut down
                try:
                    await self._spawn()
                    return
                except Exception as error:  # noqa: BLE001 - logged; the next attempt waits longer
                    logger.error("restarting the engine worker of %s failed: %s", self.model_id, error)

    def _cancel_restart_task(self) -> asyncio.Task[None] | None:
        task, self._restart_task = self._restart_task, None
        if task is not None and not task.done():
            task.cancel()
            return task
        return None


def _fit_checker(fit: FitLimits) -> Scheduler:
    """A scheduler over a pool of the worker's size, used for nothing but `check_fits`."""
    return Scheduler(
        BlockPool(fit.num_blocks, fit.block_size, enable_prefix_caching=False),
        max_num_batched_tokens=fit.max_num_batched_tokens,
        max_num_seqs=fit.max_num_seqs,
        max_model_len=fit.max_model_len,
        sliding_window=fit.sliding_window,
    )


def _send_quietly(worker: WorkerProcess, message: tuple) -> None:
    """For messages that matter only to a live worker (a dead one has freed everything)."""
    with contextlib.suppress(EngineError):
        worker.send(message)


def _stop_unused(spawning: asyncio.Future[WorkerProcess]) -> None:
    if spawning.cancelled() or spawning.exception() is not None:
        return
    threading.Thread(target=spawning.result().stop, args=(STOP_TIMEOUT_S,), daemon=True).start()
