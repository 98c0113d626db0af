"""/v1/fine_tuning/jobs as OpenAI defines it: create (everything validated and the training reserved before
the job is queued), list, retrieve, cancel, events, checkpoints. The training itself runs in a trainer
worker process (jobs/trainer_worker.py); these routes only read and write the job's rows."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from tokenmill.jobs.hyperparameters import Hyperparameters, InvalidHyperparameters
from tokenmill.jobs.trainer import UnsupportedBaseModel, check_base_model
from tokenmill.jobs.training_data import TrainingDataError, TrainingSet, parse_chat_jsonl
from tokenmill.models.loader import load_tokenizer, resolve_model
from tokenmill.platform import fine_tuned_models
from tokenmill.platform import fine_tuning as jobs
from tokenmill.platform.audit import record_foreign_access
from tokenmill.platform.errors import NotFound
from tokenmill.platform.file_store import FileStore
from tokenmill.platform.files import read_file_bytes
from tokenmill.platform.principal import KeyPrincipal
from tokenmill.serving.deps import GatewayDep, PrincipalDep, StateDep
from tokenmill.serving.errors import APIError, model_not_found
from tokenmill.serving.fine_tuning_protocol import (
    CheckpointMetrics,
    CreateFineTuningJobRequest,
    FineTuningJob,
    FineTuningJobCheckpoint,
    FineTuningJobCheckpointList,
    FineTuningJobEvent,
    FineTuningJobEventList,
    FineTuningJobList,
    HyperparametersIn,
    HyperparametersOut,
    JobError,
    MethodOut,
    ModelDeleted,
)
from tokenmill.serving.openapi import ALWAYS, documented
from tokenmill.serving.routes.common import json_response

router = APIRouter()
MAX_PAGE = 100
JOB_ID = Annotated[str, Query(min_length=1, max_length=64)]


@router.post(
    "/v1/fine_tuning/jobs", response_model=None, responses=documented(FineTuningJob, *ALWAYS, 403, 404, 429)
)
async def create_job(
    body: CreateFineTuningJobRequest, state: StateDep, principal: PrincipalDep, gateway: GatewayDep
) -> Response:
    """Validates the base model, the files (every bad line named) and the hyperparameters, reserves the
    training's cost (tokens times epochs at the training price), and queues the job. Nothing is charged or
    queued when anything is refused."""
    listing = await state.resolve(body.model, principal)
    served = state.served[listing.model]
    if served.task != "chat" or served.source is None or served.lora is not None:
        raise APIError(
            400,
            f"The model `{body.model}` cannot be fine-tuned: only the chat models this server runs can "
            "(not embedding models, nor fine-tuned ones).",
            param="model",
            code="model_not_fine_tunable",
        )
    hyper_in = _hyperparameters_in(body)
    max_tokens = state.context_length(listing) or 2048
    price = state.settings.fine_tuning_price_micros
    seed = body.seed if body.seed is not None else 42
    assert state.data is not None  # a gateway always has a file store
    store = state.data.store

    def prepare() -> jobs.JobInfo:
        try:
            check_base_model(served.source)
        except UnsupportedBaseModel as exc:
            raise APIError(400, str(exc), param="model", code="model_not_fine_tunable") from None
        tokenizer = load_tokenizer(resolve_model(served.source))
        train = _parse(gateway, store, principal, body.training_file, "training_file", tokenizer, max_tokens)
        if body.validation_file is not None:
            _parse(
                gateway, store, principal, body.validation_file, "validation_file", tokenizer, max_tokens, 1
            )
        try:
            hyper = Hyperparameters(**_given(hyper_in), seed=seed).resolved(train.num_examples)
        except InvalidHyperparameters as exc:
            raise APIError(400, str(exc), param="hyperparameters", code="invalid_hyperparameters") from None
        spec = jobs.JobSpec(
            model=listing.model,
            base_source=served.source,
            max_tokens_per_example=max_tokens,
            training_file=body.training_file,
            validation_file=body.validation_file,
            suffix=body.suffix,
            hyperparameters=hyper.as_dict(),
            seed=seed,
            metadata=body.metadata,
            estimated_tokens=train.num_tokens * hyper.n_epochs,
            price_micros_per_mtok=price,
        )
        return jobs.create_job(gateway.db, principal, spec)

    job = await run_in_threadpool(prepare)
    state.job_queued()
    return json_response(_job(job))


@router.get(
    "/v1/fine_tuning/jobs", response_model=None, responses=documented(FineTuningJobList, *ALWAYS, 404)
)
def list_jobs(
    principal: PrincipalDep,
    gateway: GatewayDep,
    after: JOB_ID | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 20,
) -> Response:
    page = jobs.list_jobs(gateway.db, principal.org_id, after=after, limit=limit)
    return json_response(FineTuningJobList(data=[_job(job) for job in page.data], has_more=page.has_more))


@router.get(
    "/v1/fine_tuning/jobs/{job_id}", response_model=None, responses=documented(FineTuningJob, *ALWAYS, 404)
)
def retrieve_job(job_id: str, principal: PrincipalDep, gateway: GatewayDep) -> Response:
    return json_response(_job(_own(gateway, principal, job_id, jobs.get_job)))


@router.post(
    "/v1/fine_tuning/jobs/{job_id}/cancel",
    response_model=None,
    responses=documented(FineTuningJob, *ALWAYS, 404, 409),
)
def cancel_job(job_id: str, principal: PrincipalDep, gateway: GatewayDep) -> Response:
    """A queued job is cancelled at once; a running one stops within seconds and is charged only the tokens
    it trained (its status reads `cancelled` once its worker has stopped)."""
    return json_response(_job(_own(gateway, principal, job_id, jobs.cancel_job)))


@router.get(
    "/v1/fine_tuning/jobs/{job_id}/events",
    response_model=None,
    responses=documented(FineTuningJobEventList, *ALWAYS, 404),
)
def list_events(
    job_id: str,
    principal: PrincipalDep,
    gateway: GatewayDep,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 20,
) -> Response:
    """Newest first; `after` is the id of the last event of the previous page."""
    cursor = _event_cursor(after)
    page = _own(gateway, principal, job_id, jobs.list_events, after=cursor, limit=limit)
    events = [
        FineTuningJobEvent(
            id=f"ftevent-{event.id}",
            created_at=int(event.created_at.timestamp()),
            level=event.level,
            message=event.message,
            type=event.type,
            data=event.data,
        )
        for event in page.data
    ]
    return json_response(FineTuningJobEventList(data=events, has_more=page.has_more))


@router.get(
    "/v1/fine_tuning/jobs/{job_id}/checkpoints",
    response_model=None,
    responses=documented(FineTuningJobCheckpointList, *ALWAYS, 404),
)
def list_checkpoints(
    job_id: str,
    principal: PrincipalDep,
    gateway: GatewayDep,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 10,
) -> Response:
    """The adapter saved at the end of each epoch, newest first."""
    job = _own(gateway, principal, job_id, jobs.get_job)
    page = jobs.list_checkpoints(gateway.db, principal.org_id, job_id, after=after, limit=limit)
    data = [
        FineTuningJobCheckpoint(
            id=checkpoint.id,
            created_at=int(checkpoint.created_at.timestamp()),
            fine_tuned_model_checkpoint=f"{job.fine_tuned_model or job.id}:ckpt-step-{checkpoint.step}",
            fine_tuning_job_id=job_id,
            metrics=CheckpointMetrics(
                step=checkpoint.step,
                train_loss=checkpoint.metrics.get("train_loss"),
                valid_loss=checkpoint.metrics.get("valid_loss"),
            ),
            step_number=checkpoint.step,
        )
        for checkpoint in page.data
    ]
    return json_response(
        FineTuningJobCheckpointList(
            data=data,
            has_more=page.has_more,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
        )
    )


@router.delete(
    "/v1/models/{model_id:path}", response_model=None, responses=documented(ModelDeleted, *ALWAYS, 404)
)
def delete_model(model_id: str, principal: PrincipalDep, gateway: GatewayDep) -> Response:
    """A fine-tuned model of the caller's organization stops being a model: its listing is retired and its
    adapter's files are deleted (the job and its events stay). Other models cannot be deleted: 404."""
    try:
        adapter = fine_tuned_models.delete_fine_tuned_model(gateway.db, principal.org_id, model_id)
    except NotFound:
        if fine_tuned_models.find_adapter_models(gateway.db, [model_id]):
            record_foreign_access(gateway.db, principal, "model", model_id)
        raise model_not_found(model_id) from None
    shutil.rmtree(Path(adapter.path).parent, ignore_errors=True)  # the job's directory: adapter + checkpoints
    return json_response(ModelDeleted(id=model_id))


def _own(gateway: Any, principal: KeyPrincipal, job_id: str, read: Any, **kwargs: Any) -> Any:
    """`read(db, org_id, job_id, ...)`; a job of another organization is the same 404 as none, and the
    attempt is recorded in the audit log."""
    try:
        return read(gateway.db, principal.org_id, job_id, **kwargs)
    except NotFound:
        if jobs.find_foreign_job(gateway.db, principal.org_id, job_id):
            record_foreign_access(gateway.db, principal, "fine_tuning_job", job_id)
        raise


def _parse(
    gateway: Any,
    store: FileStore,
    principal: KeyPrincipal,
    file_id: str,
    param: str,
    tokenizer: Any,
    max_tokens: int,
    min_examples: int | None = None,
) -> TrainingSet:
    data = read_file_bytes(gateway.db, store, principal.org_id, file_id, principal=principal)
    kwargs = {} if min_examples is None else {"min_examples": min_examples}
    try:
        return parse_chat_jsonl(data, tokenizer, max_tokens, **kwargs)
    except TrainingDataError as exc:
        raise APIError(400, f"{param} {file_id}: {exc}", param=param, code="invalid_training_file") from None


def _hyperparameters_in(body: CreateFineTuningJobRequest) -> HyperparametersIn:
    from_method = body.method.supervised.hyperparameters if body.method and body.method.supervised else None
    if body.hyperparameters is not None and from_method is not None:
        raise APIError(
            400,
            "Give the hyperparameters either at the top level or in method.supervised, not both.",
            param="hyperparameters",
        )
    return body.hyperparameters or from_method or HyperparametersIn()


def _given(hyper: HyperparametersIn) -> dict[str, Any]:
    values = hyper.model_dump(exclude_none=True)
    if "target_modules" in values:
        values["target_modules"] = tuple(values["target_modules"])
    return values


def _event_cursor(after: str | None) -> int | None:
    if after is None:
        return None
    number = after.removeprefix("ftevent-")
    if not number.isdigit() or len(number) > 18:
        raise APIError(400, f"after: {after!r} is not an event id", param="after")
    return int(number)


def _job(job: jobs.JobInfo) -> FineTuningJob:
    hyper = HyperparametersOut(
        **{k: v for k, v in job.hyperparameters.items() if k in HyperparametersOut.model_fields}
    )
    return FineTuningJob(
        id=job.id,
        created_at=int(job.created_at.timestamp()),
        error=JobError(**job.error) if job.error else None,
        fine_tuned_model=job.fine_tuned_model,
        finished_at=int(job.finished_at.timestamp()) if job.finished_at else None,
        hyperparameters=hyper,
        method=MethodOut(supervised={"hyperparameters": hyper}),
        model=job.model,
        organization_id=job.org_id,
        result_files=[],
        seed=job.seed,
        status=job.status,
        trained_tokens=job.trained_tokens,
        training_file=job.training_file,
        validation_file=job.validation_file,
        suffix=job.suffix,
        metadata=job.metadata,
        estimated_tokens=job.estimated_tokens,
    )
