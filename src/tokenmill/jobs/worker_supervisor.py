"""Keeps a server's trainer workers running: each is a `tokenmill worker` child process (training must not
share the gateway's CPU and GIL). A worker that exits is restarted after a growing pause, and the job it was
running is recovered at once (queued again to resume from its checkpoint, or failed after its second
loss) rather than after the heartbeat timeout. Workers on other machines run `tokenmill worker` directly.

One thread per worker waits on its process, so the supervisor needs nothing of the server's event loop."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

logger = logging.getLogger(__name__)

MAX_BACKOFF_S = 60.0
HEALTHY_AFTER_S = 60.0
"""A worker that ran this long before exiting restarts at once: its exit was not a crash loop."""
STOP_TIMEOUT_S = 30.0
"""How long a stopping worker may take to hand its job back before it is killed."""


class WorkerSupervisor:
    def __init__(
        self,
        names: Sequence[str],
        worker_args: Callable[[str], list[str]],
        on_worker_exit: Callable[[str, int], None],
    ) -> None:
        """`worker_args(name)`: the `tokenmill worker ...` arguments of the worker called `name`;
        `on_worker_exit(name, returncode)` runs after each exit of a worker (it recovers the worker's job)."""
        self.names = list(names)
        self.worker_args = worker_args
        self.on_worker_exit = on_worker_exit
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    def start(self) -> None:
        """Start the workers (once: later calls do nothing, as do calls after `stop`)."""
        with self._lock:
            if self._threads or self._stopping.is_set():
                return
            for name in self.names:
                thread = threading.Thread(target=self._keep_running, args=(name,), name=f"supervise-{name}")
                thread.start()
                self._threads.append(thread)

    def stop(self) -> None:
        """SIGTERM every worker (each hands its job back to the queue), then wait; kill the slow ones."""
        self._stopping.set()
        with self._lock:
            processes = list(self._processes.values())
        for process in processes:
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for process in processes:
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                logger.warning("trainer worker pid %d did not stop in time; killing it", process.pid)
                process.kill()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join()

    def _keep_running(self, name: str) -> None:
        backoff = 1.0
        while not self._stopping.is_set():
            started = time.monotonic()
            with self._lock:
                if self._stopping.is_set():
                    return
                process = subprocess.Popen([sys.executable, "-m", "tokenmill.cli", *self.worker_args(name)])
                self._processes[name] = process
            logger.info("trainer worker %s started (pid %d)", name, process.pid)
            returncode = process.wait()
            try:
                self.on_worker_exit(name, returncode)
            except Exception:
                logger.exception("recovering the jobs of trainer worker %s failed", name)
            if self._stopping.is_set():
                return
            healthy = time.monotonic() - started > HEALTHY_AFTER_S
            backoff = 1.0 if healthy else min(backoff * 2, MAX_BACKOFF_S)
            logger.warning(
                "trainer worker %s exited with code %s; restarting in %.0f s", name, returncode, backoff
            )
            self._stopping.wait(backoff)
