"""GET /v1/models and /v1/models/{id}: the chat and embedding models this server serves that the caller's key
may use (a model outside its allow-list is not listed, and looks like any unknown model)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from tokenmill.platform.auth import KeyPrincipal
from tokenmill.serving.deps import PrincipalDep, StateDep
from tokenmill.serving.errors import model_not_found
from tokenmill.serving.openapi import ALWAYS, documented
from tokenmill.serving.protocol import ModelCard, ModelList
from tokenmill.serving.routes.common import json_response
from tokenmill.serving.state import ServingState

router = APIRouter()


def _cards(state: ServingState, principal: KeyPrincipal) -> list[ModelCard]:
    chat = [
        ModelCard(id=model, created=state.created, type="chat", max_model_len=engine.max_model_len)
        for model, engine in state.engines.items()
    ]
    embedding = [
        ModelCard(id=model, created=state.created, type="embedding", max_model_len=e.max_input_tokens)
        for model, e in state.embedders.items()
    ]
    return [card for card in chat + embedding if principal.may_use(card.id)]


@router.get("/v1/models", response_model=None, responses=documented(ModelList, *ALWAYS))
async def list_models(state: StateDep, principal: PrincipalDep) -> Response:
    return json_response(ModelList(data=_cards(state, principal)))


@router.get("/v1/models/{model_id:path}", response_model=None, responses=documented(ModelCard, *ALWAYS, 404))
async def retrieve_model(model_id: str, state: StateDep, principal: PrincipalDep) -> Response:
    for card in _cards(state, principal):
        if card.id == model_id:
            return json_response(card)
    raise model_not_found(model_id)
