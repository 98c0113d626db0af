"""The operator's view of batch work: how much is queued, how fast it goes, and what it costs live traffic
(the share of engine steps batch work took, and how often it had to give memory back)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from pydantic import BaseModel

from tokenmill.serving.deps import StateDep
from tokenmill.serving.openapi import documented
from tokenmill.serving.routes.admin import READ
from tokenmill.serving.routes.common import json_response

router = APIRouter(prefix="/v1/admin")


class ModelBatchFigures(BaseModel):
    model: str
    lines_in_flight: int
    batch_tokens: int
    """Tokens the engine computed for batch sequences since it started (prompt and generated)."""
    interactive_tokens: int
    batch_share: float | None
    """batch_tokens / all tokens computed: the share of the engine's work batch lines took."""
    batch_preemptions: int
    """Times a batch sequence gave its memory back to live traffic (it is recomputed later)."""


class BatchFigures(BaseModel):
    object: str = "batch.figures"
    queued_lines: int
    lines_per_s: float
    """Over the last minute."""
    off_peak: bool
    models: list[ModelBatchFigures]


@router.get("/batches", response_model=None, responses=documented(BatchFigures, *READ))
def batch_figures(state: StateDep) -> Response:
    dispatcher = state.batches
    in_flight = {} if dispatcher is None else dispatcher.lines_in_flight
    models = []
    for model, stats in state.engine_stats():
        total = stats.num_batch_tokens + stats.num_interactive_tokens
        models.append(
            ModelBatchFigures(
                model=model,
                lines_in_flight=in_flight.get(model, 0),
                batch_tokens=stats.num_batch_tokens,
                interactive_tokens=stats.num_interactive_tokens,
                batch_share=stats.num_batch_tokens / total if total else None,
                batch_preemptions=stats.num_batch_preemptions,
            )
        )
    return json_response(
        BatchFigures(
            queued_lines=0 if dispatcher is None else dispatcher.queued_lines,
            lines_per_s=0.0 if dispatcher is None else dispatcher.lines_per_s,
            off_peak=state.tidal.is_off_peak(),
            models=models,
        )
    )
