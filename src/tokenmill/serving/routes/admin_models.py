"""The operator's view of the models this server runs: every model and replica live (state, requests running
and waiting, KV use, memory against the budget), and load / unload / drain. Each action is audited like the
platform's admin actions (actor `admin:<admin key id>`), with the model's status before and after."""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import asdict
from typing import Annotated, Literal

from fastapi import APIRouter
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from tokenmill.catalog.fleet_model import ModelStatus, UnknownModel, prefix_cache_hit_rate
from tokenmill.platform import audit
from tokenmill.serving.deps import AdminDep, GatewayDep, StateDep
from tokenmill.serving.errors import APIError, model_not_found
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
    healthy: bool
    """False while its worker process is down and being restarted (it gets no requests meanwhile)."""
    draining: bool
    """Being removed (scaled down): it takes no new requests and stops once its open ones end."""
    pid: int | None
    """Its engine's process: a worker process or Ray actor (None: the server's own process)."""
    node: str | None
    """The address of the Ray node it runs on (None: this machine)."""
    prompt_tokens: int
    """Since the replica started: prompt tokens admitted, of which its prefix cache served."""
    cached_prompt_tokens: int


class AutoscalingBody(BaseModel):
    min_replicas: int
    max_replicas: int
    target_in_flight: int
    scale_up_delay_s: float
    scale_down_delay_s: float


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
    routing: str | None
    """How a request picks among the replicas: "prefix", "least-load" or "session" (None: embedding
    models)."""
    prefix_cache_hit_rate: float | None
    """Across the replicas since they started: the share of prompt tokens their prefix caches served."""
    replicas: list[ReplicaBody]
    autoscaling: AutoscalingBody | None = None
    """The model's policy (None: a fixed number of replicas)."""
    last_scaling: str | None = None
    """The autoscaler's last decision, e.g. "1 -> 2 replicas: 17 request(s) in flight, 8 per replica
    wanted"."""
    num_scale_ups: int = 0
    num_scale_downs: int = 0


class ModelRuntimeList(BaseModel):
    object: str = "list"
    data: list[ModelRuntime]
    memory_budget_bytes: int | None
    memory_used_bytes: int
    prefix_cache_hit_rate: float | None = None
    """Across every replica of every chat model: the share of prompt tokens their prefix caches served."""


class RoutingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    routing: Literal["prefix", "least-load", "session"]


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
        routing=status.routing,
        prefix_cache_hit_rate=status.prefix_cache_hit_rate,
        replicas=[ReplicaBody(**vars(replica)) for replica in status.replicas],
        autoscaling=None if status.autoscaling is None else AutoscalingBody(**asdict(status.autoscaling)),
        last_scaling=status.last_scaling,
        num_scale_ups=status.num_scale_ups,
        num_scale_downs=status.num_scale_downs,
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
            routing=None,
            prefix_cache_hit_rate=None,
            replicas=[],
        )
        for model in state.embedders
    ]
    return json_response(
        ModelRuntimeList(
            data=sorted(chat + embedding, key=lambda m: m.id),
            memory_budget_bytes=state.fleet.memory_budget_bytes,
            memory_used_bytes=state.fleet.memory_used_bytes,
            prefix_cache_hit_rate=prefix_cache_hit_rate(r for s in state.fleet.status() for r in s.replicas),
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
    "/v1/admin/models/{model:path}/replicas/{replica}/drain",
    response_model=None,
    responses=documented(ModelRuntime, *WRITE, 404, 409),
)
async def drain_replica(
    model: str,
    replica: int,
    state: StateDep,
    gateway: GatewayDep,
    admin: AdminDep,
    body: StopRequest | None = None,
) -> Response:
    """Take one replica out, e.g. before removing its node: it gets no new requests, finishes the ones it
    runs (after `timeout_s` they are ended), then stops; the model serves on with its other replicas."""
    _status(state, model)
    timeout = None if body is None else body.timeout_s

    async def drain() -> ModelStatus:
        try:
            return await state.fleet.drain_replica(model, replica, timeout)
        except LookupError as exc:
            raise APIError(404, str(exc), param="replica", code="replica_not_found") from None
        except ValueError as exc:
            raise APIError(409, str(exc), param="replica", code="conflict") from None

    return await _audited(state, gateway, actor(admin), "drain_replica", model, drain())


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


@router.post(
    "/v1/admin/models/{model:path}/routing",
    response_model=None,
    responses=documented(ModelRuntime, *WRITE, 404),
)
async def set_routing(
    model: str, body: RoutingRequest, state: StateDep, gateway: GatewayDep, admin: AdminDep
) -> Response:
    """How requests pick among the model's replicas, from the next request on (and for its later loads):
    "prefix" sends a request where its prompt's prefix was recently served, unless it would queue there;
    "least-load" always to the least loaded replica; "session" sends the requests naming one `user` to one
    replica (on the same condition), the others by prefix."""
    _status(state, model)

    async def switch() -> ModelStatus:
        return state.fleet.set_routing(model, body.routing)

    return await _audited(state, gateway, actor(admin), "set_model_routing", model, switch())
