"""The README's quick start, run as a newcomer runs it: every tagged block, in order, in one bash session with
the virtual environment `make setup` makes (the one this suite runs in, made fresh by `make test` on a clean
clone) on PATH, against the default `tokenmill serve` with the real built-in models. Every example must
succeed and end within its own max_tokens, and the default server must stay under 2 GiB of memory. The
README's links must all resolve inside the repository."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from tests.conftest import smollm2_installed
from tests.serving.server_process import free_port
from tokenmill.platform.db import open_database, sqlite_url
from tokenmill.platform.tables import Reservation, UsageRecord

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BLOCK = re.compile(r"<!-- readme-test: (\w+) -->\n```\w+\n(.*?)```", re.S)
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
ACTIVATION = ("make setup", "source .venv/bin/activate")
"""What `make test` already did in the environment running this test."""
CHAT_QUESTION = "What is the capital of France?"
MAX_SERVER_MEMORY_BYTES = 2 * 2**30


def readme_blocks() -> list[tuple[str, str]]:
    return BLOCK.findall(README.read_text())


@pytest.mark.parametrize("document", [README, *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_every_link_resolves_inside_the_repository(document: Path) -> None:
    for target in LINK.findall(document.read_text()):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (document.parent / target).resolve().is_relative_to(ROOT), f"{document.name}: {target}"
        assert (document.parent / target).exists(), f"{document.name} links to missing {target}"


def test_the_readme_tags_the_quick_start() -> None:
    kinds = [kind for kind, _ in readme_blocks()]
    assert kinds[0] == "setup" and {"shell", "chat", "python"} <= set(kinds)


def _script(port: int) -> tuple[str, list[str]]:
    """The quick start as one bash script (the server line taken out and returned), on `port`."""
    lines, serve = ["set -euo pipefail"], []
    for kind, code in readme_blocks():
        code = code.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        if kind == "setup":
            for line in code.splitlines():
                command = line.split("#")[0].strip()
                if command == "tokenmill serve":
                    serve = ["tokenmill", "serve", "--port", str(port)]
                elif command and command not in ACTIVATION:
                    lines.append(command)
        elif kind == "shell":
            lines.append(code)
        elif kind == "chat":
            lines.append(f"{code.strip()} <<< '{CHAT_QUESTION}'")
        elif kind == "python":
            lines.append(f"python - <<'PYTHON'\n{code}PYTHON")
        lines.append(f"echo '--- end of {kind} block'")
    assert serve, "the setup block starts no server"
    return "\n".join(lines), serve


@pytest.mark.slow
def test_the_quick_start_runs_as_written(tmp_path: Path) -> None:
    if not smollm2_installed():
        pytest.skip("the built-in models are not installed (make setup)")
    if sys.prefix == sys.base_prefix:
        pytest.skip("the quick start runs in the virtual environment `make setup` / `make test` create")
    port = free_port()
    script, serve = _script(port)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "TOKENMILL_DATA_DIR": str(tmp_path / "data"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    env.pop("TOKENMILL_KEY", None)
    with open(tmp_path / "serve.log", "w") as log:
        server = subprocess.Popen(serve, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_ready(f"http://127.0.0.1:{port}", server, tmp_path / "serve.log")
        run = subprocess.run(
            ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path
        )
        assert run.returncode == 0, f"the quick start failed:\n{run.stdout}\n{run.stderr}"
        out = run.stdout
        assert out.count("--- end of") == len(readme_blocks())
        assert "The capital of France is Paris." in out  # curl, the SDK and the chat all ask it
        assert "data: [DONE]" in out and '"embedding"' in out and '"smollm2"' in out
        assert out.count("The capital of France is Paris") >= 4
        peak_bytes = _peak_memory_bytes(server.pid)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
    assert peak_bytes < MAX_SERVER_MEMORY_BYTES, f"the default server peaked at {peak_bytes / 2**30:.2f} GiB"
    _every_example_ended_within_its_max_tokens(tmp_path / "data")


def _every_example_ended_within_its_max_tokens(data_dir: Path) -> None:
    db = open_database(sqlite_url(data_dir))
    try:
        with db.read() as session:
            rows = session.execute(
                select(
                    Reservation.model,
                    Reservation.max_tokens,
                    UsageRecord.completion_tokens,
                    UsageRecord.status,
                ).join(UsageRecord, UsageRecord.reservation_id == Reservation.id)
            ).all()
    finally:
        db.close()
    chats = [row for row in rows if row.model == "smollm2"]
    assert len(chats) >= 1 + 2 + 2 + 16, rows  # the terminal chat, curl, the SDK, the 16 at once
    for model, max_tokens, completion_tokens, status in rows:
        assert status == "ok", rows
        assert completion_tokens <= max_tokens, rows
        if model == "smollm2":  # each example set its own limit: none ran on the server's default
            assert max_tokens <= 512, rows


def _wait_ready(url: str, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert server.poll() is None, f"tokenmill serve exited:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"tokenmill serve was not ready after 300 s:\n{log.read_text()[-3000:]}")


def _peak_memory_bytes(pid: int) -> int:
    """The most resident memory the process ever had (VmHWM), not just what it holds now."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/PID/status")
