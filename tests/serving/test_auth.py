"""Authentication over HTTP: every /v1 route needs a key, every bad key gets the same 401 (nothing tells
whether a key exists), allow-lists give 403 and hide other models, keys are managed per organization,
and --no-auth serves one built-in local principal."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from tests.platform.helpers import make_account
from tests.serving.fake_engine import FakeEngine
from tokenmill.platform.gateway import Gateway
from tokenmill.platform.keys import revoke_key
from tokenmill.platform.tables import ApiKey

USER = [{"role": "user", "content": "hi"}]
CHAT = {"model": "fake-chat", "messages": USER, "max_tokens": 4}


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _unauthorized(response: Any) -> dict[str, Any]:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    return response.json()


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/v1/models", None),
        ("GET", "/v1/models/fake-chat", None),
        ("POST", "/v1/chat/completions", CHAT),
        ("POST", "/v1/chat/completions", {"not": "valid"}),  # auth comes before body validation
        ("POST", "/v1/completions", {"model": "fake-chat", "prompt": "x"}),
        ("POST", "/v1/embeddings", {"model": "fake-chat", "input": "x"}),
        ("GET", "/v1/user/info", None),
        ("GET", "/v1/usage", None),
        ("GET", "/v1/keys", None),
        ("POST", "/v1/keys", {"name": "x"}),
        ("DELETE", "/v1/keys/key_123", None),
    ],
)
def test_every_v1_route_needs_a_key(
    billed_client: TestClient, fake_engine: FakeEngine, method: str, path: str, body: Any
) -> None:
    error = _unauthorized(billed_client.request(method, path, json=body))["error"]
    assert error["code"] == "invalid_api_key" and error["type"] == "authentication_error"
    assert fake_engine.submitted == []


def test_operator_probes_stay_open(billed_client: TestClient) -> None:
    assert [billed_client.get(p).status_code for p in ("/health", "/ready", "/metrics")] == [200, 200, 200]


def test_every_bad_key_gets_the_same_401(billed_client: TestClient, gateway: Gateway) -> None:
    revoked, expired = make_account(gateway.db), make_account(gateway.db)
    revoke_key(gateway.db, revoked.key.info.id)
    with gateway.db.write() as session:  # expiry passes without sleeping
        session.execute(
            update(ApiKey)
            .where(ApiKey.id == expired.key.info.id)
            .values(expires_at=gateway.db.now() - timedelta(seconds=1))
        )
    admin_key = (gateway.settings.data_dir / "admin_key").read_text().strip()
    headers = [
        {},
        {"Authorization": ""},
        {"Authorization": f"Basic {revoked.key.key}"},
        {"Authorization": revoked.key.key},  # no scheme
        _bearer("sk-short"),
        _bearer("sk-" + "A" * 43),  # well-formed, unknown
        _bearer(revoked.key.key),
        _bearer(expired.key.key),
        _bearer(admin_key),  # operator keys are not user keys
    ]
    bodies = [_unauthorized(billed_client.get("/v1/models", headers=h)) for h in headers]
    assert all(body == bodies[0] for body in bodies)
    assert bodies[0]["error"]["message"] == "Incorrect API key provided."


def test_allow_list_gives_403_and_hides_other_models(
    billed_client: TestClient, gateway: Gateway, fake_engine: FakeEngine
) -> None:
    limited = make_account(gateway.db, allowed_models=["some-other-model"])
    headers = _bearer(limited.key.key)
    for model in ("fake-chat", "no-such-model"):  # 403 either way: nothing learnt about what exists
        response = billed_client.post("/v1/chat/completions", headers=headers, json={**CHAT, "model": model})
        assert response.status_code == 403, response.text
        assert response.json()["error"] | {"message": ""} == {
            "message": "",
            "type": "permission_error",
            "param": "model",
            "code": "model_not_allowed",
        }
    assert billed_client.get("/v1/models", headers=headers).json()["data"] == []
    assert billed_client.get("/v1/models/fake-chat", headers=headers).status_code == 404
    assert fake_engine.submitted == []
    everything = make_account(gateway.db)
    listed = billed_client.get("/v1/models", headers=_bearer(everything.key.key)).json()["data"]
    assert [m["id"] for m in listed] == ["fake-chat"]


def test_keys_are_managed_per_organization(billed_client: TestClient, gateway: Gateway) -> None:
    mine, theirs = make_account(gateway.db), make_account(gateway.db)
    created = billed_client.post("/v1/keys", headers=_bearer(mine.key.key), json={"name": "laptop"})
    assert created.status_code == 200, created.text
    new_key = created.json()["key"]
    assert new_key.startswith(created.json()["prefix"]) and created.json()["name"] == "laptop"
    assert billed_client.get("/v1/models", headers=_bearer(new_key)).status_code == 200

    listed = billed_client.get("/v1/keys", headers=_bearer(new_key)).json()["data"]
    assert {k["id"] for k in listed} == {mine.key.info.id, created.json()["id"]}
    assert all("key" not in k for k in listed) and new_key not in str(listed)

    foreign = billed_client.delete(f"/v1/keys/{theirs.key.info.id}", headers=_bearer(mine.key.key))
    assert foreign.status_code == 404  # another organization's key looks like no key at all
    assert billed_client.get("/v1/models", headers=_bearer(theirs.key.key)).status_code == 200

    revoked = billed_client.delete(f"/v1/keys/{created.json()['id']}", headers=_bearer(mine.key.key))
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    _unauthorized(billed_client.get("/v1/models", headers=_bearer(new_key)))


def test_a_key_cannot_create_a_stronger_key(billed_client: TestClient, gateway: Gateway) -> None:
    limited = make_account(gateway.db, allowed_models=["fake-chat"], spend_limit_micros=1000)
    headers = _bearer(limited.key.key)
    wider = billed_client.post("/v1/keys", headers=headers, json={"allowed_models": ["fake-chat", "other"]})
    assert wider.status_code == 403 and wider.json()["error"]["param"] == "allowed_models"
    richer = billed_client.post("/v1/keys", headers=headers, json={"spend_limit_micros": 5000})
    assert richer.status_code == 403 and richer.json()["error"]["param"] == "spend_limit_micros"
    typo = billed_client.post("/v1/keys", headers=headers, json={"spend_limit": 5000})
    assert typo.status_code == 400 and typo.json()["error"]["param"] == "spend_limit"
    inherited = billed_client.post("/v1/keys", headers=headers, json={}).json()
    assert inherited["allowed_models"] == ["fake-chat"] and inherited["spend_limit_micros"] == 1000


def test_user_info_and_usage(billed_client: TestClient, gateway: Gateway) -> None:
    account = make_account(gateway.db, 2_500_000)
    headers = _bearer(account.key.key)
    info = billed_client.get("/v1/user/info", headers=headers).json()
    assert info["code"] == 20000 and info["status"] is True
    data = info["data"]
    assert data["id"] == account.user.id and data["email"] == account.user.email
    assert data["organization"] == {"id": account.org.id, "name": account.org.name, "tier": "default"}
    assert data["balance"] == "2.500000" and data["balance_micros"] == 2_500_000
    assert data["available_micros"] == 2_500_000 and data["billing_enabled"] is True

    assert billed_client.post("/v1/chat/completions", headers=headers, json=CHAT).status_code == 200
    usage = billed_client.get("/v1/usage", headers=headers).json()
    (row,) = usage["data"]
    assert row["model"] == "fake-chat" and row["num_requests"] == 1 and row["completion_tokens"] == 4
    assert row["cost_micros"] == 0 and usage["total_cost"] == "0.000000"  # fake-chat is a free model
    empty = billed_client.get("/v1/usage?start_date=2020-01-01&end_date=2020-01-31", headers=headers).json()
    assert empty["data"] == [] and empty["start_date"] == "2020-01-01"
    backwards = billed_client.get("/v1/usage?start_date=2020-02-01&end_date=2020-01-01", headers=headers)
    assert backwards.status_code == 400 and backwards.json()["error"]["param"] == "start_date"


def test_no_auth_serves_a_local_principal(client: TestClient) -> None:
    info = client.get("/v1/user/info").json()["data"]
    assert info["organization"]["id"] == "local" and info["billing_enabled"] is False
    for method, path in (("GET", "/v1/keys"), ("POST", "/v1/keys"), ("GET", "/v1/usage")):
        response = client.request(method, path, json={} if method == "POST" else None)
        assert response.status_code == 400 and response.json()["error"]["code"] == "auth_disabled"
    chat = client.post("/v1/chat/completions", json=CHAT)
    assert chat.status_code == 200 and not any(h.startswith("x-ratelimit") for h in chat.headers)
