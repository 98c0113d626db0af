"""Probes and metrics: GET /health (the process answers), /ready (the pinned models loaded), /metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from tokenmill.serving.deps import StateDep
from tokenmill.serving.protocol import HealthStatus, ReadyStatus
from tokenmill.serving.routes.common import json_response

router = APIRouter()


@router.get("/health", response_model=None, responses={200: {"model": HealthStatus}})
async def health() -> Response:
    return json_response(HealthStatus())


@router.get(
    "/ready",
    response_model=None,
    responses={
        200: {
            "model": ReadyStatus,
            "description": "The pinned models are loaded (`error` names any that failed).",
        },
        503: {"model": ReadyStatus, "description": "Models are still loading, or every one failed to load."},
    },
)
async def ready(state: StateDep) -> Response:
    """Ready once the pinned models and the embedders are up. A model that failed to load is named in
    `error`, but the server stays ready while any model serves: a probe that took it out of rotation would
    cut off the models that work. Only when every model failed is it "failed" (503)."""
    models = [model for model, served in state.served.items() if served.owner_org_id is None]
    failed = state.failed_models
    error = "; ".join(f"{model}: {reason}" for model, reason in sorted(failed.items())) or None
    if failed and len(failed) == len(models):
        return json_response(ReadyStatus(status="failed", error=error, models=models), status_code=503)
    if state.ready:
        return json_response(ReadyStatus(status="ready", error=error, models=models))
    return json_response(ReadyStatus(status="loading", models=models), status_code=503)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus"}},
)
async def metrics(state: StateDep) -> Response:
    content, content_type = state.metrics.render()
    return Response(content=content, media_type=content_type)
