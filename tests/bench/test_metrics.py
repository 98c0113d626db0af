"""Every serving metric against the hand-made log of logs.py, worked out by hand."""

from __future__ import annotations

import random

import numpy as np
import pytest

from tests.bench.logs import hand_made_log
from tokenmill.bench.metrics import (
    Distribution,
    Slo,
    check_tokens,
    inter_token_latencies_s,
    percentile,
    summarize,
    tpot_s,
    ttft_s,
    window_s,
)
from tokenmill.bench.record import RequestRecord

approx = pytest.approx


def test_ttft_is_first_token_time_minus_send_time() -> None:
    assert [ttft_s(r) for r in hand_made_log()] == approx([0.5, 0.2, 1.5, None, 0.1])


def test_tpot_divides_decode_time_by_the_servers_tokens_after_the_first() -> None:
    r1, r2, r3, r4, r5 = hand_made_log()
    assert tpot_s(r1) == approx((1.0 - 0.5) / (5 - 1))  # usage says 5 tokens though 4 chunks came
    assert tpot_s(r2) == approx((1.4 - 1.2) / (6 - 1))
    assert tpot_s(r3) is None and tpot_s(r5) is None  # one token: no decode phase
    assert tpot_s(r4) is None  # failed


def test_inter_token_latencies_are_gaps_between_chunks() -> None:
    r1, r2, r3, _, _ = hand_made_log()
    assert inter_token_latencies_s(r1) == approx([0.1, 0.2, 0.2])
    assert inter_token_latencies_s(r2) == approx([0.04] * 5)
    assert inter_token_latencies_s(r3) == []


def test_percentile_matches_numpy() -> None:
    rng = random.Random(7)
    values = [rng.expovariate(3.0) for _ in range(101)]
    for q in (0, 1, 50, 90, 99, 100):
        assert percentile(values, q) == approx(float(np.percentile(values, q)))
    assert percentile([4.0], 99) == 4.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_distribution_of_nothing_is_empty_not_zero() -> None:
    assert Distribution.of([]) == Distribution(0, None, None, None, None)


def test_slo_met_by() -> None:
    slo = Slo(ttft_s=1.0, min_tokens_per_s=20.0)
    assert [slo.met_by(r) for r in hand_made_log()] == [False, True, False, False, True]
    # r1 decodes at 8 tokens/s: a looser per-stream floor lets it through.
    assert Slo(ttft_s=1.0, min_tokens_per_s=8.0).met_by(hand_made_log()[0])
    with pytest.raises(ValueError, match="ttft_s"):
        Slo(ttft_s=0.0)


def test_window_is_first_send_to_last_end() -> None:
    assert window_s(hand_made_log()) == approx(3.5)
    assert window_s(hand_made_log()[1:2]) == approx(0.4)
    assert window_s([]) == 0.0


def test_summary_of_the_hand_made_log() -> None:
    m = summarize(hand_made_log(), Slo(ttft_s=1.0, min_tokens_per_s=20.0))
    assert (m.num_requests, m.num_ok, m.duration_s) == (5, 4, approx(3.5))
    assert m.request_throughput == approx(4 / 3.5)
    assert (m.total_input_tokens, m.total_output_tokens, m.cached_input_tokens) == (42, 13, 4)
    assert m.input_tokens_per_s == approx(42 / 3.5)
    assert m.output_tokens_per_s == approx(13 / 3.5)
    # TTFT over the four successes: 0.5, 0.2, 1.5, 0.1 -> sorted 0.1 0.2 0.5 1.5.
    assert m.ttft_s.count == 4 and m.ttft_s.mean == approx(0.575)
    assert (m.ttft_s.p50, m.ttft_s.p90, m.ttft_s.p99) == (approx(0.35), approx(1.2), approx(1.47))
    # TPOT: r1 0.125, r2 0.04.
    assert m.tpot_s.count == 2 and m.tpot_s.mean == approx(0.0825)
    assert (m.tpot_s.p50, m.tpot_s.p90) == (approx(0.0825), approx(0.04 + 0.9 * 0.085))
    # ITL pooled: 0.1 0.2 0.2 and five 0.04.
    assert m.itl_s.count == 8 and m.itl_s.mean == approx(0.7 / 8)
    assert (m.itl_s.p50, m.itl_s.p90, m.itl_s.p99) == (approx(0.04), approx(0.2), approx(0.2))
    assert m.e2e_latency_s.mean == approx((1.0 + 0.4 + 1.5 + 0.2) / 4)
    # Goodput: r2 (6 tokens) and r5 (1 token) of five requests.
    assert m.slo_attainment == approx(2 / 5)
    assert m.goodput_requests_per_s == approx(2 / 3.5)
    assert m.goodput_output_tokens_per_s == approx(7 / 3.5)
    assert m.errors == {"HTTP 429": 1}


def test_token_check_reports_mismatches_and_missing_usage() -> None:
    check = check_tokens(hand_made_log())
    assert check.num_mismatched_requests == 1  # r1: usage 5, 4 chunks
    assert (check.usage_output_tokens, check.streamed_output_tokens, check.num_missing_usage) == (13, 12, 0)
    no_usage = RequestRecord(0.0, 1.0, [0.2, 0.4, 0.6])
    check = check_tokens([no_usage])
    assert (check.num_missing_usage, check.num_mismatched_requests) == (1, 0)
    # Without usage the client's count stands in, so throughput is still measured.
    assert summarize([no_usage], Slo()).total_output_tokens == 3


def test_all_failed() -> None:
    m = summarize([RequestRecord(0.0, 2.0, error="ConnectError")], Slo())
    assert (m.num_ok, m.output_tokens_per_s, m.slo_attainment) == (0, 0.0, 0.0)
    assert m.ttft_s.p50 is None and m.errors == {"ConnectError": 1}
