"""Measured throughput turned into the two figures a token service is sold on: what 1M output tokens cost on
this hardware, and how many chat users it carries at the SLO.

    cost per 1M output tokens = price per hour / (output tokens/s * 3600) * 1,000,000
    users at the SLO          = floor(output tokens/s at the SLO load / SLO tokens/s per user)

"The SLO load" is the load point with the highest output tokens/s among those where at least
`attainment_target` of the requests met the SLO (TTFT and per-stream rate). A user is a stream that reads at
the SLO rate (20 tokens/s by default) without pause, so the user count is a capacity, not a headcount of
people who also think and type. These are estimates in float dollars, not billing: the ledger's integer
micro-units live in `platform/`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from tokenmill.bench.metrics import LoadMetrics, Slo

SECONDS_PER_HOUR = 3600.0
TOKENS_PER_MILLION = 1_000_000.0


def cost_per_million_tokens(price_per_hour: float, tokens_per_s: float) -> float | None:
    """None when nothing was produced: no finite price exists."""
    if price_per_hour < 0:
        raise ValueError(f"price_per_hour must be >= 0, got {price_per_hour}")
    if tokens_per_s <= 0:
        return None
    return price_per_hour / (tokens_per_s * SECONDS_PER_HOUR) * TOKENS_PER_MILLION


def users_served(output_tokens_per_s: float, tokens_per_s_per_user: float) -> int:
    if tokens_per_s_per_user <= 0:
        raise ValueError(f"tokens_per_s_per_user must be > 0, got {tokens_per_s_per_user}")
    return math.floor(output_tokens_per_s / tokens_per_s_per_user)


@dataclass(frozen=True, slots=True)
class CostReport:
    price_per_hour: float
    tokens_per_s_per_user: float
    attainment_target: float
    peak_label: str
    peak_output_tokens_per_s: float
    cost_per_million_at_peak: float | None
    """At the highest throughput measured, whatever its latency."""
    slo_label: str | None
    """The SLO load point; None when no point met the SLO often enough."""
    slo_output_tokens_per_s: float
    cost_per_million_at_slo: float | None
    users_at_slo: int


def cost_report(
    points: Sequence[tuple[str, LoadMetrics]], price_per_hour: float, slo: Slo, attainment_target: float
) -> CostReport:
    """`points` are (label, metrics) of each load point, e.g. ("2 req/s", ...)."""
    if not points:
        raise ValueError("cost_report needs at least one load point")
    if not 0.0 < attainment_target <= 1.0:
        raise ValueError(f"attainment_target must be in (0, 1], got {attainment_target}")
    peak_label, peak = max(points, key=lambda p: p[1].output_tokens_per_s)
    meeting = [p for p in points if p[1].slo_attainment >= attainment_target]
    slo_label, at_slo = max(meeting, key=lambda p: p[1].output_tokens_per_s) if meeting else (None, None)
    slo_rate = at_slo.output_tokens_per_s if at_slo is not None else 0.0
    return CostReport(
        price_per_hour=price_per_hour,
        tokens_per_s_per_user=slo.min_tokens_per_s,
        attainment_target=attainment_target,
        peak_label=peak_label,
        peak_output_tokens_per_s=peak.output_tokens_per_s,
        cost_per_million_at_peak=cost_per_million_tokens(price_per_hour, peak.output_tokens_per_s),
        slo_label=slo_label,
        slo_output_tokens_per_s=slo_rate,
        cost_per_million_at_slo=cost_per_million_tokens(price_per_hour, slo_rate),
        users_at_slo=users_served(slo_rate, slo.min_tokens_per_s),
    )


def describe(report: CostReport) -> str:
    """The one-line cost report of the Markdown summary and the console."""

    def dollars(value: float | None) -> str:
        return "n/a" if value is None else f"${value:.3f}"

    peak = (
        f"At ${report.price_per_hour:.2f}/hour: {dollars(report.cost_per_million_at_peak)} per 1M output "
        f"tokens at peak throughput ({report.peak_output_tokens_per_s:.1f} tokens/s, {report.peak_label})"
    )
    if report.slo_label is None:
        return f"{peak}; no load point met the SLO for {report.attainment_target:.0%} of requests."
    return (
        f"{peak}; {dollars(report.cost_per_million_at_slo)} per 1M at the SLO load "
        f"({report.slo_output_tokens_per_s:.1f} tokens/s, {report.slo_label}), serving "
        f"{report.users_at_slo} concurrent users at {report.tokens_per_s_per_user:g} tokens/s each."
    )
