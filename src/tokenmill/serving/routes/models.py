"""GET /v1/models and /v1/models/{id}: exactly the models the caller's key may call here, each `owned_by` its
provider (a model outside its allow-list, or not visible to its organization, looks like any unknown model)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from tokenmill.platform.principal import KeyPrincipal
from tokenmill.serving.deps import PrincipalDep, StateDep
from tokenmill.serving.errors import model_not_found
from tokenmill.serving.openapi import ALWAYS, documented
from tokenmill.serving.protocol import ModelCard, ModelList
from tokenmill.serving.routes.common import json_response
from tokenmill.serving.state import ServingState

router = APIRouter()


async def _cards(state: ServingState, principal: KeyPrincipal) -> list[ModelCard]:
    return [
        ModelCard(
            id=listing.model,
            created=int(listing.created_at.timestamp()) or state.created,
            owned_by=listing.provider,
            type="embedding" if state.served[listing.model].task == "embedding" else "chat",
            max_model_len=state.context_length(listing),
        )
        for listing in await state.visible_listings(principal)
    ]


@router.get("/v1/models", response_model=None, responses=documented(ModelList, *ALWAYS))
async def list_models(state: StateDep, principal: PrincipalDep) -> Response:
    return json_response(ModelList(data=await _cards(state, principal)))


@router.get("/v1/models/{model_id:path}", response_model=None, responses=documented(ModelCard, *ALWAYS, 404))
async def retrieve_model(model_id: str, state: StateDep, principal: PrincipalDep) -> Response:
    for card in await _cards(state, principal):
        if card.id == model_id:
            return json_response(card)
    raise model_not_found(model_id)
