"""The Markdown summary, the chart and the JSON of hand-made load points."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

from tests.bench.logs import hand_made_log
from tokenmill.bench.cost import cost_report
from tokenmill.bench.metrics import LoadMetrics, Slo, summarize
from tokenmill.bench.report import markdown_summary, plot_latency_vs_throughput, write_json

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def points() -> list[tuple[str, LoadMetrics]]:
    base = summarize(hand_made_log(), Slo())
    return [("1 req/s", base), ("2 req/s", replace(base, output_tokens_per_s=7.5))]


def test_markdown_summary() -> None:
    slo = Slo()
    summary = markdown_summary(points(), slo, cost_report(points(), 0.5, slo, 0.9))
    lines = summary.splitlines()
    assert lines[0].startswith("| load | requests | req/s |") and len(lines[1].split("|")) == len(
        lines[0].split("|")
    )
    # TTFT p50 / p99 of the hand-made log: 350 / 1470 ms; one 429.
    assert lines[2].startswith("| 1 req/s | 5 | 1.14 | 12.0 | 3.7 | 350 / 1470 | ")
    assert lines[2].endswith("| 40% | 0.57 | HTTP 429: 1 |")
    assert lines[3].startswith("| 2 req/s | 5 | 1.14 | 12.0 | 7.5 |")
    assert "SLO: TTFT ≤ 1 s and ≥ 20 tokens/s per stream." in summary
    assert "Output tokens: 26 by the server's usage, 24 streamed chunks" in summary
    assert "2 requests differ" in summary
    assert "Prompt tokens served from the prefix cache: 8 of 84 (10%)." in summary  # r5's 4 cached, twice
    assert "no load point met the SLO" in summary  # 40% < 90%


def test_chart_is_a_small_png(tmp_path: Path) -> None:
    path = tmp_path / "chart.png"
    plot_latency_vs_throughput(points(), Slo(), path, "hand-made")
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) < 200_000


def test_json_is_strict(tmp_path: Path) -> None:
    path = tmp_path / "out" / "results.json"
    write_json(path, {"rate": math.inf, "dir": tmp_path, "metrics": points()[0][1]})
    loaded = json.loads(path.read_text())
    assert loaded["rate"] == "inf" and loaded["dir"] == str(tmp_path)
    assert loaded["metrics"]["ttft_s"]["p50"] == 0.35 and loaded["metrics"]["errors"] == {"HTTP 429": 1}
