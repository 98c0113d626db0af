"""The interference report of `bench serve --with-batch`: the comparison's arithmetic, and the reworded
second run (same lengths, nothing shared with the first in the prefix cache)."""

from __future__ import annotations

import json

from tokenmill.bench import tidal
from tokenmill.bench.client import Target
from tokenmill.bench.metrics import Slo, summarize
from tokenmill.bench.record import RequestRecord
from tokenmill.bench.workload import SyntheticWorkload


def _record(send_s: float, ttft_s: float, tpot_s: float, tokens: int) -> RequestRecord:
    first = send_s + ttft_s
    chunks = [first + i * tpot_s for i in range(tokens)]
    return RequestRecord(
        send_s=send_s,
        end_s=chunks[-1],
        chunk_times_s=chunks,
        prompt_tokens=10,
        output_tokens=tokens,
        error=None,
    )


def test_compare_reports_latency_ratios_and_total_throughput() -> None:
    slo = Slo(1.0, 20.0)
    alone = summarize([_record(0.0, 0.1, 0.05, 11), _record(1.0, 0.1, 0.05, 11)], slo)
    beside = summarize([_record(0.0, 0.11, 0.055, 11), _record(1.0, 0.11, 0.055, 11)], slo)
    result = tidal.compare(alone, beside, tidal.BatchWindow("batch_x", 3, 30))
    assert abs(result.ttft_p50_ratio - 1.1) < 1e-9 and abs(result.tpot_p50_ratio - 1.1) < 1e-9
    assert result.total_output_tokens_per_s_with_batch == (22 + 30) / beside.duration_s
    assert "| 1.10x | 1.10x |" in tidal.markdown([result])
    slower = tidal.compare(alone, alone, tidal.BatchWindow("batch_y", 0, 0))
    assert tidal.summary([result, slower, result])["ttft_p50_ratio"] == result.ttft_p50_ratio  # the median


def test_the_second_run_has_the_same_lengths_and_no_shared_prefix() -> None:
    workload = SyntheticWorkload(input_len=64, output_len=16, range_ratio=0.3, seed=3)
    again = tidal.Reworded(workload)
    for index in range(5):
        first, second = workload.request(index), again.request(index)
        assert second.max_tokens == first.max_tokens
        assert second.messages[-1]["content"] == "Again: " + first.messages[-1]["content"]


def test_batch_lines_are_the_live_requests_unstreamed() -> None:
    target = Target("http://x/v1", "m", extra_body={"logit_bias": {"2": -100}})
    lines = [json.loads(line) for line in tidal.batch_input(target, SyntheticWorkload(8, 4), 3).splitlines()]
    assert [line["custom_id"] for line in lines] == ["bench-0", "bench-1", "bench-2"]
    body = lines[0]["body"]
    assert lines[0]["url"] == "/v1/chat/completions" and body["model"] == "m" and body["max_tokens"] == 4
    assert "stream" not in body and "stream_options" not in body and body["logit_bias"] == {"2": -100}
