"""The three outputs of a run: the results JSON (everything, for later analysis), a Markdown summary table
(for READMEs and PRs) and a PNG chart of latency against achieved throughput across the load points (where a
deployment's knee is)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from tokenmill.bench.cost import CostReport, describe
from tokenmill.bench.metrics import Distribution, LoadMetrics, Slo

Point = tuple[str, LoadMetrics]


def _plain(value: Any) -> Any:
    """Strict JSON: paths as strings, dataclasses as objects, infinite rates as "inf" (JSON has no inf)."""
    if is_dataclass(value) and not isinstance(value, type):
        return _plain(asdict(value))
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_plain(result), indent=2, allow_nan=False) + "\n")


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value * 1000:.0f}"


def _p50_p99(distribution: Distribution) -> str:
    return f"{_ms(distribution.p50)} / {_ms(distribution.p99)}"


def _errors(metrics: LoadMetrics) -> str:
    return ", ".join(f"{kind}: {count}" for kind, count in sorted(metrics.errors.items())) or "0"


def markdown_summary(points: Sequence[Point], slo: Slo, cost: CostReport | None) -> str:
    """A table row per load point, then the SLO, the token-count check and the cost line."""
    lines = [
        "| load | requests | req/s | input tok/s | output tok/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) "
        "| ITL p50 / p99 (ms) | SLO met | goodput req/s | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for label, m in points:
        lines.append(
            f"| {label} | {m.num_requests} | {m.request_throughput:.2f} | {m.input_tokens_per_s:.1f} "
            f"| {m.output_tokens_per_s:.1f} | {_p50_p99(m.ttft_s)} | {_p50_p99(m.tpot_s)} | {_p50_p99(m.itl_s)} "
            f"| {m.slo_attainment:.0%} | {m.goodput_requests_per_s:.2f} | {_errors(m)} |"
        )
    lines += ["", f"SLO: TTFT ≤ {slo.ttft_s:g} s and ≥ {slo.min_tokens_per_s:g} tokens/s per stream."]
    mismatched = sum(m.tokens.num_mismatched_requests for _, m in points)
    missing = sum(m.tokens.num_missing_usage for _, m in points)
    usage = sum(m.tokens.usage_output_tokens for _, m in points)
    streamed = sum(m.tokens.streamed_output_tokens for _, m in points)
    check = f"Output tokens: {usage} by the server's usage, {streamed} streamed chunks counted by the client"
    if mismatched:
        check += f"; {mismatched} requests differ (the server sent several tokens in one chunk)"
    if missing:
        check += f"; {missing} requests had no usage (the client's count was used)"
    lines.append(check + ".")
    prompt_tokens = sum(m.total_input_tokens for _, m in points)
    cached = sum(m.cached_input_tokens for _, m in points)
    if cached:
        lines.append(
            f"Prompt tokens served from the prefix cache: {cached} of {prompt_tokens} ({cached / prompt_tokens:.0%})."
        )
    if cost is not None:
        lines.append(describe(cost))
    return "\n".join(lines) + "\n"


def plot_latency_vs_throughput(points: Sequence[Point], slo: Slo, path: Path, title: str) -> None:
    """Two panels sharing the x axis (achieved output tokens/s): TTFT and TPOT, p50 and p99, with the SLO
    as a dashed line; each point is labelled with its load. Uses matplotlib's object API, not pyplot's
    global figure state."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    throughput = [m.output_tokens_per_s for _, m in points]
    panels = (
        ("time to first token (ms)", lambda m: m.ttft_s, slo.ttft_s),
        ("time per output token (ms)", lambda m: m.tpot_s, 1.0 / slo.min_tokens_per_s),
    )
    for column, (ylabel, pick, limit_s) in enumerate(panels):
        axes = figure.add_subplot(1, 2, column + 1)
        for quantile, style in (("p50", "o-"), ("p99", "s--")):
            values = [getattr(pick(m), quantile) for _, m in points]
            axes.plot(
                [x for x, v in zip(throughput, values, strict=True) if v is not None],
                [v * 1000 for v in values if v is not None],
                style,
                label=quantile,
            )
        axes.axhline(limit_s * 1000, color="tab:red", linestyle=":", label="SLO")
        for (label, m), x in zip(points, throughput, strict=True):
            p50 = pick(m).p50
            if p50 is not None:
                axes.annotate(label, (x, p50 * 1000), textcoords="offset points", xytext=(4, 6), fontsize=8)
        axes.set_ylim(bottom=0)
        axes.set_xlabel("achieved output tokens/s")
        axes.set_ylabel(ylabel)
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
