"""A replica's EngineStats across its workers' lives: the serving worker's last report, plus the totals of
the workers before it (each counts from zero, and /metrics exports the totals as counters, which must not
go back after a restart)."""

from __future__ import annotations

import dataclasses
import threading

from tokenmill.engine.client import EngineStats

TOTALS = (
    "num_prompt_tokens",
    "num_cached_prompt_tokens",
    "num_generated_tokens",
    "num_batch_tokens",
    "num_interactive_tokens",
    "num_batch_preemptions",
    "num_tpot_limited_steps",
)
"""The EngineStats fields that are totals since start."""


class StatsAcrossWorkers:
    """Written by the reader thread of the serving worker, read from any thread (/metrics, the router), and
    moved from one worker to the next on the event loop: under one lock, so a worker's totals are never
    counted twice or lost in between."""

    def __init__(self, first: EngineStats) -> None:
        self._lock = threading.Lock()
        self._source: object = None
        self._latest = first
        self._retired = _with_totals(first, dict.fromkeys(TOTALS, 0))

    def serve(self, source: object, stats: EngineStats) -> None:
        """From now on `source` (a worker) reports; `stats` is its first report."""
        with self._lock:
            self._source, self._latest = source, stats

    def report(self, source: object, stats: EngineStats) -> None:
        """Ignored unless `source` is the serving worker: a retired one may still have a message in flight."""
        with self._lock:
            if source is self._source:
                self._latest = stats

    def retire(self) -> None:
        """The serving worker is gone: its totals carry on, and nothing runs or holds KV until the next."""
        with self._lock:
            latest, self._source = self._latest, None
            self._retired = _with_totals(
                self._retired, {name: getattr(self._retired, name) + getattr(latest, name) for name in TOTALS}
            )
            self._latest = dataclasses.replace(
                _with_totals(latest, dict.fromkeys(TOTALS, 0)),
                num_running_seqs=0,
                num_waiting_seqs=0,
                num_free_blocks=latest.num_total_blocks,
                num_batch_running_seqs=0,
                num_batch_waiting_seqs=0,
            )

    def current(self) -> EngineStats:
        with self._lock:
            latest, retired = self._latest, self._retired
        return _with_totals(latest, {name: getattr(latest, name) + getattr(retired, name) for name in TOTALS})


def _with_totals(stats: EngineStats, totals: dict[str, int]) -> EngineStats:
    return dataclasses.replace(stats, **totals)
