"""A saved run (results JSON written with --save-requests) read back as load points and request logs, so the
same measurements can be reported again under another SLO or hardware price without sending any traffic."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from tokenmill.bench.load import LoadShape
from tokenmill.bench.record import RequestRecord

RECORD_FIELDS = {f.name for f in fields(RequestRecord)}


def load_run(path: Path) -> tuple[dict[str, Any], list[tuple[LoadShape, list[RequestRecord]]]]:
    """The run's settings and, per load point, its shape and request log."""
    saved = json.loads(path.read_text())
    measured = []
    for point in saved["points"]:
        if "requests" not in point:
            raise ValueError(f"{path} holds no request log: measure again with --save-requests")
        records = [
            RequestRecord(**{k: v for k, v in r.items() if k in RECORD_FIELDS}) for r in point["requests"]
        ]
        rate = point["request_rate"]
        shape = LoadShape(
            request_rate=None if rate is None else float(rate),  # float("inf") reads the saved "inf"
            concurrency=point["concurrency"],
            num_requests=max(1, len(records)),
        )
        measured.append((shape, records))
    if not measured:
        raise ValueError(f"{path} holds no load points")
    return saved["config"], measured
