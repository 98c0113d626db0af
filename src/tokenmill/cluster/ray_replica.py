"""The Ray actor of a `RayEngine` replica: one engine in a Ray worker process, on whichever node Ray placed
it. It runs the very loop of a ProcessEngine worker (`worker.StepLoop`: apply commands, step, one message of
every request's news per step) over an in-memory pipe instead of a socket: commands arrive as actor calls,
and the step messages leave through one streaming generator that the gateway reads for the actor's life.

The gateway side is `ray_engine.py`; this module is kept apart because it is what a Ray worker imports."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import ray
import torch

from tokenmill.cluster.protocol import WorkerInfo, WorkerOptions
from tokenmill.cluster.worker import StepLoop, portable, refusal, worker_info
from tokenmill.config import EngineConfig
from tokenmill.engine.llm_engine import LLMEngine

if TYPE_CHECKING:
    from tokenmill.engine.lora import LoRARequest
    from tokenmill.engine.sampling_params import Guidance

CHECK_THREADS = 2
"""Calls that may take a while (compiling a grammar, reading an adapter) run in a group of their own, so
they never hold up the commands, whose calls take microseconds."""


class _Pipe:
    """What `StepLoop` asks of its connection: `recv` blocks for the next command, `send` queues a message for
    the event stream, `close` ends the stream."""

    def __init__(self) -> None:
        self.inbox: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self.outbox: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()

    def recv(self) -> tuple:
        return self.inbox.get()

    def send(self, message: tuple) -> None:
        self.outbox.put(message)

    def close(self) -> None:
        self.outbox.put(None)


@ray.remote(concurrency_groups={"checks": CHECK_THREADS})
class EngineReplica:
    def __init__(self, config: EngineConfig, options: WorkerOptions) -> None:
        """Loads the engine. A load error is kept for `ready()` to return as it is: raised here, it would reach
        the gateway only as Ray's ActorDiedError around a traceback."""
        logging.getLogger("tokenmill").setLevel(options.log_level)
        if options.torch_threads is not None:  # otherwise Ray's OMP_NUM_THREADS: the actor's num_cpus
            torch.set_num_threads(options.torch_threads)
        self._send_tokenizer = options.send_tokenizer
        self._pipe = _Pipe()
        self._order_lock = threading.Lock()
        self._next_command = 0
        self._early: dict[int, tuple] = {}
        try:
            self._engine: LLMEngine | None = LLMEngine(config)
            self._load_error: Exception | None = None
        except Exception as error:  # noqa: BLE001 - the gateway raises it from its constructor
            self._engine, self._load_error = None, portable(error)
            return
        threading.Thread(target=StepLoop(self._engine, self._pipe).run, name="replica", daemon=True).start()

    def ready(self) -> tuple:
        """("ready", WorkerInfo, (node id, node ip, pid)) or ("failed", the load error)."""
        if self._engine is None:
            return ("failed", self._load_error)
        info: WorkerInfo = worker_info(self._engine, self._send_tokenizer)
        where = (ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(), os.getpid())
        return ("ready", info, where)

    def send(self, number: int, command: tuple) -> None:
        """Commands are numbered by the gateway and applied in that order: Ray runs a threaded actor's calls
        in any order, and an abort that overtook its add would leave the request running."""
        with self._order_lock:
            self._early[number] = command
            while self._next_command in self._early:
                self._pipe.inbox.put(self._early.pop(self._next_command))
                self._next_command += 1

    def events(self) -> Iterator[list[tuple]]:
        """The step messages, for the gateway to call once with num_returns="streaming". Whatever has piled
        up goes as one item (usually a single step's message): each item costs Ray a report to the gateway."""
        while True:
            batch = [self._pipe.outbox.get()]
            with contextlib.suppress(queue.Empty):
                while batch[-1] is not None:
                    batch.append(self._pipe.outbox.get_nowait())
            if batch[-1] is None:  # the loop stopped
                if len(batch) > 1:
                    yield batch[:-1]
                return
            yield batch

    @ray.method(concurrency_group="checks")
    def check(self, kind: str, argument: Guidance | LoRARequest) -> Exception | None:
        """The refusal is returned, not raised, for the same reason as a load error. Both checks are
        thread-safe beside the step loop."""
        assert self._engine is not None
        try:
            if kind == "guidance":
                self._engine.check_guidance(argument)  # type: ignore[arg-type]
            else:
                self._engine.check_lora(argument)  # type: ignore[arg-type]
        except Exception as error:  # noqa: BLE001 - the answer to the call
            return refusal(error, f"{kind} check")
        return None
