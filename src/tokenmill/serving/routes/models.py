"""GET /v1/models and /v1/models/{id}: every chat and embedding model this server serves."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from tokenmill.serving.deps import StateDep
from tokenmill.serving.errors import model_not_found
from tokenmill.serving.protocol import ModelCard, ModelList
from tokenmill.serving.routes.common import json_response
from tokenmill.serving.state import ServingState

router = APIRouter()


def _cards(state: ServingState) -> list[ModelCard]:
    chat = [
        ModelCard(id=model, created=state.created, type="chat", max_model_len=engine.max_model_len)
        for model, engine in state.engines.items()
    ]
    embedding = [
        ModelCard(id=model, created=state.created, type="embedding", max_model_len=e.max_input_tokens)
        for model, e in state.embedders.items()
    ]
    return chat + embedding


@router.get("/v1/models", response_model=None)
async def list_models(state: StateDep) -> Response:
    return json_response(ModelList(data=_cards(state)))


@router.get("/v1/models/{model_id:path}", response_model=None)
async def retrieve_model(model_id: str, state: StateDep) -> Response:
    for card in _cards(state):
        if card.id == model_id:
            return json_response(card)
    raise model_not_found(model_id)
