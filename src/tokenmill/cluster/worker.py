"""The worker process of a `ProcessEngine` replica: one engine in its own OS process (its own GIL and CPU
threads), serving one gateway over a duplex connection (`protocol.py` lists the messages). Started as
`python -m tokenmill.cluster.worker FD`, FD being its end of a socket pair, so it imports only the engine,
never the gateway's main module (as multiprocessing's "spawn" would) nor anything of the server.

The loop is AsyncLLM's (apply commands, step, publish) over the same `LLMEngine`, without an event loop:
nobody here awaits per request, and one message per step carrying every request's news keeps the cost per
token low.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection

import torch

from tokenmill.cluster.protocol import FitLimits, WorkerInfo, WorkerOptions
from tokenmill.cluster.snapshots import OutputDelta, SnapshotEncoder
from tokenmill.config import EngineConfig
from tokenmill.engine.client import EngineError
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.engine.sampling_params import InvalidRequestError, Priority, SamplingParams

logger = logging.getLogger(__name__)

CHECK_THREADS = 2
"""Threads compiling grammars and reading adapters, off the step loop and off the connection's reader."""
HEARTBEAT_S = 1.0
"""How often a worker says it is alive, from a thread of its own: also while a long step runs (torch and the
kernels let go of the GIL), never when the process is stopped or stuck holding the GIL. The gateway takes a
worker it has not heard from in a long while for hung (`process_engine.HUNG_AFTER_S`)."""


def main(argv: list[str]) -> None:
    # Ctrl-C reaches the whole process group; the gateway decides when its workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(int(argv[0]))
    try:
        kind, config, options = conn.recv()
    except (EOFError, OSError):
        return  # the gateway went away before saying what to load
    assert kind == "load", kind
    serve(conn, config, options)


def serve(conn: Connection, config: EngineConfig, options: WorkerOptions) -> None:
    """Load the engine, say so, then serve until told to stop or the gateway is gone."""
    logging.basicConfig(
        level=options.log_level, format="%(asctime)s worker %(process)d %(name)s: %(message)s"
    )
    if options.torch_threads is not None:
        torch.set_num_threads(options.torch_threads)
    try:
        engine = LLMEngine(config)
    except Exception as error:  # noqa: BLE001 - the gateway raises it from its constructor
        conn.send(("failed", portable(error)))
        conn.close()
        return
    conn.send(("ready", worker_info(engine, options.send_tokenizer)))
    StepLoop(engine, conn).run()


def portable(error: Exception) -> Exception:
    """The error itself if it survives pickling, else an EngineError naming it."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:  # noqa: BLE001 - any failure to round-trip means: send a plain one
        return EngineError(f"{type(error).__name__}: {error}")
    return error


def worker_info(engine: LLMEngine, send_tokenizer: bool) -> WorkerInfo:
    scheduler = engine.scheduler
    fit = FitLimits(
        max_model_len=scheduler.max_model_len,
        num_blocks=scheduler.pool.num_blocks,
        block_size=scheduler.block_size,
        max_num_batched_tokens=scheduler.max_num_batched_tokens,
        max_num_seqs=scheduler.max_num_seqs,
        sliding_window=scheduler.window.window,
    )
    return WorkerInfo(engine.model_id, fit, engine.stats(), engine.tokenizer if send_tokenizer else None)


class StepLoop:
    """The step loop on the main thread; a reader thread turns messages into commands (checks go to their
    own threads and answer directly, so a slow grammar never holds up a step or an abort)."""

    def __init__(self, engine: LLMEngine, conn: Connection) -> None:
        self.engine = engine
        self.conn = conn
        self.send_lock = threading.Lock()
        self.commands: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self.checks = ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="worker-check")
        self.encoder = SnapshotEncoder()
        self.running: set[str] = set()
        """Requests in the engine whose last snapshot has not been sent."""
        self.preparing: set[str] = set()
        """Requests whose grammar or adapter is being checked before they are added."""
        self.final_only: set[str] = set()
        """Batch work: only its last snapshot crosses the connection (nobody reads it token by token)."""
        self.deltas: list[OutputDelta] = []
        self.failures: list[tuple[str, Exception]] = []
        """What the next message carries besides the step's own news."""
        self.stopping = False

    def run(self) -> None:
        threading.Thread(target=self._read, name="worker-reader", daemon=True).start()
        threading.Thread(target=self._beat, name="worker-heartbeat", daemon=True).start()
        # Steps run on a thread of their own, as in AsyncLLM, so a replica computes exactly as the in-process
        # engine does: torch's CPU parallelism differs between the main thread and others (on a busy 2-core
        # machine the main thread's steps were 4x slower).
        loop = threading.Thread(target=self._loop, name="worker-engine")
        loop.start()
        loop.join()

    def _loop(self) -> None:
        try:
            while not self.stopping:
                self._apply_commands(block=not self.engine.has_unfinished)
                if self.engine.has_unfinished and not self.stopping:
                    self._step()
                deltas, failures, self.deltas, self.failures = self.deltas, self.failures, [], []
                self._send(("step", deltas, failures, self.engine.stats()))
        finally:
            self.checks.shutdown(wait=False, cancel_futures=True)
            self.conn.close()

    # -- messages in ---------------------------------------------------------------------------------

    def _read(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):  # the gateway is gone: nobody is left to serve
                message = ("shutdown",)
            if message[0] == "check":
                self.checks.submit(self._check, *message[1:])
                continue
            self.commands.put(message)
            if message[0] == "shutdown":
                return

    def _apply_commands(self, block: bool) -> None:
        try:
            self._apply(self.commands.get(block=block))
            while True:
                self._apply(self.commands.get_nowait())
        except queue.Empty:
            pass

    def _apply(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, request_id, prompt, params = command
            if params.guidance is None and params.lora is None:
                self._add(request_id, prompt, params)
            else:  # compiling a grammar or reading an adapter takes a while: not on the step loop
                self.preparing.add(request_id)
                self.checks.submit(self._prepare, request_id, prompt, params)
        elif kind == "prepared":
            _, request_id, prompt, params, error = command
            if request_id not in self.preparing:
                return  # aborted while it was being checked
            self.preparing.discard(request_id)
            if error is not None:
                self.failures.append((request_id, error))
            else:
                self._add(request_id, prompt, params)
        elif kind == "abort":
            self._abort(command[1])
        elif kind == "budget":
            self.engine.set_batch_budget(command[1])
        elif kind == "shutdown":
            self.stopping = True

    def _add(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        try:
            prompt_ids = self.engine.encode(prompt)
            text = prompt if isinstance(prompt, str) else None
            self.engine.add_request(request_id, prompt_ids, params, text, stream=True)
        except Exception as error:  # noqa: BLE001 - refused requests are answered, the loop goes on
            self.failures.append((request_id, refusal(error, request_id)))
            return
        self.running.add(request_id)
        if params.priority is Priority.BATCH:
            self.final_only.add(request_id)

    def _abort(self, request_id: str) -> None:
        self.preparing.discard(request_id)
        if request_id not in self.running:
            return
        final = self.engine.abort(request_id)  # frees its KV blocks now
        self._forget(request_id)
        if final is not None:  # a reader still waiting (an abort from outside) sees the request end
            self.deltas.append(self.encoder.encode(final))

    def _forget(self, request_id: str) -> None:
        self.running.discard(request_id)
        self.final_only.discard(request_id)
        self.encoder.forget(request_id)

    # -- checks, on their threads ----------------------------------------------------------------------

    def _check(self, call_id: int, kind: str, argument: object) -> None:
        error = None
        try:
            if kind == "guidance":
                self.engine.check_guidance(argument)  # type: ignore[arg-type]
            elif kind == "lora":
                self.engine.check_lora(argument)  # type: ignore[arg-type]
            else:
                raise ValueError(f"unknown check {kind!r}")
        except Exception as exc:  # noqa: BLE001 - the answer to the call
            error = refusal(exc, f"check {call_id}")
        self._send(("reply", call_id, error))

    def _prepare(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        error = None
        try:
            if params.guidance is not None:
                self.engine.check_guidance(params.guidance)
            if params.lora is not None:
                self.engine.check_lora(params.lora)
        except Exception as exc:  # noqa: BLE001 - refused requests are answered
            error = refusal(exc, request_id)
        self.commands.put(("prepared", request_id, prompt, params, error))

    # -- the engine ------------------------------------------------------------------------------------

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as error:  # noqa: BLE001 - reported to every waiting request, then logged
            logger.exception("engine step failed; failing %d running requests", len(self.running))
            for request_id in list(self.running):
                self.engine.abort(request_id)
                self._forget(request_id)
                self.failures.append((request_id, EngineError(f"engine failure: {type(error).__name__}")))
            return
        for output in outputs:
            if output.finished:
                self.running.discard(output.request_id)
                self.final_only.discard(output.request_id)
            elif output.request_id in self.final_only:
                continue
            self.deltas.append(self.encoder.encode(output))

    def _beat(self) -> None:
        while not self.stopping:
            time.sleep(HEARTBEAT_S)
            self._send(("alive",))

    def _send(self, message: tuple) -> None:
        try:
            with self.send_lock:
                self.conn.send(message)
        except OSError:  # the gateway is gone; the reader sees it too and stops the loop
            self.commands.put(("shutdown",))


def refusal(error: Exception, what: str) -> Exception:
    """InvalidRequestError goes back as it is; anything else is logged here and becomes an EngineError."""
    if isinstance(error, InvalidRequestError):
        return portable(error)
    logger.error("%s failed: %s: %s", what, type(error).__name__, error, exc_info=error)
    return EngineError(f"engine failure: {type(error).__name__}: {error}")


if __name__ == "__main__":
    main(sys.argv[1:])
    # As multiprocessing's children do: skip the interpreter's teardown (a second with torch loaded), so a
    # stopping replica frees its memory at once. Nothing is left to flush but the logs.
    logging.shutdown()
    os._exit(0)
