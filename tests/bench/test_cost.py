"""The cost report against a worked example."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.bench.logs import hand_made_log
from tokenmill.bench.cost import cost_per_million_tokens, cost_report, describe, users_served
from tokenmill.bench.metrics import LoadMetrics, Slo, summarize


def point(output_tokens_per_s: float, slo_attainment: float) -> LoadMetrics:
    return replace(
        summarize(hand_made_log(), Slo()),
        output_tokens_per_s=output_tokens_per_s,
        slo_attainment=slo_attainment,
    )


def test_worked_example() -> None:
    """A $0.50/hour machine measured at three request rates:

        1 req/s:  60 output tokens/s, 100% of requests met the SLO
        2 req/s: 150 output tokens/s,  95% met it
        4 req/s: 180 output tokens/s,  50% met it (overloaded)

    The SLO load (>= 90% of requests meeting it, highest throughput) is 2 req/s:
        150 tokens/s * 3600 s = 540,000 tokens/hour; $0.50 / 0.54M tokens = $0.9259 per 1M output tokens;
        users = floor(150 / 20) = 7.
    Peak throughput is 4 req/s: 180 * 3600 = 648,000 tokens/hour; $0.50 / 0.648 = $0.7716 per 1M.
    """
    points = [("1 req/s", point(60.0, 1.0)), ("2 req/s", point(150.0, 0.95)), ("4 req/s", point(180.0, 0.5))]
    report = cost_report(points, price_per_hour=0.50, slo=Slo(1.0, 20.0), attainment_target=0.9)
    assert report.slo_label == "2 req/s" and report.slo_output_tokens_per_s == 150.0
    assert report.cost_per_million_at_slo == pytest.approx(0.50 / 0.54)
    assert report.cost_per_million_at_slo == pytest.approx(0.9259, abs=1e-4)
    assert report.users_at_slo == 7
    assert report.peak_label == "4 req/s"
    assert report.cost_per_million_at_peak == pytest.approx(0.7716, abs=1e-4)
    line = describe(report)
    assert "$0.926 per 1M at the SLO load" in line and "serving 7 concurrent users at 20 tokens/s" in line
    assert "$0.772 per 1M output tokens at peak throughput" in line


def test_no_point_meets_the_slo() -> None:
    report = cost_report([("8 req/s", point(200.0, 0.3))], 2.0, Slo(), attainment_target=0.9)
    assert (report.slo_label, report.users_at_slo, report.cost_per_million_at_slo) == (None, 0, None)
    assert report.cost_per_million_at_peak == pytest.approx(2.0 / (200 * 3600) * 1e6)
    assert "no load point met the SLO" in describe(report)


def test_edges() -> None:
    assert cost_per_million_tokens(1.0, 0.0) is None
    assert cost_per_million_tokens(0.0, 10.0) == 0.0
    assert users_served(39.9, 20.0) == 1
    with pytest.raises(ValueError):
        cost_per_million_tokens(-1.0, 10.0)
    with pytest.raises(ValueError):
        cost_report([], 1.0, Slo(), 0.9)
