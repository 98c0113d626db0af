"""`tokenmill bench serve` against a real `tokenmill serve` process (tiny random-weight Llama, real SmolLM2
tokenizer): a two-point rate sweep writes its JSON, Markdown and PNG, every request succeeds, and the token
counts are the server's; a shared-prefix run shows the prefix cache in `usage`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.serving.server_process import ServerProcess
from tokenmill.bench import serve
from tokenmill.cli import build_parser

pytest.importorskip("tokenmill.engine.async_engine")
pytestmark = pytest.mark.slow  # runs a server process

MODEL = "tiny"
NUM_REQUESTS, OUTPUT_LEN = 6, 8
NO_EOS = json.dumps({"logit_bias": {"2": -100}})  # random weights: keep EOS from ending a reply early


def no_auth_flag() -> list[str]:
    """`--no-auth` once the server has API keys (another change in flight); nothing before."""
    _, unknown = build_parser().parse_known_args(["serve", "--no-auth"])
    return [] if unknown else ["--no-auth"]


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    args = ["--model", f"{MODEL}={tiny_llama_dir}", "--embedding-model", "none", "--kv-cache-memory", "64M"]
    process = ServerProcess([*args, *no_auth_flag()], tmp_path_factory.mktemp("serve") / "serve.log")
    yield process.start(timeout_s=180)
    process.stop()


def bench(server: ServerProcess, output_dir: Path, *flags: str) -> dict[str, Any]:
    common = ["--base-url", f"{server.url}/v1", "--extra-body", NO_EOS, "--output-dir", str(output_dir)]
    return serve.main([*common, "--no-progress", "--save-requests", *flags])


def test_rate_sweep(server: ServerProcess, tmp_path: Path) -> None:
    result = bench(
        server, tmp_path, "--sweep", "4,16", "--num-requests", str(NUM_REQUESTS), "--input-len", "24",
        "--output-len", str(OUTPUT_LEN), "--price-per-hour", "0.5",
    )  # fmt: skip
    assert result["config"]["model"] == MODEL  # found through GET /models
    assert [p["label"] for p in result["points"]] == ["4 req/s", "16 req/s"]
    for point in result["points"]:
        metrics, requests = point["metrics"], point["requests"]
        assert metrics["num_ok"] == NUM_REQUESTS and metrics["errors"] == {}
        # The server's usage is the count: every reply ran to max_tokens, and the prompt was counted.
        assert [r["output_tokens"] for r in requests] == [OUTPUT_LEN] * NUM_REQUESTS
        assert metrics["total_output_tokens"] == NUM_REQUESTS * OUTPUT_LEN
        assert all(r["prompt_tokens"] >= 24 for r in requests)
        # The client's count of streamed chunks is checked against it, mismatches reported, not hidden.
        mismatched = sum(1 for r in requests if len(r["chunk_times_s"]) != r["output_tokens"])
        assert metrics["tokens"]["num_mismatched_requests"] == mismatched
        assert metrics["tokens"]["usage_output_tokens"] == NUM_REQUESTS * OUTPUT_LEN
        assert 0 < metrics["ttft_s"]["p50"] <= metrics["ttft_s"]["p99"]
        assert metrics["tpot_s"]["count"] == NUM_REQUESTS and metrics["output_tokens_per_s"] > 0
    assert result["cost"]["price_per_hour"] == 0.5 and result["cost"]["cost_per_million_at_peak"] > 0
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["points"][1]["metrics"]["total_output_tokens"] == NUM_REQUESTS * OUTPUT_LEN
    summary = (tmp_path / "summary.md").read_text()
    assert "| 4 req/s | 6 |" in summary and "| 16 req/s | 6 |" in summary and "At $0.50/hour" in summary
    assert (tmp_path / "latency_vs_throughput.png").read_bytes().startswith(b"\x89PNG")
    # The saved request log alone gives the same figures again (metrics are pure functions of it).
    again = serve.main(
        ["--from-results", str(tmp_path / "results.json"), "--output-dir", str(tmp_path / "again")]
    )
    assert [p["metrics"] for p in again["points"]] == [p["metrics"] for p in result["points"]]


def test_shared_prefix_hits_the_prefix_cache(server: ServerProcess, tmp_path: Path) -> None:
    result = bench(
        server, tmp_path, "--workload", "shared-prefix", "--prefix-len", "96", "--input-len", "8",
        "--output-len", "4", "--concurrency", "1", "--num-requests", "4", "--endpoint", "completions",
    )  # fmt: skip
    (point,) = result["points"]
    assert point["metrics"]["num_ok"] == 4
    cached = [r["cached_tokens"] for r in point["requests"]]
    assert cached[0] == 0 and all(c >= 64 for c in cached[1:])  # the system prompt, in whole blocks
    assert point["metrics"]["cached_input_tokens"] == sum(cached)
