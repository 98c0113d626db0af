"""`tokenmill bench serve --compare-routing [--rounds R] --admin-key KEY`: does prefix-aware routing pay across
a model's replicas? The same load runs under least-load routing and under prefix routing (switched through
the admin API between runs), R times in turn with the order alternating, each run with prompts of its own so
none finds another's in a cache; the report compares the prefix-cache hit rate (cached prompt tokens, as the
server reports them in each response's usage) and TTFT p50, round by round and as medians."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any

from tokenmill.bench.client import Target
from tokenmill.bench.metrics import LoadMetrics

POLICIES = ("least-load", "prefix")


@dataclass(frozen=True, slots=True)
class RoutingRound:
    least_load: LoadMetrics
    prefix: LoadMetrics

    @property
    def ttft_p50_ratio(self) -> float | None:
        """Prefix routing's TTFT p50 over least-load's: below 1 is faster."""
        a, b = self.least_load.ttft_s.p50, self.prefix.ttft_s.p50
        return None if a is None or b is None or a == 0 else b / a


def hit_rate(metrics: LoadMetrics) -> float | None:
    total = metrics.total_input_tokens
    return metrics.cached_input_tokens / total if total else None


def order(round_index: int) -> tuple[str, str]:
    """Alternating, so a drift of the machine over the run favours neither policy."""
    return POLICIES if round_index % 2 == 0 else POLICIES[::-1]


async def set_routing(client: Any, target: Target, admin_key: str, routing: str) -> None:
    url = f"{target.base_url.rstrip('/')}/admin/models/{target.model}/routing"
    response = await client.post(
        url, json={"routing": routing}, headers={"Authorization": f"Bearer {admin_key}"}
    )
    if response.status_code != 200:
        raise ValueError(f"switching {target.model} to {routing} routing failed: {response.text}")


def markdown(rounds: list[RoutingRound]) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.1f} ms"

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:.1%}"

    def x(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"

    lines = [
        "| round | prefix-cache hit rate least-load / prefix | TTFT p50 least-load / prefix | TTFT ratio |",
        "|---|---|---|---|",
    ]
    for n, r in enumerate(rounds, start=1):
        lines.append(
            f"| {n} | {pct(hit_rate(r.least_load))} / {pct(hit_rate(r.prefix))} | "
            f"{ms(r.least_load.ttft_s.p50)} / {ms(r.prefix.ttft_s.p50)} | {x(r.ttft_p50_ratio)} |"
        )
    medians = summary(rounds)
    lines.append(
        f"| median | {pct(medians['hit_rate_least_load'])} / {pct(medians['hit_rate_prefix'])} | "
        f"{ms(medians['ttft_p50_least_load_s'])} / {ms(medians['ttft_p50_prefix_s'])} | "
        f"{x(medians['ttft_p50_ratio'])} |"
    )
    return "\n".join(lines)


def summary(rounds: list[RoutingRound]) -> dict[str, float | None]:
    def median(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return statistics.median(known) if known else None

    return {
        "hit_rate_least_load": median([hit_rate(r.least_load) for r in rounds]),
        "hit_rate_prefix": median([hit_rate(r.prefix) for r in rounds]),
        "ttft_p50_least_load_s": median([r.least_load.ttft_s.p50 for r in rounds]),
        "ttft_p50_prefix_s": median([r.prefix.ttft_s.p50 for r in rounds]),
        "ttft_p50_ratio": median([r.ttft_p50_ratio for r in rounds]),
    }


def as_json(rounds: list[RoutingRound]) -> dict[str, Any]:
    return {
        "rounds": [
            {
                **asdict(r),
                "hit_rate_least_load": hit_rate(r.least_load),
                "hit_rate_prefix": hit_rate(r.prefix),
            }
            for r in rounds
        ],
        "median": summary(rounds),
    }
