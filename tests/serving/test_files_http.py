"""The Files API over real HTTP: a real `tokenmill serve` process (a tiny random-weight Llama, accounts on its
SQLite file, small file limits) driven by the official openai SDK. Uploads land on disk and read back byte for
byte, lists page with the SDK's own cursor, deleting removes the bytes from disk; refusals (too large, over
quota, bad purpose, no file) are OpenAI-shaped with nothing stored; another organization gets 404s, each
attempt audited."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from tests.serving.server_process import ServerProcess
from tokenmill import cli
from tokenmill.platform.audit import FOREIGN_ACCESS, list_audit
from tokenmill.platform.db import open_database, sqlite_url

pytest.importorskip("tokenmill.engine.async_engine")
pytestmark = pytest.mark.slow  # runs a server process

MAX_FILE = 64 * 1024
QUOTA = 160 * 1024


@dataclass
class Served:
    process: ServerProcess
    data_dir: Path

    def admin(self, *args: str) -> str:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            status = cli.main(["admin", *args, "--data-dir", str(self.data_dir)])
        assert status == 0, err.getvalue()
        return out.getvalue().strip()

    def account(self, name: str) -> tuple[str, openai.OpenAI]:
        """A new organization with a key: (org id, a client holding the key)."""
        org_id = self.admin("create-org", name, "--tier", "unlimited")
        self.admin("create-user", name, f"{name}@example.com")
        key = self.admin("create-key", f"{name}@example.com")
        return org_id, openai.OpenAI(base_url=f"{self.process.url}/v1", api_key=key, max_retries=0)

    def stored(self, org_id: str) -> list[Path]:
        root = self.data_dir / "files" / org_id
        return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.fixture(scope="module")
def served(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    work = tmp_path_factory.mktemp("files-serve")
    args = [
        "--model", f"tiny={tiny_llama_dir}", "--embedding-model", "none", "--kv-cache-memory", "4M",
        "--max-file-size", str(MAX_FILE), "--org-storage-quota", str(QUOTA),
    ]  # fmt: skip
    process = ServerProcess(args, work / "serve.log", data_dir=work / "data").start(timeout_s=180)
    yield Served(process, work / "data")
    process.stop()


def lines(count: int, width: int = 40) -> bytes:
    return b"".join(
        json.dumps({"messages": [{"role": "user", "content": "x" * width}]}).encode() + b"\n"
        for _ in range(count)
    )


def test_upload_list_retrieve_content_delete_with_the_openai_sdk(served: Served) -> None:
    org_id, client = served.account("files-sdk")
    data = lines(30)
    uploaded = client.files.create(file=("train.jsonl", data), purpose="fine-tune")
    assert uploaded.id.startswith("file-") and uploaded.object == "file" and uploaded.bytes == len(data)
    assert (uploaded.filename, uploaded.purpose, uploaded.status) == ("train.jsonl", "fine-tune", "processed")
    assert uploaded.expires_at is None and uploaded.status_details is None
    path = served.data_dir / "files" / org_id / uploaded.id
    assert path.read_bytes() == data

    more = [client.files.create(file=(f"b{i}.jsonl", lines(i + 1)), purpose="batch") for i in range(4)]
    expiring = client.files.create(
        file=("soon.jsonl", b"{}\n"),
        purpose="user_data",
        expires_after={"anchor": "created_at", "seconds": 3600},
    )
    assert expiring.expires_at == expiring.created_at + 3600
    assert more[0].expires_at == more[0].created_at + 30 * 24 * 3600  # batch files expire after 30 days

    first_page = client.files.list(limit=2)
    assert len(first_page.data) == 2 and first_page.has_more
    every = [f.id for f in client.files.list(limit=2)]  # the SDK follows `after` page by page
    assert every == [expiring.id, *[f.id for f in reversed(more)], uploaded.id]
    assert [f.id for f in client.files.list(purpose="batch", order="asc")] == [f.id for f in more]

    assert client.files.retrieve(uploaded.id) == uploaded
    assert client.files.content(uploaded.id).read() == data

    deleted = client.files.delete(uploaded.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (uploaded.id, True, "file")
    assert not path.exists()
    with pytest.raises(openai.NotFoundError) as gone:
        client.files.retrieve(uploaded.id)
    assert gone.value.body["message"] == f"No such File object: {uploaded.id}"


def test_too_large_and_over_quota_uploads_are_refused_with_nothing_stored(served: Served) -> None:
    org_id, client = served.account("files-limits")
    with pytest.raises(openai.APIStatusError) as too_large:
        client.files.create(file=("big.jsonl", b"x" * (MAX_FILE + 1)), purpose="fine-tune")
    assert too_large.value.status_code == 413
    assert (
        too_large.value.body["code"] == "file_too_large" and str(MAX_FILE) in too_large.value.body["message"]
    )
    assert served.stored(org_id) == [] and list(client.files.list()) == []

    for index in range(2):
        client.files.create(file=(f"ok{index}.jsonl", b"y" * MAX_FILE), purpose="fine-tune")
    kept = served.stored(org_id)
    with pytest.raises(openai.APIStatusError) as over_quota:
        client.files.create(file=("third.jsonl", b"z" * (QUOTA - 2 * MAX_FILE + 1)), purpose="fine-tune")
    assert over_quota.value.status_code == 413
    assert (
        over_quota.value.body["code"] == "storage_quota_exceeded"
        and str(QUOTA) in over_quota.value.body["message"]
    )
    assert served.stored(org_id) == kept and len(list(client.files.list())) == 2


def test_bad_purpose_and_missing_file_are_openai_shaped_400s(served: Served) -> None:
    org_id, client = served.account("files-bad")
    with pytest.raises(openai.BadRequestError) as bad_purpose:
        client.files.create(file=("a.jsonl", b"{}\n"), purpose="fine-tune-results")  # type: ignore[arg-type]
    assert (
        bad_purpose.value.body["param"] == "purpose"
        and bad_purpose.value.body["type"] == "invalid_request_error"
    )
    headers = {"Authorization": f"Bearer {client.api_key}"}
    no_file = httpx.post(
        f"{served.process.url}/v1/files", headers=headers, files={"purpose": (None, "fine-tune")}
    )
    assert no_file.status_code == 400
    assert no_file.json()["error"] == {
        "message": "Missing required parameter: 'file'.",
        "type": "invalid_request_error",
        "param": "file",
        "code": "missing_required_parameter",
    }
    not_multipart = httpx.post(f"{served.process.url}/v1/files", headers=headers, json={"purpose": "batch"})
    assert not_multipart.status_code == 400 and not_multipart.json()["error"]["code"] == "invalid_multipart"
    # curl puts the fields in the order given: the purpose may follow the file
    late = httpx.post(
        f"{served.process.url}/v1/files",
        headers=headers,
        files=[("file", ("late.jsonl", b"{}\n")), ("purpose", (None, "evals"))],
    )
    assert late.status_code == 200 and late.json()["purpose"] == "evals"
    late_bad = httpx.post(
        f"{served.process.url}/v1/files",
        headers=headers,
        files=[("file", ("late.jsonl", b"{}\n")), ("purpose", (None, "nope"))],
    )
    assert late_bad.status_code == 400 and late_bad.json()["error"]["param"] == "purpose"
    assert [p.name for p in served.stored(org_id)] == [late.json()["id"]]  # the refused one left nothing


def test_another_organization_gets_404s_and_each_attempt_is_audited(served: Served) -> None:
    _, owner = served.account("files-owner")
    stranger_org, stranger = served.account("files-stranger")
    mine = owner.files.create(file=("private.jsonl", b'{"secret": 1}\n'), purpose="fine-tune")
    missing = "file-" + "0" * 26
    for attempt in (
        stranger.files.retrieve,
        lambda i: stranger.files.content(i).read(),
        stranger.files.delete,
    ):
        with pytest.raises(openai.NotFoundError) as foreign:
            attempt(mine.id)
        with pytest.raises(openai.NotFoundError) as absent:
            attempt(missing)
        assert foreign.value.body["message"].replace(mine.id, "?") == absent.value.body["message"].replace(
            missing, "?"
        )
    assert mine.id not in [f.id for f in stranger.files.list()]
    assert owner.files.content(mine.id).read() == b'{"secret": 1}\n'
    db = open_database(sqlite_url(served.data_dir))
    try:
        rows = list_audit(db, action=FOREIGN_ACCESS, target=mine.id)
    finally:
        db.close()
    assert len(rows) == 3 and all(row.actor.startswith(f"org:{stranger_org}/key:") for row in rows)


def test_content_whose_bytes_are_gone_is_a_410_not_a_500(served: Served) -> None:
    org_id, client = served.account("files-lost")
    lost = client.files.create(file=("lost.jsonl", b"{}\n"), purpose="user_data")
    (served.data_dir / "files" / org_id / lost.id).unlink()  # a disk lost, a hand deletion
    with pytest.raises(openai.APIStatusError) as gone:
        client.files.content(lost.id).read()
    assert gone.value.status_code == 410 and gone.value.body["code"] == "file_content_missing"
    assert client.files.retrieve(lost.id).id == lost.id  # the row is still there, and can be deleted
    assert client.files.delete(lost.id).deleted
