"""`tokenmill doctor` reports, before anything loads or is written, what `tokenmill serve` with the same flags
would use, and names every problem; its exit status says whether serve would start."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from tests.conftest import smollm2_installed
from tests.platform.conftest import REDIS_URL, redis_unavailable
from tokenmill import cli


def _doctor(*args: str) -> tuple[int, dict[str, str]]:
    """-> (exit status, {check name: its line})."""
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(io.StringIO()):
        status = cli.main(["doctor", *args])
    lines = {}
    for line in out.getvalue().splitlines():
        if line[:3] in ("ok ", "NO "):
            name, _, detail = line[4:].partition("  ")
            lines[name.strip()] = f"{line[:2].strip()} {detail.strip()}"
    return status, lines


def test_a_ready_machine_gets_the_plan_of_every_model(tmp_path: Path, tiny_llama_dir: Path) -> None:
    status, lines = _doctor(
        "--data-dir", str(tmp_path / "data"), "--model", f"tiny={tiny_llama_dir}", "--embedding-model", "none",
        "--dtype", "float32", "--max-num-seqs", "8",
    )  # fmt: skip
    assert status == 0, lines
    assert {"python", "torch", "cpu", "memory", "c compiler", "database", "redis"} <= set(lines)
    chat = lines["chat model tiny"]
    assert chat.startswith("ok") and "float32 on cpu (as configured)" in chat
    assert "context 512 tokens" in chat and "KV cache 1024 tokens" in chat  # 8 sequences x 128 tokens
    assert "created at the first start" in lines["database"]
    assert not (tmp_path / "data").exists()  # a doctor writes nothing


@pytest.mark.skipif(not smollm2_installed(), reason="the built-in models are not installed")
def test_the_built_in_models_are_found(tmp_path: Path) -> None:
    status, lines = _doctor("--data-dir", str(tmp_path))
    assert status == 0, lines
    assert "SmolLM2-135M-Instruct" in lines["chat model smollm2"]
    assert "384 dimensions" in lines["embedding model all-MiniLM-L6-v2"]
    assert lines["serve needs"].startswith("ok about ")


def test_problems_are_named_and_fail_the_check(tmp_path: Path) -> None:
    status, lines = _doctor(
        "--data-dir", str(tmp_path), "--model", str(tmp_path / "no-such-model"), "--embedding-model", "none",
        "--database-url", "postgresql://nobody@127.0.0.1:1/none",
    )  # fmt: skip
    assert status == 1
    assert lines[f"chat model {tmp_path / 'no-such-model'}"].startswith("NO")
    assert lines["database"].startswith("NO")


def test_redis_is_pinged_when_configured(tmp_path: Path, tiny_llama_dir: Path) -> None:
    reason = redis_unavailable()
    if reason:
        pytest.skip(reason)
    flags = ["--data-dir", str(tmp_path), "--model", str(tiny_llama_dir), "--embedding-model", "none"]
    status, lines = _doctor(*flags, "--redis-url", REDIS_URL)
    assert status == 0 and "reachable" in lines["redis"]
    status, lines = _doctor(*flags, "--redis-url", "redis://127.0.0.1:1/0")
    assert status == 1 and lines["redis"].startswith("NO")
