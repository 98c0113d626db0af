"""Probes and metrics: GET /health (the process answers), /ready (every model loaded), /metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from tokenmill.serving.deps import StateDep

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", response_model=None)
async def ready(state: StateDep) -> JSONResponse:
    models = [*state.engines, *state.embedders]
    if state.ready:
        return JSONResponse({"status": "ready", "models": models})
    if state.startup_error is not None:
        return JSONResponse(
            {"status": "failed", "error": state.startup_error, "models": models}, status_code=503
        )
    return JSONResponse({"status": "loading", "models": models}, status_code=503)


@router.get("/metrics", response_model=None)
async def metrics(state: StateDep) -> Response:
    content, content_type = state.metrics.render()
    return Response(content=content, media_type=content_type)
