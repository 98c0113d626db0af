"""A hand-made request log whose every metric is worked out by hand in test_metrics.py."""

from __future__ import annotations

from tokenmill.bench.record import RequestRecord


def hand_made_log() -> list[RequestRecord]:
    """Five requests over a 3.5 s window (first send 0.0, last end 3.5):

    r1  send 0.0  chunks 0.5 0.6 0.8 1.0  end 1.0  usage 10 in / 5 out (4 chunks: a mismatch)  slow decode
    r2  send 1.0  chunks 1.20 .. 1.40 every 0.04  end 1.4  usage 20 in / 6 out                    meets SLO
    r3  send 2.0  chunk 3.5  end 3.5  usage 5 in / 1 out                                           TTFT 1.5 s
    r4  send 2.5  HTTP 429 at 2.6
    r5  send 3.0  chunk 3.1  end 3.2  usage 7 in / 1 out                                           meets SLO
    """
    return [
        RequestRecord(0.0, 1.0, [0.5, 0.6, 0.8, 1.0], prompt_tokens=10, output_tokens=5),
        RequestRecord(1.0, 1.4, [1.2, 1.24, 1.28, 1.32, 1.36, 1.4], prompt_tokens=20, output_tokens=6),
        RequestRecord(2.0, 3.5, [3.5], prompt_tokens=5, output_tokens=1),
        RequestRecord(2.5, 2.6, error="HTTP 429", error_detail="rate limited"),
        RequestRecord(3.0, 3.2, [3.1], prompt_tokens=7, output_tokens=1, cached_tokens=4),
    ]
