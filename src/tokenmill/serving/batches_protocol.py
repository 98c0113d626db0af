"""Bodies of the Batch API, shaped as OpenAI's so its SDK works unchanged."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tokenmill.platform.batches import BatchInfo


class CreateBatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: Annotated[str, Field(min_length=1, max_length=64)]
    endpoint: Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
    completion_window: Literal["24h"]
    metadata: (
        Annotated[
            dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
            Field(max_length=16),
        ]
        | None
    ) = None


class BatchError(BaseModel):
    code: str | None
    message: str | None
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class BatchRequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: str
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: BatchRequestCounts
    metadata: dict[str, str] | None


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


def batch_object(info: BatchInfo) -> BatchObject:
    return BatchObject(
        id=info.id,
        endpoint=info.endpoint,
        errors=None if not info.errors else BatchErrors(data=[BatchError(**e) for e in info.errors]),
        input_file_id=info.input_file_id,
        completion_window=info.completion_window,
        status=info.status,
        output_file_id=info.output_file_id,
        error_file_id=info.error_file_id,
        created_at=_ts(info.created_at),
        in_progress_at=_ts(info.in_progress_at),
        expires_at=_ts(info.expires_at),
        finalizing_at=_ts(info.finalizing_at),
        completed_at=_ts(info.completed_at),
        failed_at=_ts(info.failed_at),
        expired_at=_ts(info.expired_at) if info.status == "expired" else None,
        cancelling_at=_ts(info.cancelling_at),
        cancelled_at=_ts(info.cancelled_at),
        request_counts=BatchRequestCounts(
            total=info.request_counts.total,
            completed=info.request_counts.completed,
            failed=info.request_counts.failed,
        ),
        metadata=info.metadata,
    )


def _ts(moment: datetime | None) -> Any:
    return None if moment is None else int(moment.timestamp())
