"""`tokenmill serve`: flags become configs and one call; bad input fails with a message, not a trace."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tokenmill import cli
from tokenmill.config import BatchBudget
from tokenmill.platform.gateway import PlatformSettings
from tokenmill.serving.settings import ModelSpec, ServerSettings
from tokenmill.serving.tidal import TidalSettings


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    recorded: list[dict[str, Any]] = []

    def fake_serve(
        settings: ServerSettings,
        platform: PlatformSettings,
        models: list,
        embedding_models: list,
        engine_kwargs: dict,
        **options: Any,
    ) -> None:
        recorded.append(
            dict(
                settings=settings,
                platform=platform,
                models=models,
                embedding_models=embedding_models,
                engine_kwargs=engine_kwargs,
                **options,
            )
        )

    import tokenmill.serving.server

    monkeypatch.setattr(tokenmill.serving.server, "serve", fake_serve)
    return recorded


def test_defaults_serve_the_builtin_models(
    calls: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("TOKENMILL_DATABASE_URL", raising=False)
    monkeypatch.delenv("TOKENMILL_REDIS_URL", raising=False)
    monkeypatch.setenv("TOKENMILL_DATA_DIR", str(tmp_path))
    assert cli.main(["serve"]) == 0
    (call,) = calls
    assert call["models"] == [ModelSpec("smollm2")]
    assert call["embedding_models"] == [ModelSpec("all-MiniLM-L6-v2")]
    assert call["settings"] == ServerSettings(host="127.0.0.1", port=8000)
    assert not call["settings"].no_auth  # keys are required unless the operator says otherwise
    assert call["engine_kwargs"] == {}
    assert (call["config"], call["memory_budget_bytes"], call["max_queue"]) == (None, None, 64)
    platform = call["platform"]
    assert platform.data_dir == tmp_path and platform.resolved_database_url.endswith("/tokenmill.db")
    assert platform.redis_url is None and platform.gateway_id.endswith(":8000")


def test_flags_become_configs(calls: list[dict[str, Any]]) -> None:
    argv = [
        "serve",
        "--model",
        "chat=/models/qwen",
        "--model",
        "/models/llama-3",
        "--embedding-model",
        "none",
        "--host",
        "0.0.0.0",
        "--port",
        "9000",
        "--max-body-bytes",
        "1M",
        "--dtype",
        "bfloat16",
        "--quantization",
        "int8",
        "--max-model-len",
        "4096",
        "--block-size",
        "32",
        "--kv-cache-memory",
        "2G",
        "--max-num-seqs",
        "8",
        "--max-num-batched-tokens",
        "1024",
        "--target-tpot-ms",
        "40",
        "--batch-fill-tokens",
        "5",
        "--off-peak-batch-idle-tokens",
        "99",
        "--log-level",
        "debug",
        "--data-dir",
        "/srv/tm",
        "--database-url",
        "postgresql://tm@db/tm",
        "--redis-url",
        "redis://cache:6379/0",
        "--gateway-id",
        "gw-1",
        "--no-auth",
        "--max-queue",
        "5",
        "--memory-budget",
        "6G",
        "--platform-fee-bps",
        "1500",
    ]
    assert cli.main(argv) == 0
    (call,) = calls
    assert call["platform"] == PlatformSettings(
        data_dir=Path("/srv/tm"),
        database_url="postgresql://tm@db/tm",
        redis_url="redis://cache:6379/0",
        gateway_id="gw-1",
        platform_fee_bps=1500,
    )
    assert (call["max_queue"], call["memory_budget_bytes"]) == (5, 6 * 1024**3)
    assert call["models"] == [ModelSpec("/models/qwen", "chat"), ModelSpec("/models/llama-3")]
    assert call["embedding_models"] == []
    tide = TidalSettings(
        batch_budget=BatchBudget(fill_tokens=5),
        off_peak_batch_budget=replace(TidalSettings().off_peak_batch_budget, idle_tokens=99),
    )
    assert call["settings"] == ServerSettings(
        host="0.0.0.0", port=9000, max_body_bytes=1024**2, no_auth=True, tidal=tide
    )
    assert call["engine_kwargs"] == {
        "dtype": "bfloat16",
        "quantization": "int8",
        "max_model_len": 4096,
        "block_size": 32,
        "kv_cache_memory": 2 * 1024**3,
        "max_num_seqs": 8,
        "max_num_batched_tokens": 1024,
        "target_tpot_ms": 40.0,
    }
    assert call["log_level"] == "debug"


def test_a_models_file_replaces_the_model_flags(calls: list[dict[str, Any]], tmp_path: Path) -> None:
    config = tmp_path / "models.yaml"
    assert cli.main(["serve", "--config", str(config)]) == 0
    (call,) = calls
    assert (call["config"], call["models"], call["embedding_models"]) == (config, [], [])
    assert cli.main(["serve", "--config", str(config), "--model", "x"]) == 2  # one or the other
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("text", "size"),
    [("4096", 4096), ("512k", 512 * 1024), ("64M", 64 * 1024**2), ("2GiB", 2 * 1024**3), ("1gb", 1024**3)],
)
def test_byte_sizes(text: str, size: int) -> None:
    assert cli.byte_size(text) == size


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--kv-cache-memory", "lots"],
        ["serve", "--model", "=x"],
        ["serve", "--port", "http"],
        ["frobnicate"],
    ],
)
def test_bad_flags_exit_with_usage(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2 and "usage:" in capsys.readouterr().err


def test_missing_model_is_a_message_not_a_trace(tmp_path: Any) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokenmill.cli",
            "serve",
            "--model",
            str(tmp_path / "nope"),
            "--embedding-model",
            "none",
            "--data-dir",
            str(tmp_path / "data"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "nope" in result.stderr and "Traceback" not in result.stderr


def test_subcommand_table_is_extensible() -> None:
    """`admin` and `bench` are added as rows of COMMANDS; the parser picks them up."""
    seen: list[str] = []
    extra = cli.Command(
        "hello", "say hello", lambda p: p.add_argument("--name"), lambda a: seen.append(a.name)
    )
    cli.COMMANDS.append(extra)
    try:
        assert cli.main(["hello", "--name", "mill"]) == 0
    finally:
        cli.COMMANDS.remove(extra)
    assert seen == ["mill"]


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--database-url", "postgresql://nobody@127.0.0.1:1/db", "database_url: cannot open"),
        ("--database-url", "mysql://db/x", "database_url: unsupported backend"),
        ("--redis-url", "redis://127.0.0.1:1/0", "redis_url: cannot reach"),
    ],
)
def test_unreachable_stores_stop_serve_with_a_message(
    flag: str, value: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before any model loads: a wrong URL is found at startup, not at the first request."""
    argv = ["serve", "--model", "none", "--embedding-model", "none", "--data-dir", str(tmp_path), flag, value]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
