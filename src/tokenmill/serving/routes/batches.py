"""/v1/batches as OpenAI defines it: create (the input file checked line by line before the batch exists),
list, retrieve, cancel. The lines themselves are answered by this gateway's `BatchDispatcher`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from tokenmill.platform import batches
from tokenmill.platform.audit import record_foreign_access
from tokenmill.platform.errors import NotFound
from tokenmill.platform.files import get_file, read_file_bytes
from tokenmill.platform.principal import KeyPrincipal
from tokenmill.serving.batch_input import check_input, error_object, response_json
from tokenmill.serving.batches_protocol import BatchList, BatchObject, CreateBatchRequest, batch_object
from tokenmill.serving.deps import PrincipalDep, StateDep
from tokenmill.serving.errors import APIError, handled_response
from tokenmill.serving.openapi import ALWAYS, documented
from tokenmill.serving.routes.common import json_response
from tokenmill.serving.routes.files import DataDep

router = APIRouter()
MAX_PAGE = 100
_TASKS = {"/v1/chat/completions": "chat", "/v1/completions": "chat", "/v1/embeddings": "embedding"}


@router.post("/v1/batches", response_model=None, responses=documented(BatchObject, *ALWAYS, 404))
async def create_batch(
    body: CreateBatchRequest, request: Request, state: StateDep, principal: PrincipalDep, services: DataDep
) -> Response:
    """Every line is checked now: a bad line is answered with its error (charged nothing) and the others
    run; a file that is not a batch input file at all makes a `failed` batch naming each problem's line."""
    gateway, data = services
    info = await run_in_threadpool(
        get_file, gateway.db, principal.org_id, body.input_file_id, key_id=principal.key_id
    )
    if info.purpose != "batch":
        raise APIError(
            400,
            f"The file {info.id} was uploaded for {info.purpose!r}; a batch's input file must have purpose 'batch'.",
            param="input_file_id",
            code="invalid_file_purpose",
        )
    content = await run_in_threadpool(
        read_file_bytes, gateway.db, data.store, principal.org_id, info.id, principal=principal
    )

    async def check_model(model: str) -> tuple[int, dict[str, Any]] | None:
        try:
            listing = await state.resolve(model, principal)
        except Exception as exc:
            response = await handled_response(request, exc)
            if response is None:
                raise
            return response.status_code, response_json(response)["error"]
        task = state.served[listing.model].task
        if task != _TASKS[body.endpoint]:
            message = f"The model `{model}` is a {task} model: it cannot answer {body.endpoint}."
            return 400, error_object(400, message, "model", "model_not_supported")
        return None

    checked = await check_input(content, body.endpoint, check_model)
    spec = batches.BatchSpec(
        endpoint=body.endpoint,
        input_file_id=info.id,
        completion_window=body.completion_window,
        discount_bps=state.tidal.settings.batch_discount_bps,
        owner=gateway.settings.gateway_id,
        metadata=body.metadata,
    )
    batch = await run_in_threadpool(
        batches.create_batch, gateway.db, principal, spec, checked.lines, checked.file_errors
    )
    state.batches_changed()
    return json_response(batch_object(batch))


@router.get("/v1/batches", response_model=None, responses=documented(BatchList, *ALWAYS, 404))
def list_batches(
    principal: PrincipalDep,
    services: DataDep,
    after: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 20,
) -> Response:
    """Newest first; the next page is `after=` the `last_id` of this one."""
    gateway, _ = services
    page = batches.list_batches(gateway.db, principal.org_id, after=after, limit=limit)
    data = [batch_object(info) for info in page.data]
    return json_response(
        BatchList(
            data=data,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
            has_more=page.has_more,
        )
    )


@router.get("/v1/batches/{batch_id}", response_model=None, responses=documented(BatchObject, *ALWAYS, 404))
def retrieve_batch(batch_id: str, principal: PrincipalDep, services: DataDep) -> Response:
    gateway, _ = services
    return json_response(batch_object(_own(gateway, principal, batch_id, batches.get_batch)))


@router.post(
    "/v1/batches/{batch_id}/cancel", response_model=None, responses=documented(BatchObject, *ALWAYS, 404, 409)
)
async def cancel_batch(
    batch_id: str, state: StateDep, principal: PrincipalDep, services: DataDep
) -> Response:
    """No new line starts and the running ones stop (charged nothing); lines already answered stay answered
    and charged; within seconds the batch reads `cancelled`, with output and error files of what was done."""
    gateway, _ = services
    batch = await run_in_threadpool(_own, gateway, principal, batch_id, batches.cancel_batch)
    state.batches_changed()
    return json_response(batch_object(batch))


def _own(gateway: Any, principal: KeyPrincipal, batch_id: str, action: Any) -> Any:
    """`action(db, org_id, batch_id)`; another organization's batch is the same 404 as none, and the
    attempt is recorded in the audit log."""
    try:
        return action(gateway.db, principal.org_id, batch_id)
    except NotFound:
        if batches.find_foreign_batch(gateway.db, principal.org_id, batch_id):
            record_foreign_access(gateway.db, principal, "batch", batch_id)
        raise
