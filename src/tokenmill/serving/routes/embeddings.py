"""POST /v1/embeddings."""

from __future__ import annotations

import base64

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response

from tokenmill.engine.sampling_params import InvalidRequestError
from tokenmill.serving.deps import PrincipalDep, RequestIdDep, StateDep
from tokenmill.serving.errors import APIError
from tokenmill.serving.generation import until_disconnected
from tokenmill.serving.metering import admit
from tokenmill.serving.openapi import GENERATION, documented
from tokenmill.serving.origin import OriginDep
from tokenmill.serving.prompts import prompt_list
from tokenmill.serving.protocol import EmbeddingData, EmbeddingList, EmbeddingRequest, EmbeddingUsage
from tokenmill.serving.routes.common import json_response

router = APIRouter()

MAX_INPUTS = 2048  # OpenAI's limit per request


def _inputs(raw: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    inputs = prompt_list(raw, "input")
    if len(inputs) > MAX_INPUTS:
        raise InvalidRequestError(f"input: at most {MAX_INPUTS} inputs per request", param="input")
    return inputs


def _encode(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # OpenAI's format: little-endian float32, base64
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


@router.post("/v1/embeddings", response_model=None, responses=documented(EmbeddingList, *GENERATION))
async def create_embeddings(
    body: EmbeddingRequest,
    request: Request,
    state: StateDep,
    principal: PrincipalDep,
    request_id: RequestIdDep,
    origin: OriginDep,
) -> Response:
    listing = await state.resolve(body.model, principal)
    embedder = state.embedder(listing)
    if body.dimensions is not None and body.dimensions != embedder.dimensions:
        raise APIError(
            400,
            f"The model `{body.model}` produces {embedder.dimensions}-dimensional embeddings "
            "and cannot shorten them.",
            param="dimensions",
        )
    # Tokenized first: an input the model cannot take is a 400 before any limit or quota is touched, and
    # the reservation is the exact token count.
    token_ids = await embedder.tokenize(_inputs(body.input))
    num_tokens = sum(len(ids) for ids in token_ids)
    meter = await admit(state.gateway, state.spawn, principal, listing, num_tokens, 0, request_id, origin)
    async with meter.running(lambda: (num_tokens, 0)):
        vectors = await until_disconnected(request.receive, embedder.embed(token_ids))
    state.metrics.prompt_tokens.labels(body.model).inc(num_tokens)
    data = [EmbeddingData(index=i, embedding=_encode(v, body.encoding_format)) for i, v in enumerate(vectors)]
    return json_response(
        EmbeddingList(
            data=data,
            model=body.model,
            usage=EmbeddingUsage(prompt_tokens=num_tokens, total_tokens=num_tokens),
        ),
        headers=meter.headers,
    )
