"""The gateway's handle on one worker process: start it and wait until its engine is loaded, send it
messages from any thread, read its messages on a thread of its own, answer synchronous checks, and notice
at once when it dies (its end of the connection closes, or its pidfd says it exited)."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from multiprocessing.connection import Connection, wait
from pathlib import Path

import tokenmill
from tokenmill.cluster.protocol import WorkerInfo, WorkerOptions
from tokenmill.config import EngineConfig
from tokenmill.engine.client import EngineError

logger = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 120.0
"""A check compiles one grammar or reads one adapter: far less than this unless the worker is stuck."""
LOST_WAIT_S = 0.5
"""How long a worker whose connection closed may take to exit (for its exit code) before its requests are
failed anyway."""


class WorkerProcess:
    def __init__(self, config: EngineConfig, options: WorkerOptions) -> None:
        """Starts the worker and blocks until its engine is loaded (seconds to minutes, like AsyncLLM's
        constructor): call it from a worker thread. Raises the worker's own load error (ModelLoadError,
        ConfigError, ...) or EngineError if it died while loading."""
        ours, theirs = socket.socketpair()
        with ours, theirs:
            # A plain child process rather than multiprocessing's "spawn", which would run the gateway's
            # main module again (the CLI, and through it the whole server) before the worker's code.
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tokenmill.cluster.worker", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                env={**os.environ, "PYTHONPATH": _pythonpath()},
            )
            self.conn = Connection(ours.detach())
        # Only the child holds its end now, so its death closes the connection; its pidfd (Linux) says so
        # too, even if something it started kept the socket open.
        self._exited = os.pidfd_open(self.process.pid) if hasattr(os, "pidfd_open") else None
        self._send_lock = threading.Lock()
        self._calls: dict[int, Future[Exception | None]] = {}
        self._call_ids = itertools.count()
        self._reader: threading.Thread | None = None
        self._lost = threading.Event()
        self.send(("load", config, options))
        self.info: WorkerInfo = self._handshake()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return not self._lost.is_set() and self.process.poll() is None

    def _handshake(self) -> WorkerInfo:
        message = self._next_message()
        if message is not None and message[0] == "ready":
            return message[1]
        self._lost.set()
        self._close()
        if message is not None and message[0] == "failed":
            raise message[1]
        raise EngineError(f"the engine worker exited with code {self.process.returncode} while loading")

    def _next_message(self) -> tuple | None:
        """The next message, or None once the worker is gone (it may have left messages behind: those
        come first)."""
        ready = wait([self.conn] if self._exited is None else [self.conn, self._exited])
        if self.conn not in ready:  # dead, its socket still open (held by a child of it)
            return None
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            return None

    # -- after the handshake ---------------------------------------------------------------------------

    def start_reading(self, on_step: Callable[[tuple], None], on_lost: Callable[[], None]) -> None:
        """`on_step(message)` for each step message and `on_lost()` once the worker is gone, both on the
        reader thread."""

        def read() -> None:
            while (message := self._next_message()) is not None:
                if message[0] == "reply":
                    future = self._calls.pop(message[1], None)
                    if future is not None:
                        future.set_result(message[2])
                else:
                    on_step(message)
            self._lost.set()
            with contextlib.suppress(subprocess.TimeoutExpired):  # for its exit code
                self.process.wait(LOST_WAIT_S)
            for call_id in list(self._calls):
                future = self._calls.pop(call_id, None)
                if future is not None:
                    future.set_exception(self.lost_error())
            on_lost()

        self._reader = threading.Thread(target=read, name=f"worker-reader-{self.pid}", daemon=True)
        self._reader.start()

    def lost_error(self) -> EngineError:
        code = self.process.poll()
        how = "is stopping" if code is None else f"exited with code {code}"
        return EngineError(f"the engine worker (pid {self.pid}) {how}; its requests were lost")

    def send(self, message: tuple) -> None:
        """Thread-safe. Raises EngineError when the worker is gone."""
        if self._lost.is_set():
            raise self.lost_error()
        try:
            with self._send_lock:
                self.conn.send(message)
        except OSError as error:  # its end is closed (or ours, after stop)
            raise self.lost_error() from error

    def call(self, kind: str, argument: object) -> None:
        """A check run by the worker, waited for on this (non-loop) thread: returns when it passes, raises
        the worker's InvalidRequestError when it fails, EngineError when the worker is gone."""
        call_id = next(self._call_ids)
        future: Future[Exception | None] = Future()
        self._calls[call_id] = future
        try:
            self.send(("check", call_id, kind, argument))
            error = future.result(timeout=CHECK_TIMEOUT_S)
        except FutureTimeout:
            raise EngineError(f"the engine worker (pid {self.pid}) did not answer a {kind} check") from None
        finally:
            self._calls.pop(call_id, None)
        if error is not None:
            raise error

    def kill(self) -> None:
        """At once, without asking (a hung worker would not answer): its reader then sees it gone."""
        self.process.kill()

    def stop(self, timeout_s: float) -> None:
        """Blocking: ask the worker to exit, wait up to `timeout_s`, then kill it. Requests it was running end
        with it; the caller fails their streams."""
        with contextlib.suppress(EngineError):  # already gone
            self.send(("shutdown",))
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("engine worker pid %s did not exit within %.0f s; killing it", self.pid, timeout_s)
            self.process.kill()
            self.process.wait()
        self._lost.set()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout_s)
        self._close()

    def _close(self) -> None:
        self.process.wait()
        self.conn.close()
        if self._exited is not None:
            os.close(self._exited)
            self._exited = None


def _pythonpath() -> str:
    """The child imports the very tokenmill this process runs, wherever that came from."""
    here = str(Path(tokenmill.__file__).resolve().parents[1])
    return os.pathsep.join([here, *filter(None, [os.environ.get("PYTHONPATH")])])
