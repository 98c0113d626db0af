"""AsyncLLM: the engine for the server. The step loop runs on its own thread (forward passes release the
GIL, so the event loop keeps serving HTTP); each request gets a stream of cumulative snapshots."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from tokenmill.config import BatchBudget, EngineConfig
from tokenmill.engine.client import EngineError, EngineStats
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.engine.lora import LoRARequest
from tokenmill.engine.request import RequestOutput
from tokenmill.engine.sampling_params import Guidance, InvalidRequestError, Priority, SamplingParams

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]
    final_only: bool = False
    """Batch work: nobody reads it token by token, so only its last snapshot crosses to the event loop
    (each one costs the loop a wake-up that live streams would wait behind)."""

    def push(self, item: RequestOutput | BaseException) -> None:
        if self.final_only and isinstance(item, RequestOutput) and not item.finished:
            return
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncLLM:
    def __init__(self, model: str | None = None, **engine_kwargs: object) -> None:
        self.engine = LLMEngine(EngineConfig.from_kwargs(model, **engine_kwargs))
        self.model_id = self.engine.model_id
        self.max_model_len = self.engine.max_model_len
        self.tokenizer = self.engine.tokenizer
        self._commands: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._thread is None:
            self._stopping.clear()
            self._thread = threading.Thread(target=self._run, name=f"engine-{self.model_id}", daemon=True)
            self._thread.start()

    async def shutdown(self) -> None:
        if self._thread is not None:
            self._stopping.set()
            self._commands.put(("wake",))
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    # -- requests ----------------------------------------------------------------------------------

    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        self.engine.scheduler.check_fits(num_prompt_tokens, max_tokens)

    def check_guidance(self, guidance: Guidance) -> None:
        """Compiles (and caches) the grammar; raises InvalidRequestError (code invalid_grammar, naming
        guidance.param). Thread-safe: meant to be called from a worker thread while the engine runs."""
        self.engine.check_guidance(guidance)

    def check_lora(self, lora: LoRARequest) -> None:
        """Validates (and caches) the adapter; raises InvalidRequestError(param="model") for one this engine
        cannot serve. Reads files: call it from a worker thread. Thread-safe."""
        self.engine.check_lora(lora)

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        if self._thread is None:
            raise EngineError("the engine is not running; call start() first")
        if params.guidance is not None:
            # Compiling a large schema takes a while: not on the event loop (usually it is a cache hit).
            # Before the checks below, so no await separates the request_id check from the registration.
            await asyncio.to_thread(self.check_guidance, params.guidance)
        if params.lora is not None:
            await asyncio.to_thread(self.check_lora, params.lora)  # reads the adapter's files once
        if request_id in self._streams:
            raise InvalidRequestError(f"request_id: {request_id!r} is already running", param="request_id")
        prompt_ids = self.engine.encode(prompt)
        self.engine.scheduler.check_fits(len(prompt_ids), params.max_tokens)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), params.priority is Priority.BATCH)
        self._streams[request_id] = stream
        self._commands.put(
            ("add", request_id, prompt_ids, params, prompt if isinstance(prompt, str) else None)
        )
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                # Snapshots are cumulative: a slow reader skips straight to the newest one.
                while not isinstance(item, BaseException) and not item.finished and not stream.queue.empty():
                    item = stream.queue.get_nowait()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._commands.put(("abort", request_id))

    @property
    def healthy(self) -> bool:
        """In the server's own process: it serves as long as the server runs."""
        return True

    async def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def set_batch_budget(self, budget: BatchBudget) -> None:
        """Thread-safe without a command (see `LLMEngine.set_batch_budget`)."""
        self.engine.set_batch_budget(budget)

    # -- the engine thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            block = not self.engine.has_unfinished
            try:
                self._apply(self._commands.get(block=block))
                while True:
                    self._apply(self._commands.get_nowait())
            except queue.Empty:
                pass
            if self.engine.has_unfinished:
                self._step()

    def _apply(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, request_id, prompt_ids, params, prompt = command
            if request_id not in self._streams:
                return  # the caller went away before the engine saw the request
            try:
                self.engine.add_request(request_id, prompt_ids, params, prompt, stream=True)
            except InvalidRequestError as error:
                self._streams[request_id].push(error)
        elif kind == "abort":
            final = self.engine.abort(command[1])
            stream = self._streams.get(command[1])
            if final is not None and stream is not None:  # aborted from outside: its reader gets the end
                stream.push(final)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as error:  # noqa: BLE001 - reported to every waiting request, then logged
            logger.exception("engine step failed; failing %d running requests", len(self._streams))
            for request_id, stream in list(self._streams.items()):
                self.engine.abort(request_id)
                stream.push(EngineError(f"engine failure: {type(error).__name__}"))
            return
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                stream.push(output)
