"""Live figures as a buyer reads them: exact nearest-rank percentiles, rates from real outcomes, and nothing
older than the window (a fake clock, no sleeps)."""

from __future__ import annotations

import pytest

from tokenmill.catalog.live import LiveFigures, LiveStats, nearest_rank


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_nearest_rank_percentiles_are_measured_values():
    values = [0.1 * i for i in range(1, 21)]  # 0.1 .. 2.0, twenty values
    assert nearest_rank(values, 50) == values[9]  # rank ceil(0.50 * 20) = 10
    assert nearest_rank(values, 95) == values[18]  # rank ceil(0.95 * 20) = 19, not an interpolation
    assert nearest_rank(values, 100) == values[19]
    assert nearest_rank([3.0, 5.0, 8.0], 50) == 5.0  # rank ceil(1.5) = 2
    assert nearest_rank([3.0, 5.0, 8.0, 13.0], 50) == 5.0  # rank 2: the lower middle, never 6.5
    assert nearest_rank([7.0], 95) == 7.0
    assert nearest_rank([], 50) is None


def test_a_model_without_recent_traffic_has_no_figures(clock):
    figures = LiveStats(clock=clock).figures("smollm2")
    assert figures == LiveFigures(900, 0, 0, 0, None, None, None, None, None)
    assert not figures.has_traffic


def test_figures_from_mixed_outcomes(clock):
    stats = LiveStats(window_s=60, clock=clock)
    for ttft, speed in [(0.30, 40.0), (0.10, 55.0), (0.20, 50.0), (0.90, 10.0)]:
        stats.record_request("m", ok=True, ttft_s=ttft, output_tokens_per_s=speed)
    stats.record_request("m", ok=False, ttft_s=None, output_tokens_per_s=None)  # engine error, no token
    stats.record_refusal("m")
    stats.record_request("other", ok=True, ttft_s=5.0, output_tokens_per_s=1.0)

    figures = stats.figures("m")
    assert figures.has_traffic
    assert (figures.window_s, figures.requests, figures.refused, figures.errors) == (60, 6, 1, 1)
    assert figures.output_tokens_per_s_p50 == 40.0  # sorted 10, 40, 50, 55: rank 2
    assert figures.ttft_p50_s == 0.20  # sorted 0.1, 0.2, 0.3, 0.9: rank 2
    assert figures.ttft_p95_s == 0.90  # rank 4
    assert figures.error_rate == 1 / 5
    assert figures.availability == 5 / 6


def test_only_refusals_mean_no_error_rate_and_zero_availability(clock):
    stats = LiveStats(clock=clock)
    stats.record_refusal("m")
    figures = stats.figures("m")
    assert (figures.requests, figures.error_rate, figures.availability) == (1, None, 0.0)


def test_events_leave_the_window(clock):
    stats = LiveStats(window_s=60, clock=clock)
    stats.record_request("m", ok=True, ttft_s=9.0, output_tokens_per_s=1.0)  # at t=1000
    clock.now = 1030.0
    stats.record_request("m", ok=True, ttft_s=0.5, output_tokens_per_s=20.0)  # at t=1030

    clock.now = 1059.9
    assert stats.figures("m").requests == 2
    clock.now = 1060.0  # the first is exactly 60 s old: out
    figures = stats.figures("m")
    assert (figures.requests, figures.ttft_p95_s, figures.output_tokens_per_s_p50) == (1, 0.5, 20.0)
    clock.now = 1090.0
    assert not stats.figures("m").has_traffic


def test_max_events_keeps_the_newest(clock):
    stats = LiveStats(clock=clock, max_events=3)
    for ttft in (1.0, 2.0, 3.0, 4.0, 5.0):
        clock.now += 1
        stats.record_request("m", ok=True, ttft_s=ttft, output_tokens_per_s=None)
    figures = stats.figures("m")
    assert (figures.requests, figures.ttft_p50_s, figures.ttft_p95_s) == (3, 4.0, 5.0)
    assert figures.output_tokens_per_s_p50 is None


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_impossible_measures_are_refused(clock, bad):
    with pytest.raises(ValueError, match="ttft_s: must be a finite number >= 0"):
        LiveStats(clock=clock).record_request("m", ok=True, ttft_s=bad, output_tokens_per_s=1.0)
