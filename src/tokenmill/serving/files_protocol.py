"""The Files API and data controls on the wire: OpenAI's File objects, and the multipart upload body read as a
stream. The upload is parsed here rather than by Starlette's form parser because that one spools a whole file
before a route sees it: `MultipartReader` hands the file part over a chunk at a time, so its size can be
checked (and the upload refused) while it arrives, and no more than one chunk is ever in memory."""

from __future__ import annotations

from collections.abc import AsyncIterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import unquote

from pydantic import BaseModel, ConfigDict, Field

from tokenmill.platform.data_controls import MAX_RETENTION_DAYS
from tokenmill.platform.files import FILE_PURPOSES, USER_PURPOSES, FileInfo
from tokenmill.serving.errors import APIError

MAX_HEADER_BYTES = 16 * 1024
"""One part's headers."""
MAX_FIELD_BYTES = 64 * 1024
"""A part that is not the file (purpose, expires_after[...]): small by nature."""
MAX_PARTS = 32


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    expires_at: int | None
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    status_details: str | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


def file_object(info: FileInfo) -> FileObject:
    return FileObject(
        id=info.id,
        bytes=info.bytes,
        created_at=int(info.created_at.timestamp()),
        expires_at=None if info.expires_at is None else int(info.expires_at.timestamp()),
        filename=info.filename,
        purpose=info.purpose,
    )


UPLOAD_SCHEMA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "The file's bytes."},
                        "purpose": {"type": "string", "enum": list(USER_PURPOSES)},
                        "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
                        "expires_after[seconds]": {"type": "integer", "minimum": 3600, "maximum": 2592000},
                    },
                }
            }
        },
    }
}
"""The upload body as OpenAPI states it (the route reads the stream itself, so FastAPI cannot infer it)."""
LISTABLE_PURPOSES = FILE_PURPOSES


# -- data controls -------------------------------------------------------------------------------------


class DataControlsObject(BaseModel):
    object: Literal["organization.data_controls"] = "organization.data_controls"
    organization_id: str
    file_retention_days: int | None
    """Files older than this many days are deleted (rows and bytes), as are job artifacts; null: kept."""
    stores_request_content: bool
    """Always false: prompts and completions are never stored."""
    usage_records: str
    """What a usage record holds: counts, never content."""


class DataControlsUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file_retention_days: Annotated[int, Field(strict=True, ge=1, le=MAX_RETENTION_DAYS)] | None


class DeleteDataRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    confirm: str = Field(max_length=200)
    """The organization's exact name."""


class DataDeletion(BaseModel):
    object: Literal["organization.data_deletion"] = "organization.data_deletion"
    organization_id: str
    deleted_files: int
    deleted_bytes: int
    deleted_content: dict[str, int]
    """Per other content owner (e.g. fine_tuning): items deleted."""


# -- the multipart reader ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Part:
    name: str
    filename: str | None
    """None: a plain field."""


def bad_body(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param, code="invalid_multipart")


def boundary_of(content_type: str | None) -> bytes:
    """The boundary of a `multipart/form-data` Content-Type, or a 400."""
    if content_type is None:
        raise bad_body("The upload must be a multipart/form-data body (Content-Type header missing).")
    kind, _, params = content_type.partition(";")
    if kind.strip().lower() != "multipart/form-data":
        raise bad_body("The upload must be a multipart/form-data body with the fields file and purpose.")
    for param in params.split(";"):
        name, _, value = param.strip().partition("=")
        if name.strip().lower() == "boundary":
            value = value.strip().strip('"')
            if 1 <= len(value) <= 200 and value.isascii():
                return value.encode("ascii")
    raise bad_body("The multipart/form-data Content-Type has no valid boundary.")


class MultipartReader:
    """`next_part()` moves to the next part (None after the last); `read_chunk()` returns the current part's
    body a piece at a time (b"" at its end); `read_field()` all of a small part. Malformed input is a 400."""

    def __init__(self, stream: AsyncIterable[bytes], boundary: bytes) -> None:
        self._stream = aiter(stream)
        self._delimiter = b"\r\n--" + boundary
        self._buffer = bytearray(b"\r\n")  # so the first boundary looks like every later one
        self._eof = False
        self._in_body = False
        self._done = False
        self._parts = 0
        self.bytes_read = 0

    async def _fill(self) -> bool:
        while not self._eof:
            chunk = await anext(self._stream, None)
            if chunk is None:
                self._eof = True
            elif chunk:
                self.bytes_read += len(chunk)
                self._buffer += chunk
                return True
        return False

    async def next_part(self) -> Part | None:
        while self._in_body:  # skip what is left of the current part
            await self.read_chunk()
        if self._done:
            return None
        while True:  # the preamble (if any) and the delimiter
            index = self._buffer.find(self._delimiter)
            if index >= 0:
                del self._buffer[: index + len(self._delimiter)]
                break
            keep = len(self._delimiter) - 1
            if len(self._buffer) > keep:
                del self._buffer[: len(self._buffer) - keep]
            if not await self._fill():
                raise bad_body("The multipart body ends before its first boundary.")
        while len(self._buffer) < 2:
            if not await self._fill():
                raise bad_body("The multipart body ends inside a boundary.")
        if self._buffer[:2] == b"--":
            self._done = True
            return None
        while True:
            end = self._buffer.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(self._buffer) > MAX_HEADER_BYTES:
                raise bad_body(f"A multipart part's headers are longer than {MAX_HEADER_BYTES} bytes.")
            if not await self._fill():
                raise bad_body("The multipart body ends inside a part's headers.")
        headers = bytes(self._buffer[:end])
        del self._buffer[: end + 4]
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise bad_body(f"The multipart body has more than {MAX_PARTS} parts.")
        self._in_body = True
        return _part(headers)

    async def read_chunk(self) -> bytes:
        """The next piece of the current part's body; b"" once it has all been read."""
        if not self._in_body:
            return b""
        while True:
            index = self._buffer.find(self._delimiter)
            if index >= 0:
                chunk = bytes(self._buffer[:index])
                del self._buffer[:index]
                self._in_body = False
                if chunk:
                    return chunk
                return b""
            safe = len(self._buffer) - (len(self._delimiter) - 1)
            if safe > 0:
                chunk = bytes(self._buffer[:safe])
                del self._buffer[:safe]
                return chunk
            if not await self._fill():
                raise bad_body("The multipart body ends before its closing boundary.")

    async def read_field(self, name: str) -> str:
        value = bytearray()
        while chunk := await self.read_chunk():
            value += chunk
            if len(value) > MAX_FIELD_BYTES:
                raise bad_body(f"The field {name} is longer than {MAX_FIELD_BYTES} bytes.", name)
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise bad_body(f"The field {name} is not valid UTF-8.", name) from None

    async def drain(self, max_bytes: int) -> bool:
        """Read and drop the rest of the body (at most `max_bytes` more), so the client, still sending, can
        read the refusal; False if the body was longer than that."""
        self._buffer.clear()
        self._in_body = False
        start = self.bytes_read
        while self.bytes_read - start <= max_bytes:
            if not await self._fill():
                return True
            self._buffer.clear()
        return False


def _part(headers: bytes) -> Part:
    text = headers.decode("utf-8", errors="replace")
    disposition = None
    for line in text.split("\r\n"):
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-disposition":
            disposition = value.strip()
    if disposition is None:
        raise bad_body("A multipart part has no Content-Disposition header.")
    kind, params = _disposition(disposition)
    if kind != "form-data" or "name" not in params:
        raise bad_body("A multipart part is not a form-data field with a name.")
    return Part(name=params["name"], filename=params.get("filename"))


def _disposition(value: str) -> tuple[str, dict[str, str]]:
    """`form-data; name="file"; filename="a.jsonl"` -> ("form-data", {...}); quoted strings may hold `;`
    and backslash escapes. `filename*=UTF-8''...` (RFC 5987) wins over `filename`."""
    kind, _, rest = value.partition(";")
    params: dict[str, str] = {}
    index = 0
    while index < len(rest):
        while index < len(rest) and rest[index] in " ;\t":
            index += 1
        equals = rest.find("=", index)
        if equals < 0:
            break
        key = rest[index:equals].strip().lower()
        index = equals + 1
        if index < len(rest) and rest[index] == '"':
            index += 1
            out = []
            while index < len(rest) and rest[index] != '"':
                if rest[index] == "\\" and index + 1 < len(rest):
                    index += 1
                out.append(rest[index])
                index += 1
            index += 1
            params[key] = "".join(out)
        else:
            end = rest.find(";", index)
            end = len(rest) if end < 0 else end
            params[key] = rest[index:end].strip()
            index = end
    extended = params.pop("filename*", None)
    if extended is not None:
        charset, _, encoded = extended.partition("''")
        if encoded:
            params["filename"] = unquote(encoded, encoding=charset or "utf-8", errors="replace")
    return kind.strip().lower(), params
