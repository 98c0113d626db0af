"""A real `tokenmill serve` in a subprocess on a free port: started, waited for (/ready), stopped or killed,
and restartable on the same port and data directory. Its log goes to a file whose tail is shown when it
fails to come up."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    def __init__(self, args: list[str], log_path: Path, data_dir: Path | None = None) -> None:
        """`data_dir` (default: next to the log) keeps the server's database and admin key out of the
        user's ~/.tokenmill."""
        self.args = args
        self.log_path = log_path
        self.data_dir = data_dir or log_path.parent / "data"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float) -> ServerProcess:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        command = [
            sys.executable, "-m", "tokenmill.cli", "serve", "--port", str(self.port),
            "--data-dir", str(self.data_dir), *self.args,
        ]  # fmt: skip
        with self.log_path.open("ab") as log:  # appended: a restarted server keeps the earlier log
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"tokenmill serve exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                ready = httpx.get(f"{self.url}/ready", timeout=2)
                if ready.status_code == 200:
                    return self
                if ready.json().get("status") == "failed":
                    raise RuntimeError(f"tokenmill serve failed to load: {ready.text}\n{self.log_tail()}")
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"tokenmill serve not ready after {timeout_s}s:\n{self.log_tail()}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as when a machine loses power."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def log_tail(self, num_lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-num_lines:])

    def metric(self, name: str, model: str) -> float:
        prefix = f'{name}{{model="{model}"}} '
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line.startswith(prefix):
                return float(line[len(prefix) :])
        raise AssertionError(f"{prefix} not in /metrics")
