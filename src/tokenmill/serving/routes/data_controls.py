"""The organization's data controls: GET/PATCH /v1/organization/data_controls (how long files and job
artifacts are kept, and the standing facts: request content is never stored, usage records carry counts),
POST /v1/organization/data/delete ("delete all my data", confirmed by the organization's name) and GET
/v1/organization/export (a zip of everything kept for it). Any key of the organization may use them, as it
may manage the organization's keys; every change is audited by the platform."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from typing import Any, BinaryIO

from fastapi import APIRouter
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask

from tokenmill.platform import data_controls, data_export
from tokenmill.platform.data_controls import FACTS, DataControlsInfo
from tokenmill.platform.principal import KeyPrincipal
from tokenmill.serving.deps import PrincipalDep
from tokenmill.serving.files_protocol import (
    DataControlsObject,
    DataControlsUpdate,
    DataDeletion,
    DeleteDataRequest,
)
from tokenmill.serving.openapi import ALWAYS, documented
from tokenmill.serving.routes.common import json_response
from tokenmill.serving.routes.files import DataDep

router = APIRouter()

EXPORT_CHUNK = 1 << 16


def actor(principal: KeyPrincipal) -> str:
    """Who, in the audit log: the organization and the key that asked."""
    return f"org:{principal.org_id}/key:{principal.key_id}"


def _object(info: DataControlsInfo) -> DataControlsObject:
    return DataControlsObject(
        organization_id=info.org_id,
        file_retention_days=info.file_retention_days,
        stores_request_content=bool(FACTS["stores_request_content"]),
        usage_records=str(FACTS["usage_records"]),
    )


@router.get(
    "/v1/organization/data_controls", response_model=None, responses=documented(DataControlsObject, *ALWAYS)
)
def get_data_controls(principal: PrincipalDep, services: DataDep) -> Response:
    gateway, _ = services
    return json_response(_object(data_controls.get_data_controls(gateway.db, principal.org_id)))


@router.patch(
    "/v1/organization/data_controls", response_model=None, responses=documented(DataControlsObject, *ALWAYS)
)
def patch_data_controls(body: DataControlsUpdate, principal: PrincipalDep, services: DataDep) -> Response:
    """`file_retention_days`: files (and job artifacts) older than this are deleted by the sweeper; null
    keeps them until deleted."""
    gateway, _ = services
    info = data_controls.set_data_controls(
        gateway.db, principal.org_id, file_retention_days=body.file_retention_days, actor=actor(principal)
    )
    return json_response(_object(info))


@router.post(
    "/v1/organization/data/delete", response_model=None, responses=documented(DataDeletion, *ALWAYS, 404)
)
def delete_all_data(body: DeleteDataRequest, principal: PrincipalDep, services: DataDep) -> Response:
    """Deletes every file (bytes and rows) and all other stored content of the organization; `confirm`
    must be the organization's exact name (else 400, and nothing is deleted). Keys, users, usage records
    and the ledger stay."""
    gateway, data = services
    report = data_controls.delete_all_data(
        gateway.db,
        data.store,
        principal.org_id,
        confirm=body.confirm,
        actor=actor(principal),
        owners=data.owners,
    )
    return json_response(
        DataDeletion(
            organization_id=report.org_id,
            deleted_files=report.files,
            deleted_bytes=report.bytes,
            deleted_content=report.owners,
        )
    )


def _export_responses() -> dict[int | str, dict[str, Any]]:
    responses = documented(None, *ALWAYS, 404)
    responses[200] = {
        "description": "A zip: usage.csv, requests.csv, ledger.csv, files.json, files/<id>/<name>, the "
        "organization's other content, manifest.json.",
        "content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}},
    }
    return responses


@router.get("/v1/organization/export", response_model=None, responses=_export_responses())
def export(principal: PrincipalDep, services: DataDep) -> Response:
    """Built in an anonymous temporary file (never in memory), then streamed; the file vanishes when the
    response ends."""
    gateway, data = services
    spool = tempfile.TemporaryFile()  # noqa: SIM115 - closed when the response ends, not in this scope
    try:
        data_export.write_export(gateway.db, data.store, principal.org_id, spool, owners=data.owners)
        size = spool.tell()
        spool.seek(0)
    except BaseException:
        spool.close()
        raise
    name = f"tokenmill-export-{principal.org_id}.zip"
    return StreamingResponse(
        _read(spool),
        media_type="application/zip",
        headers={"content-length": str(size), "content-disposition": f'attachment; filename="{name}"'},
        background=BackgroundTask(spool.close),
    )


def _read(spool: BinaryIO) -> Iterator[bytes]:
    try:
        while chunk := spool.read(EXPORT_CHUNK):
            yield chunk
    finally:
        spool.close()
