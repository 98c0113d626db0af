"""Hostile input found by fuzzing, each defect reproduced: a lone UTF-16 surrogate anywhere in a body, numbers
and dates past what the database and the standard library hold, and a key row that no response could carry
(which used to break every later listing of its organization). Each gets a 400 naming the field, writes
nothing, and nothing that is stored can break a read; on SQLite and PostgreSQL."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, text

from tests.platform.conftest import BACKENDS, EmptyDatabase
from tests.platform.helpers import Account, make_account
from tests.serving.conftest import wait_ready
from tests.serving.fake_engine import FakeEngine
from tokenmill import cli
from tokenmill.engine.embedder import Embedder
from tokenmill.platform.gateway import Gateway, PlatformSettings
from tokenmill.platform.tables import ApiKey
from tokenmill.serving.app import create_app
from tokenmill.serving.settings import ServerSettings

LONE = "\\ud800"
"""A lone high surrogate as JSON writes it: valid JSON, invalid Unicode."""


def _post(client: TestClient, path: str, raw_json: str, headers: dict[str, str] | None = None) -> Any:
    return client.post(
        path, content=raw_json, headers={"content-type": "application/json", **(headers or {})}
    )


def _refused(response: Any, param: str, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    if code is not None:
        assert error["code"] == code
    return error


@pytest.fixture
def unauthenticated(fake_engine: FakeEngine, minilm: Embedder) -> Iterator[TestClient]:
    app = create_app({"fake-chat": fake_engine}, {"all-MiniLM-L6-v2": minilm}, ServerSettings(no_auth=True))
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client)
        yield client


@pytest.mark.parametrize(
    ("path", "raw_json", "param"),
    [
        (
            "/v1/chat/completions",
            f'{{"model": "fake-chat", "messages": [{{"role": "user", "content": "hi {LONE} there"}}]}}',
            "messages[0].content",
        ),
        (
            "/v1/chat/completions",
            f'{{"model": "fake-chat", "messages": [{{"role": "user", "content": [{{"type": "text", '
            f'"text": "{LONE}"}}]}}]}}',
            "messages[0].content[0].text",
        ),
        (
            "/v1/chat/completions",
            f'{{"model": "fake-chat", "messages": [{{"role": "user", "content": "hi", "name": "a{LONE}"}}]}}',
            "messages[0].name",
        ),
        (
            "/v1/chat/completions",
            f'{{"model": "fake-chat", "stop": ["ok", "{LONE}"], "messages": [{{"role": "user", "content": "hi"}}]}}',
            "stop[1]",
        ),
        (
            "/v1/chat/completions",
            f'{{"model": "fake{LONE}", "messages": [{{"role": "user", "content": "hi"}}]}}',
            "model",
        ),
        (
            "/v1/chat/completions",
            f'{{"model": "fake-chat", "logit_bias": {{"1{LONE}": 1}}, "messages": [{{"role": "user", "content": "hi"}}]}}',
            "logit_bias",
        ),
        ("/v1/completions", f'{{"model": "fake-chat", "prompt": "hi {LONE}"}}', "prompt"),
        ("/v1/completions", f'{{"model": "fake-chat", "prompt": ["ok", "{LONE}"]}}', "prompt[1]"),
        ("/v1/embeddings", f'{{"model": "all-MiniLM-L6-v2", "input": "{LONE}"}}', "input"),
        ("/v1/embeddings", f'{{"model": "all-MiniLM-L6-v2", "input": ["a", "b{LONE}"]}}', "input[1]"),
        ("/v1/embeddings", f'{{"model": "all-MiniLM-L6-v2", "input": "x", "user": "{LONE}"}}', "user"),
    ],
)
def test_a_lone_surrogate_anywhere_is_a_400_naming_the_field(
    unauthenticated: TestClient, fake_engine: FakeEngine, path: str, raw_json: str, param: str
) -> None:
    response = _post(unauthenticated, path, raw_json)
    error = _refused(response, param, code="invalid_unicode")
    assert "valid Unicode" in error["message"]
    assert fake_engine.submitted == []


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "fake-chat", "messages": [{"role": "user", "content": "hi \xed\xa0\x80"}]}',
        '{"model": "fake-chat", "messages": [{"role": "user", "content": "hi \\ud800"}]}'.encode("utf-16"),
    ],
    ids=["surrogate-as-utf8-bytes", "utf16-body"],
)
def test_surrogates_that_arrive_without_an_ascii_escape_are_refused_too(
    unauthenticated: TestClient, fake_engine: FakeEngine, raw: bytes
) -> None:
    """json.loads lets a surrogate's (invalid) UTF-8 bytes through, and accepts UTF-16 documents."""
    response = unauthenticated.post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    _refused(response, "messages[0].content", code="invalid_unicode")
    assert fake_engine.submitted == []


def test_strings_where_openai_wants_numbers_are_refused(unauthenticated: TestClient) -> None:
    body = {"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}]}
    for field, value in (("max_tokens", "4"), ("n", "2"), ("temperature", "0.5"), ("stream", "true")):
        _refused(unauthenticated.post("/v1/chat/completions", json={**body, field: value}), field)
    _refused(
        unauthenticated.post("/v1/completions", json={"model": "fake-chat", "prompt": [1, "2"]}), "prompt"
    )


def test_numbers_past_what_the_engine_holds_are_refused(unauthenticated: TestClient) -> None:
    body = {"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}]}
    for field, value in (("seed", 2**64), ("top_k", 2**40), ("max_tokens", 10**23)):
        _refused(unauthenticated.post("/v1/chat/completions", json={**body, field: value}), field)
    infinite = '{"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}], "temperature": 1e400}'
    _refused(_post(unauthenticated, "/v1/chat/completions", infinite), "temperature")


# -- keys: bounds, and no row a response could not carry ------------------------------------------


@pytest.fixture(params=BACKENDS)
def platform_gateway(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Gateway]:
    empty = EmptyDatabase(request.param, tmp_path)
    gateway = Gateway.open(PlatformSettings(data_dir=tmp_path / "data", database_url=empty.url))
    gateway.start()
    yield gateway
    gateway.close()
    empty.drop()


@pytest.fixture
def keyed(fake_engine: FakeEngine, platform_gateway: Gateway) -> Iterator[tuple[TestClient, Account]]:
    platform_gateway.register_models(["fake-chat"])
    app = create_app({"fake-chat": fake_engine}, {}, ServerSettings(), platform_gateway)
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client)
        yield client, make_account(platform_gateway.db)


def _num_keys(gateway: Gateway, org_id: str) -> int:
    with gateway.db.read() as session:
        return session.scalar(select(func.count()).select_from(ApiKey).where(ApiKey.org_id == org_id)) or 0


def _bearer(account: Account) -> dict[str, str]:
    return {"Authorization": f"Bearer {account.key.key}"}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"expires_at": 253402300800}, "expires_at"),  # the first second of year 10000
        ({"expires_at": 2**62}, "expires_at"),
        ({"spend_limit_micros": 2**63}, "spend_limit_micros"),
        ({"spend_limit_micros": 10**16}, "spend_limit_micros"),
        ({"name": "laptop", "expires_at": "4102444800"}, "expires_at"),  # 2100, but a string
        ({"name": "nul\x00byte"}, "name"),  # PostgreSQL text cannot hold NUL
        ({"allowed_models": ["ok", "nul\x00byte"]}, "allowed_models[1]"),
    ],
)
def test_key_fields_past_what_the_database_holds_are_400s_that_write_nothing(
    keyed: tuple[TestClient, Account], platform_gateway: Gateway, body: dict[str, Any], param: str
) -> None:
    client, account = keyed
    _refused(client.post("/v1/keys", json=body, headers=_bearer(account)), param)
    assert _num_keys(platform_gateway, account.org.id) == 1


def test_a_key_with_an_invalid_model_name_is_refused_and_listing_keys_keeps_working(
    keyed: tuple[TestClient, Account], platform_gateway: Gateway
) -> None:
    client, account = keyed
    response = _post(client, "/v1/keys", f'{{"allowed_models": ["{LONE}"]}}', _bearer(account))
    _refused(response, "allowed_models[0]", code="invalid_unicode")
    assert _num_keys(platform_gateway, account.org.id) == 1
    assert client.get("/v1/keys", headers=_bearer(account)).status_code == 200


def test_a_poisoned_row_from_before_cannot_break_listings(
    keyed: tuple[TestClient, Account], platform_gateway: Gateway
) -> None:
    """A key stored with an invalid model name (as the old code did) is listed with U+FFFD in its place, over
    HTTP and in the admin CLI, instead of failing every listing of the organization."""
    client, account = keyed
    with platform_gateway.db.write() as session:  # JSON escapes the surrogate, so the row can be written
        session.execute(
            text("UPDATE api_keys SET allowed_models = :models WHERE id = :id"),
            {"models": json.dumps(["ok", "\ud800"]), "id": account.key.info.id},
        )
    listed = client.get("/v1/keys", headers=_bearer(account))
    assert listed.status_code == 200, listed.text
    assert listed.json()["data"][0]["allowed_models"] == ["ok", "\ufffd"]
    out, err = io.StringIO(), io.StringIO()
    settings = platform_gateway.settings
    argv = ["admin", "list-keys", "--data-dir", str(settings.data_dir), "--database-url"]
    with redirect_stdout(out), redirect_stderr(err):
        assert cli.main([*argv, settings.resolved_database_url]) == 0, err.getvalue()
    assert "ok,\ufffd" in out.getvalue()


def test_the_admin_cli_refuses_undecodable_arguments_with_a_message(tmp_path: Path) -> None:
    """argv bytes that are not UTF-8 arrive as lone surrogates (surrogateescape)."""
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        status = cli.main(["admin", "create-org", "bad\udcff", "--data-dir", str(tmp_path)])
    assert status == 2
    assert "name: must be valid Unicode text" in err.getvalue()
