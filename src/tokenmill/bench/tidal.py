"""`tokenmill bench serve --with-batch N [--rounds R]`: does batch work hurt live traffic? The same live load
runs alone and then beside a batch of N lines submitted through the Batch API with the same key, R times in
turn, and the report compares the live requests' TTFT and TPOT (p50) and the machine's total output tokens/s
(live tokens plus those of the batch lines finished inside the window), round by round and as medians."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

from tokenmill.bench.client import Target
from tokenmill.bench.metrics import LoadMetrics
from tokenmill.bench.workload import BenchRequest, Workload

BATCH_SEED_OFFSET = 2_000_003  # the batch's prompts share nothing with the live ones
START_TIMEOUT_S = 120.0
CLOSED = ("completed", "failed", "expired", "cancelled")


@dataclass(frozen=True, slots=True)
class BatchWindow:
    """What the batch did while the live load ran."""

    batch_id: str
    lines_done: int
    output_tokens: int
    """`lines_done` x the batch's max_tokens: its lines generate exactly that many (EOS is suppressed by
    --extra-body, as for the live load) or, if not, at most that many."""


@dataclass(frozen=True, slots=True)
class Interference:
    alone: LoadMetrics
    beside_batch: LoadMetrics
    batch: BatchWindow
    ttft_p50_ratio: float | None
    tpot_p50_ratio: float | None
    total_output_tokens_per_s_alone: float
    total_output_tokens_per_s_with_batch: float


def compare(alone: LoadMetrics, beside: LoadMetrics, batch: BatchWindow) -> Interference:
    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or a == 0 else b / a

    window = beside.duration_s
    return Interference(
        alone=alone,
        beside_batch=beside,
        batch=batch,
        ttft_p50_ratio=ratio(alone.ttft_s.p50, beside.ttft_s.p50),
        tpot_p50_ratio=ratio(alone.tpot_s.p50, beside.tpot_s.p50),
        total_output_tokens_per_s_alone=alone.output_tokens_per_s,
        total_output_tokens_per_s_with_batch=(
            (beside.total_output_tokens + batch.output_tokens) / window if window > 0 else 0.0
        ),
    )


@dataclass(frozen=True, slots=True)
class Reworded:
    """The same requests (lengths, and arrival times when run with the same seed) with a different first
    word, so a second run of them finds nothing of the first in the prefix cache: the live load beside the
    batch is the live load alone, not an easier one."""

    workload: Workload
    word: str = "Again:"

    def request(self, index: int) -> BenchRequest:
        request = self.workload.request(index)
        *before, last = request.messages
        messages = (*before, {**last, "content": f"{self.word} {last['content']}"})
        prompt = None if request.prompt is None else f"{self.word} {request.prompt}"
        return BenchRequest(messages, prompt, request.max_tokens)


def batch_input(target: Target, workload: Workload, num_lines: int) -> bytes:
    """One JSONL line per request of `workload`, bodies as the live load sends them but not streamed."""
    lines = []
    for index in range(num_lines):
        body = {
            k: v
            for k, v in target.body(workload.request(index)).items()
            if k not in ("stream", "stream_options")
        }
        lines.append(
            json.dumps({"custom_id": f"bench-{index}", "method": "POST", "url": _path(target), "body": body})
        )
    return ("\n".join(lines) + "\n").encode()


async def start_batch(client: Any, target: Target, content: bytes) -> str:
    """Upload and submit; returns once the batch has answered its first line (it is running)."""
    base = target.base_url.rstrip("/")
    uploaded = await client.post(
        f"{base}/files",
        headers=target.headers,
        files={"file": ("bench-batch.jsonl", content, "application/jsonl")},
        data={"purpose": "batch"},
    )
    uploaded.raise_for_status()
    created = await client.post(
        f"{base}/batches",
        headers=target.headers,
        json={"input_file_id": uploaded.json()["id"], "endpoint": _path(target), "completion_window": "24h"},
    )
    created.raise_for_status()
    batch_id = created.json()["id"]
    deadline = time.monotonic() + START_TIMEOUT_S
    while await lines_done(client, target, batch_id) < 1:
        if time.monotonic() > deadline:
            raise ValueError(f"batch {batch_id} answered no line in {START_TIMEOUT_S:.0f} s")
        await asyncio.sleep(0.2)
    return batch_id


async def lines_done(client: Any, target: Target, batch_id: str) -> int:
    response = await client.get(f"{target.base_url.rstrip('/')}/batches/{batch_id}", headers=target.headers)
    response.raise_for_status()
    batch = response.json()
    if batch["status"] in ("failed", "expired", "cancelled"):
        raise ValueError(f"batch {batch_id} is {batch['status']}: {batch.get('errors')}")
    return int(batch["request_counts"]["completed"])


async def cancel_batch(client: Any, target: Target, batch_id: str) -> None:
    """Returns once the batch has closed, so nothing of it runs into the next measurement."""
    url = f"{target.base_url.rstrip('/')}/batches/{batch_id}"
    await client.post(f"{url}/cancel", headers=target.headers)
    deadline = time.monotonic() + START_TIMEOUT_S
    while (await client.get(url, headers=target.headers)).json()["status"] not in CLOSED:
        if time.monotonic() > deadline:
            raise ValueError(f"batch {batch_id} did not close in {START_TIMEOUT_S:.0f} s after its cancel")
        await asyncio.sleep(0.2)


def markdown(rounds: list[Interference]) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.1f} ms"

    def x(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"

    lines = [
        "| round | TTFT p50 alone / beside | TPOT p50 alone / beside | total output tok/s alone / beside "
        "| TTFT | TPOT | total tok/s | batch lines |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, r in enumerate(rounds, start=1):
        a, b = r.alone, r.beside_batch
        lines.append(
            f"| {n} | {ms(a.ttft_s.p50)} / {ms(b.ttft_s.p50)} | {ms(a.tpot_s.p50)} / {ms(b.tpot_s.p50)} | "
            f"{r.total_output_tokens_per_s_alone:.1f} / {r.total_output_tokens_per_s_with_batch:.1f} | "
            f"{x(r.ttft_p50_ratio)} | {x(r.tpot_p50_ratio)} | {x(throughput_ratio(r))} | {r.batch.lines_done} |"
        )
    medians = summary(rounds)
    lines.append(
        f"| median | | | | {x(medians['ttft_p50_ratio'])} | {x(medians['tpot_p50_ratio'])} | "
        f"{x(medians['total_output_tokens_per_s_ratio'])} | |"
    )
    return "\n".join(lines)


def throughput_ratio(result: Interference) -> float | None:
    alone = result.total_output_tokens_per_s_alone
    return None if alone == 0 else result.total_output_tokens_per_s_with_batch / alone


def summary(rounds: list[Interference]) -> dict[str, float | None]:
    """Median ratios over the rounds (beside the batch / alone)."""

    def median(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return statistics.median(known) if known else None

    return {
        "ttft_p50_ratio": median([r.ttft_p50_ratio for r in rounds]),
        "tpot_p50_ratio": median([r.tpot_p50_ratio for r in rounds]),
        "total_output_tokens_per_s_ratio": median([throughput_ratio(r) for r in rounds]),
    }


def as_json(rounds: list[Interference]) -> dict[str, Any]:
    return {"rounds": [asdict(r) for r in rounds], "median": summary(rounds)}


def _path(target: Target) -> str:
    return "/v1/chat/completions" if target.endpoint == "chat" else "/v1/completions"
