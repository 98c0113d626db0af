"""Data controls over HTTP, on SQLite and PostgreSQL (the app in front of a real platform and the FakeEngine):
the retention setting and the standing facts, "delete all my data" (a wrong confirmation deletes nothing; the
right one leaves no file of the organization on disk, and no one else's is touched), the export zip (its usage
CSV is the same as GET /v1/usage?format=csv). And, through a real `tokenmill serve`, that the text of prompts
never reaches the database or the server's log."""

from __future__ import annotations

import csv
import io
import json
import secrets
import zipfile
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from datetime import timedelta
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient

from tests.platform.conftest import BACKENDS, EmptyDatabase
from tests.platform.helpers import Account, make_account
from tests.serving.conftest import wait_ready
from tests.serving.fake_engine import FakeEngine
from tests.serving.server_process import ServerProcess
from tokenmill import cli
from tokenmill.platform.data_controls import sweep
from tokenmill.platform.gateway import Gateway, PlatformSettings
from tokenmill.platform.pricing import set_model_price
from tokenmill.serving.app import create_app
from tokenmill.serving.settings import ServerSettings


@pytest.fixture(params=BACKENDS)
def gateway(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Gateway]:
    empty = EmptyDatabase(request.param, tmp_path)
    opened = Gateway.open(PlatformSettings(data_dir=tmp_path / "data", database_url=empty.url))
    opened.start()
    yield opened
    opened.close()
    empty.drop()


@pytest.fixture
def client(gateway: Gateway, smollm2_tokenizer: Any) -> Iterator[TestClient]:
    gateway.register_models(["fake-chat"])
    set_model_price(gateway.db, "fake-chat", 1_000_000, 3_000_000)
    engine = FakeEngine(smollm2_tokenizer, model_id="fake-chat", step_delay_s=0)
    settings = ServerSettings(max_file_bytes=1 << 20, max_org_file_bytes=4 << 20, data_sweep_interval_s=0)
    app = create_app({"fake-chat": engine}, {}, settings, gateway)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        wait_ready(test_client)
        yield test_client


def bearer(account: Account) -> dict[str, str]:
    return {"Authorization": f"Bearer {account.key.key}"}


def upload(client: TestClient, account: Account, data: bytes, name: str = "d.jsonl", **fields: str) -> dict:
    response = client.post(
        "/v1/files",
        headers=bearer(account),
        files={"file": (name, data)},
        data={"purpose": "user_data", **fields},
    )
    assert response.status_code == 200, response.text
    return response.json()


def on_disk(gateway: Gateway, org_id: str) -> list[str]:
    root = gateway.settings.data_dir / "files" / org_id
    return sorted(p.name for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_retention_setting_and_facts(client: TestClient, gateway: Gateway) -> None:
    account = make_account(gateway.db)
    shown = client.get("/v1/organization/data_controls", headers=bearer(account)).json()
    assert shown["organization_id"] == account.org.id and shown["file_retention_days"] is None
    assert shown["stores_request_content"] is False and "counts" in shown["usage_records"]
    changed = client.patch(
        "/v1/organization/data_controls", headers=bearer(account), json={"file_retention_days": 7}
    )
    assert changed.status_code == 200 and changed.json()["file_retention_days"] == 7
    for bad in ({"file_retention_days": 0}, {"file_retention_days": "7"}, {}, {"other": 1}):
        refused = client.patch("/v1/organization/data_controls", headers=bearer(account), json=bad)
        assert refused.status_code == 400 and refused.json()["error"]["type"] == "invalid_request_error"
    old = upload(client, account, b"old\n")
    store = client.app.state.tokenmill.data.store  # type: ignore[attr-defined]
    report = sweep(gateway.db, store, now=gateway.db.now() + timedelta(days=7, seconds=1))
    assert report.retained_files == 1 and on_disk(gateway, account.org.id) == []
    assert client.get(f"/v1/files/{old['id']}", headers=bearer(account)).status_code == 404


def test_delete_all_my_data(client: TestClient, gateway: Gateway) -> None:
    mine, theirs = make_account(gateway.db, 1_000_000), make_account(gateway.db)
    made = [upload(client, mine, f"mine {i}\n".encode())["id"] for i in range(3)]
    kept = upload(client, theirs, b"theirs\n")["id"]
    job = gateway.settings.data_dir / "fine_tuning" / mine.org.id / "ftjob-1"
    job.mkdir(parents=True)
    (job / "adapter_model.safetensors").write_bytes(b"weights")
    for body in ({"confirm": "not the name"}, {}, {"confirm": theirs.org.name}):
        refused = client.post("/v1/organization/data/delete", headers=bearer(mine), json=body)
        assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "confirm"
    assert on_disk(gateway, mine.org.id) == sorted(made) and job.exists()

    done = client.post("/v1/organization/data/delete", headers=bearer(mine), json={"confirm": mine.org.name})
    assert done.status_code == 200, done.text
    assert done.json() == {
        "object": "organization.data_deletion",
        "organization_id": mine.org.id,
        "deleted_files": 3,
        "deleted_bytes": sum(len(f"mine {i}\n") for i in range(3)),
        "deleted_content": {"fine_tuning": 1, "batches": 0},
    }
    assert on_disk(gateway, mine.org.id) == [] and not job.parent.exists()
    assert client.get("/v1/files", headers=bearer(mine)).json()["data"] == []
    assert on_disk(gateway, theirs.org.id) == [kept]
    assert client.get(f"/v1/files/{kept}/content", headers=bearer(theirs)).content == b"theirs\n"
    assert client.get("/v1/user/info", headers=bearer(mine)).json()["data"]["balance_micros"] == 1_000_000


def test_the_export_zip_holds_what_it_says(client: TestClient, gateway: Gateway) -> None:
    account = make_account(gateway.db, 10_000_000)
    chat = {"model": "fake-chat", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3}
    assert client.post("/v1/chat/completions", headers=bearer(account), json=chat).status_code == 200
    info = upload(client, account, b'{"x": 1}\n', "train.jsonl")
    response = client.get("/v1/organization/export", headers=bearer(account))
    assert response.status_code == 200 and response.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    manifest = json.loads(archive.read("manifest.json"))
    assert sorted(manifest["contents"]) == sorted(archive.namelist())
    usage_csv = client.get("/v1/usage", headers=bearer(account), params={"format": "csv"}).text
    assert list(csv.reader(io.StringIO(archive.read("usage.csv").decode()))) == list(
        csv.reader(io.StringIO(usage_csv))
    )
    (entry,) = json.loads(archive.read("files.json"))
    assert entry["id"] == info["id"] and archive.read(entry["content"]) == b'{"x": 1}\n'
    ledger = list(csv.DictReader(io.StringIO(archive.read("ledger.csv").decode())))
    assert sorted(row["kind"] for row in ledger) == ["charge", "topup"]


def test_upload_fields_are_checked_and_refusals_keep_nothing(client: TestClient, gateway: Gateway) -> None:
    account = make_account(gateway.db)
    bad = [
        {"data": {"purpose": "batch", "expires_after[anchor]": "now", "expires_after[seconds]": "3600"}},
        {"data": {"purpose": "batch", "expires_after[seconds]": "60"}},
        {
            "data": {
                "purpose": "batch",
                "expires_after[anchor]": "created_at",
                "expires_after[seconds]": "1e9",
            }
        },
        {"data": {"purpose": "batch", "file": "text, not a file"}, "files": {"x": ("x", b"")}},
    ]
    for case in bad:
        files = case.get("files", {"file": ("f.jsonl", b"{}\n")})
        refused = client.post("/v1/files", headers=bearer(account), data=case["data"], files=files)
        assert refused.status_code == 400, refused.text
    too_big = client.post(
        "/v1/files",
        headers=bearer(account),
        data={"purpose": "batch"},
        files={"file": ("f", b"x" * ((1 << 20) + 1))},
    )
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "file_too_large"
    assert on_disk(gateway, account.org.id) == []


def test_no_auth_server_has_no_files(smollm2_tokenizer: Any) -> None:
    app = create_app({"fake-chat": FakeEngine(smollm2_tokenizer)}, {}, ServerSettings(no_auth=True))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        for method, path in (("GET", "/v1/files"), ("POST", "/v1/files"), ("GET", "/v1/organization/export")):
            response = test_client.request(method, path)
            assert response.status_code == 400 and response.json()["error"]["code"] == "auth_disabled"


# -- request content is never stored ------------------------------------------------------------------


@pytest.mark.slow  # runs a server process
def test_prompts_never_reach_the_database_or_the_log(tiny_llama_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("tokenmill.engine.async_engine")
    data_dir = tmp_path / "data"
    args = ["--model", f"tiny={tiny_llama_dir}", "--embedding-model", "none", "--kv-cache-memory", "4M"]
    process = ServerProcess(args, tmp_path / "serve.log", data_dir=data_dir).start(timeout_s=180)
    try:

        def admin(*argv: str) -> str:
            out = io.StringIO()
            with redirect_stdout(out), redirect_stderr(io.StringIO()):
                assert cli.main(["admin", *argv, "--data-dir", str(data_dir)]) == 0
            return out.getvalue().strip()

        admin("create-org", "private", "--tier", "unlimited")
        admin("create-user", "private", "p@example.com")
        client = openai.OpenAI(base_url=f"{process.url}/v1", api_key=admin("create-key", "p@example.com"))
        marker = f"zebra-quartz-{secrets.token_hex(6)}"
        chat = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"My secret is {marker}."}], max_tokens=4
        )
        assert chat.usage.prompt_tokens > 0
        client.completions.create(model="tiny", prompt=f"Remember {marker}", max_tokens=4)
        streamed = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": marker}], max_tokens=4, stream=True
        )
        assert list(streamed)
        requests = client.get("/usage/requests", cast_to=object)
        assert len(requests["data"]) == 3  # each request was metered...
    finally:
        process.stop()
    needle = marker.encode()
    for path in sorted(p for p in data_dir.rglob("*") if p.is_file()):  # ...and none kept its text
        assert needle not in path.read_bytes(), f"{path.name} holds the prompt's text"
    assert needle not in (tmp_path / "serve.log").read_bytes()
