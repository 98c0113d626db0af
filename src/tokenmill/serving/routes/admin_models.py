"""The operator's view of the models this server runs: every model and replica live (state, requests running
and waiting, KV use, memory against the budget), and load / unload / drain. Each action is audited like the
platform's admin actions (actor `admin:<admin key id>`), with the model's status before and after."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Annotated

from fastapi import APIRouter
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from tokenmill.catalog.fleet_model import ModelStatus, UnknownModel
from tokenmill.platform import audit
from tokenmill.serving.deps import AdminDep, GatewayDep, StateDep
from tokenmill.serving.errors import model_not_found
from tokenmill.serving.openapi import documented
from tokenmill.serving.routes.admin import READ, WRITE, actor
from tokenmill.serving.routes.common import json_response
from tokenmill.serving.state import ServingState

router = APIRouter()

MAX_TIMEOUT_S = 24 * 3600


class ReplicaBody(BaseModel):
    index: int
    running_seqs: int
    waiting_seqs: int
    in_flight_seqs: int
    """Assigned by the router and not yet finished (running, queued, or being submitted)."""
    outstanding_tokens: int
    kv_cache_usage: float


class ModelRuntime(BaseModel):
    id: str
    task: str
    state: str
    reason: str | None
    pinned: bool
    memory_bytes: int
    requests_in_flight: int
    idle_s: float | None
    num_loads: int
    last_load_s: float | None
    replicas: list[ReplicaBody]


class ModelRuntimeList(BaseModel):
    object: str = "list"
    data: list[ModelRuntime]
    memory_budget_bytes: int | None
    memory_used_bytes: int


class StopRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    timeout_s: Annotated[float, Field(gt=0, le=MAX_TIMEOUT_S)] | None = None
    """After this long, requests still running are aborted; none: wait for all of them."""


def _runtime(status: ModelStatus) -> ModelRuntime:
    return ModelRuntime(
        id=status.model_id,
        task="chat",
        state=status.state,
        reason=status.reason,
        pinned=status.pinned,
        memory_bytes=status.memory_bytes,
        requests_in_flight=status.in_flight,
        idle_s=status.idle_s,
        num_loads=status.num_loads,
        last_load_s=status.last_load_s,
        replicas=[ReplicaBody(**vars(replica)) for replica in status.replicas],
    )


def _status(state: ServingState, model: str) -> ModelStatus:
    try:
        return state.fleet.status_of(model)
    except UnknownModel:
        raise model_not_found(model) from None


@router.get("/v1/admin/models", response_model=None, responses=documented(ModelRuntimeList, *READ))
async def list_runtime(state: StateDep) -> Response:
    chat = [_runtime(status) for status in state.fleet.status()]
    embedding = [
        ModelRuntime(
            id=model,
            task="embedding",
            state=state.model_state(model),
            reason=state.failed_models.get(model),
            pinned=True,
            memory_bytes=0,
            requests_in_flight=0,
            idle_s=None,
            num_loads=int(state.ready),
            last_load_s=None,
            replicas=[],
        )
        for model in state.embedders
    ]
    return json_response(
        ModelRuntimeList(
            data=sorted(chat + embedding, key=lambda m: m.id),
            memory_budget_bytes=state.fleet.memory_budget_bytes,
            memory_used_bytes=state.fleet.memory_used_bytes,
        )
    )


async def _audited(
    state: ServingState, gateway: GatewayDep, who: str, action: str, model: str, run: Awaitable[ModelStatus]
) -> Response:
    before = _runtime(_status(state, model)).model_dump()
    after = _runtime(await run)
    await run_in_threadpool(audit.record, gateway.db, who, action, model, before, after.model_dump())
    return json_response(after)


@router.post(
    "/v1/admin/models/{model:path}/load",
    response_model=None,
    responses=documented(ModelRuntime, *WRITE, 404, 503),
)
async def load(model: str, state: StateDep, gateway: GatewayDep, admin: AdminDep) -> Response:
    """Load now (also a stopped or failed model), making room by unloading idle models if needed."""
    _status(state, model)
    return await _audited(state, gateway, actor(admin), "load_model", model, state.fleet.load(model))


@router.post(
    "/v1/admin/models/{model:path}/unload",
    response_model=None,
    responses=documented(ModelRuntime, *WRITE, 404, 503),
)
async def unload(
    model: str, state: StateDep, gateway: GatewayDep, admin: AdminDep, body: StopRequest | None = None
) -> Response:
    """Drain, then unload: the next request for the model loads it again."""
    _status(state, model)
    timeout = None if body is None else body.timeout_s
    return await _audited(
        state, gateway, actor(admin), "unload_model", model, state.fleet.unload(model, timeout)
    )


@router.post(
    "/v1/admin/models/{model:path}/drain",
    response_model=None,
    responses=documented(ModelRuntime, *WRITE, 404, 503),
)
async def drain(
    model: str, state: StateDep, gateway: GatewayDep, admin: AdminDep, body: StopRequest | None = None
) -> Response:
    """Finish the requests in flight, refuse new ones (503), then unload; the model stays stopped until it
    is loaded again."""
    _status(state, model)
    timeout = None if body is None else body.timeout_s
    return await _audited(
        state, gateway, actor(admin), "drain_model", model, state.fleet.drain(model, timeout)
    )
