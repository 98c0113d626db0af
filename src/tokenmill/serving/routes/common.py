"""Small pieces the generation routes share."""

from __future__ import annotations

import uuid

from fastapi.responses import Response
from pydantic import BaseModel

from tokenmill.serving.errors import APIError
from tokenmill.serving.protocol import GenerationRequest


def json_response(body: BaseModel, headers: dict[str, str] | None = None) -> Response:
    return Response(content=body.model_dump_json(), media_type="application/json", headers=headers)


def response_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def include_usage(body: GenerationRequest) -> bool:
    """As OpenAI: `stream_options` without `stream` is a mistake worth telling the caller about."""
    if body.stream_options is not None and not body.stream:
        raise APIError(
            400,
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            param="stream_options",
        )
    return bool(body.stream_options and body.stream_options.include_usage)
