"""/v1/files, as OpenAI defines it (the official SDK's `client.files` works unchanged): upload, list, retrieve,
content, delete, for the caller's organization only (another organization's file is a 404, audited by the
platform). The upload is read as a stream (`files_protocol.MultipartReader`) into the file store, its size
held to the per-file limit and the organization's quota while it arrives; refused uploads are drained (at
most the file limit's worth) so the client, still sending, can read the refusal."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from typing import Annotated, BinaryIO, Literal
from urllib.parse import quote

import anyio.from_thread
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from tokenmill.platform import files
from tokenmill.platform.errors import InvalidArgument
from tokenmill.platform.files import MAX_PAGE, FileInfo, Received, UploadSpec
from tokenmill.platform.gateway import Gateway
from tokenmill.platform.principal import KeyPrincipal
from tokenmill.serving.deps import PrincipalDep, gateway_of, state_of
from tokenmill.serving.errors import APIError, ClientDisconnected
from tokenmill.serving.files_protocol import (
    LISTABLE_PURPOSES,
    UPLOAD_SCHEMA,
    FileDeleted,
    FileList,
    FileObject,
    MultipartReader,
    bad_body,
    boundary_of,
    file_object,
)
from tokenmill.serving.openapi import ALWAYS, documented
from tokenmill.serving.routes.common import json_response
from tokenmill.serving.state import DataServices

logger = logging.getLogger(__name__)
router = APIRouter()

FILES_PATH = "/v1/files"
"""The one route whose body the request middleware must not buffer (see `app.StreamedUploads`)."""
READ_CHUNK = 1 << 16


def data_of(request: Request) -> tuple[Gateway, DataServices]:
    gateway = gateway_of(request)  # --no-auth: a 400 naming why
    data = state_of(request).data
    assert data is not None, "create_app wires the file store whenever there is a gateway"
    return gateway, data


async def get_data(request: Request) -> tuple[Gateway, DataServices]:
    return data_of(request)


DataDep = Annotated[tuple[Gateway, DataServices], Depends(get_data)]


# -- upload --------------------------------------------------------------------------------------------


@router.post(
    FILES_PATH,
    response_model=None,
    responses=documented(FileObject, *ALWAYS, 413),
    openapi_extra=UPLOAD_SCHEMA,
)
async def create_file(request: Request, principal: PrincipalDep, services: DataDep) -> Response:
    """Upload a file (multipart/form-data: `file`, `purpose`, optional `expires_after[anchor]` =
    created_at and `expires_after[seconds]`)."""
    gateway, data = services
    try:
        boundary = boundary_of(request.headers.get("content-type"))
    except APIError:
        await MultipartReader(request.stream(), b"-").drain(data.limits.max_file_bytes)
        raise
    reader = MultipartReader(request.stream(), boundary)
    try:
        info = await _upload(reader, gateway, data, principal)
    except ClientDisconnect:
        raise ClientDisconnected() from None
    except Exception:
        try:
            drained = await reader.drain(data.limits.max_file_bytes)
        except ClientDisconnect:
            raise ClientDisconnected() from None
        if not drained:
            logger.info("upload refused; the client kept sending past the drain limit")
        raise
    return json_response(file_object(info))


async def _upload(
    reader: MultipartReader, gateway: Gateway, data: DataServices, principal: KeyPrincipal
) -> FileInfo:
    fields: dict[str, str] = {}
    received: Received | None = None
    filename: str | None = None
    try:
        while (part := await reader.next_part()) is not None:
            if part.name != "file":
                if part.name in fields:
                    raise bad_body(f"The field {part.name} is given twice.", part.name)
                fields[part.name] = await reader.read_field(part.name)
                continue
            if received is not None:
                raise bad_body("Upload one file per request.", "file")
            if part.filename is None:
                raise bad_body("The file field must be a file (with a filename), not text.", "file")
            if "purpose" in fields:  # refuse a bad description before reading a byte of the file
                _spec(fields, part.filename)
            filename = part.filename
            received = await run_in_threadpool(
                files.receive, gateway.db, data.store, principal.org_id, _pull(reader), data.limits
            )
        if received is None or filename is None:
            raise APIError(
                400, "Missing required parameter: 'file'.", param="file", code="missing_required_parameter"
            )
        spec = _spec(fields, filename)
    except BaseException:
        if received is not None:
            files.discard(data.store, received)
        raise
    return await run_in_threadpool(
        files.commit, gateway.db, data.store, principal.org_id, received, spec, data.limits
    )


def _pull(reader: MultipartReader) -> Iterator[bytes]:
    """The file part's chunks, pulled from the event loop by the worker thread that writes them."""
    while chunk := anyio.from_thread.run(reader.read_chunk):
        yield chunk


def _spec(fields: dict[str, str], filename: str) -> UploadSpec:
    purpose = fields.get("purpose")
    if purpose is None:
        raise APIError(
            400, "Missing required parameter: 'purpose'.", param="purpose", code="missing_required_parameter"
        )
    anchor = fields.get("expires_after[anchor]")
    seconds_text = fields.get("expires_after[seconds]")
    seconds = None
    if anchor is not None or seconds_text is not None:
        if anchor != "created_at":
            raise InvalidArgument("expires_after.anchor: must be created_at")
        if seconds_text is None or not seconds_text.strip().isascii() or not seconds_text.strip().isdigit():
            raise InvalidArgument("expires_after.seconds: must be an integer number of seconds")
        seconds = int(seconds_text.strip()) if len(seconds_text.strip()) <= 12 else -1
    return files.check_upload(filename, purpose, seconds)


# -- reads and delete ----------------------------------------------------------------------------------


@router.get(FILES_PATH, response_model=None, responses=documented(FileList, *ALWAYS))
def list_files(
    principal: PrincipalDep,
    services: DataDep,
    purpose: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = MAX_PAGE,
    after: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
    order: Literal["asc", "desc"] = "desc",
) -> Response:
    """The organization's files, newest first (`order=asc`: oldest first); the next page is `after=` the
    `last_id` of this one."""
    gateway, _ = services
    if purpose is not None and purpose not in LISTABLE_PURPOSES:
        raise InvalidArgument(f"purpose: must be one of {', '.join(LISTABLE_PURPOSES)}")
    page = files.list_files(
        gateway.db, principal.org_id, purpose=purpose, limit=limit, after=after, order=order
    )
    data = [file_object(info) for info in page.files]
    return json_response(
        FileList(
            data=data,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
            has_more=page.has_more,
        )
    )


@router.get(FILES_PATH + "/{file_id}", response_model=None, responses=documented(FileObject, *ALWAYS, 404))
def retrieve_file(file_id: str, principal: PrincipalDep, services: DataDep) -> Response:
    gateway, _ = services
    info = files.get_file(gateway.db, principal.org_id, file_id, key_id=principal.key_id)
    return json_response(file_object(info))


def _content_responses() -> dict[int | str, dict[str, object]]:
    responses = documented(None, *ALWAYS, 404, 410)
    responses[200] = {
        "description": "The file's bytes, exactly as uploaded.",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
    return responses


@router.get(FILES_PATH + "/{file_id}/content", response_model=None, responses=_content_responses())
def file_content(file_id: str, principal: PrincipalDep, services: DataDep) -> Response:
    """The bytes, checked against the sha256 stored at upload while they are sent: a mismatch ends the
    response before its last chunk (so the client sees a short body, never wrong bytes as complete)."""
    gateway, data = services
    info, stream = files.open_content(
        gateway.db, data.store, principal.org_id, file_id, key_id=principal.key_id
    )
    name = quote(info.filename, safe="")
    return StreamingResponse(
        _verified(stream, info),
        media_type="application/octet-stream",
        headers={
            "content-length": str(info.bytes),
            "content-disposition": f"attachment; filename*=UTF-8''{name}",
        },
    )


def _verified(stream: BinaryIO, info: FileInfo) -> Iterator[bytes]:
    digest = hashlib.sha256()
    held = b""
    try:
        while chunk := stream.read(READ_CHUNK):
            digest.update(chunk)
            if held:
                yield held
            held = chunk
        if digest.hexdigest() != info.sha256:
            logger.error("file %s of %s: its bytes no longer match their sha256", info.id, info.org_id)
            raise OSError(f"file {info.id}: content does not match its checksum")
        if held:
            yield held
    finally:
        stream.close()


@router.delete(
    FILES_PATH + "/{file_id}", response_model=None, responses=documented(FileDeleted, *ALWAYS, 404)
)
def delete_file(file_id: str, principal: PrincipalDep, services: DataDep) -> Response:
    """Deletes the bytes, then the row: the content is gone when this answers."""
    gateway, data = services
    info = files.delete_file(gateway.db, data.store, principal.org_id, file_id, key_id=principal.key_id)
    return json_response(FileDeleted(id=info.id, deleted=True))
