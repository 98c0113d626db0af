"""A saved run reported again under another SLO and price, without traffic (--from-results)."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from tests.bench.logs import hand_made_log
from tokenmill.bench import serve
from tokenmill.bench.report import write_json

CONFIG = {"model": "m", "url": "http://127.0.0.1:9/v1/chat/completions", "workload": "fixed", "input_len": 8}


def save(path: Path, with_requests: bool = True) -> None:
    requests = {"requests": [asdict(r) for r in hand_made_log()]} if with_requests else {}
    point: dict[str, Any] = {
        "label": "all at once",
        "request_rate": math.inf,
        "concurrency": None,
        "metrics": {},
        **requests,
    }
    write_json(path, {"config": {**CONFIG, "output_len": 4}, "points": [point]})


def test_reported_again_under_another_slo(tmp_path: Path) -> None:
    save(tmp_path / "saved.json")
    common = ["--from-results", str(tmp_path / "saved.json"), "--price-per-hour", "1", "--no-progress"]
    strict = serve.main([*common, "--output-dir", str(tmp_path / "strict")])
    loose = serve.main([*common, "--output-dir", str(tmp_path / "loose"), "--slo-tokens-per-s", "8"])
    (strict_point,), (loose_point,) = strict["points"], loose["points"]
    assert strict_point["label"] == loose_point["label"] == "all at once"
    # r1 decodes at 8 tokens/s: it misses 20 tokens/s and meets 8 (see logs.py).
    assert strict_point["metrics"]["slo_attainment"] == pytest.approx(2 / 5)
    assert loose_point["metrics"]["slo_attainment"] == pytest.approx(3 / 5)
    assert loose["config"]["slo_tokens_per_s"] == 8 and loose["config"]["model"] == "m"
    assert strict_point["metrics"]["ttft_s"] == loose_point["metrics"]["ttft_s"]  # same measurements
    assert (tmp_path / "loose" / "latency_vs_throughput.png").exists()


def test_needs_the_request_log(tmp_path: Path) -> None:
    save(tmp_path / "saved.json", with_requests=False)
    with pytest.raises(ValueError, match="--save-requests"):
        serve.main(["--from-results", str(tmp_path / "saved.json"), "--output-dir", str(tmp_path / "out")])


def test_a_load_is_required(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="give a load"):
        serve.main(["--output-dir", str(tmp_path)])
