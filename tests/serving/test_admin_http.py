"""The operator's API under /v1/admin, through the real app and a real platform (SQLite): every route works
with the admin key and its effect is visible through the API; a user key gets 403 and no key 401 on every
one of them (the routes are read from the app, so a new one cannot be left out); every change is in the
audit log under `admin:<admin key id>`; and a refused change writes nothing, not even an audit row."""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from tests.platform.helpers import Account, make_account, reserve_model
from tokenmill.platform import audit
from tokenmill.platform.admin_key import rotate_admin_key
from tokenmill.platform.auth import authenticate_admin
from tokenmill.platform.billing import settle
from tokenmill.platform.gateway import Gateway
from tokenmill.platform.ledger import balance_micros
from tokenmill.platform.tables import Reservation
from tokenmill.serving.app import create_app
from tokenmill.serving.settings import ServerSettings

ADMIN_ROUTES = sorted(
    (method.upper(), path)
    for path, operations in create_app({}, {}, ServerSettings(no_auth=True)).openapi()["paths"].items()
    if path.startswith("/v1/admin")
    for method in operations
)
"""Every operation under /v1/admin, as the app publishes them (so a route added later is checked too)."""
CHANGES = {"POST", "PUT", "PATCH", "DELETE"}


def _url(path: str) -> str:
    """A concrete URL for a route's path: every path parameter filled in."""
    return re.sub(r"\{[^}]*\}", "some-id", path)


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _ok(response: Any) -> Any:
    assert response.status_code == 200, response.text
    return response.json()


def _error(response: Any, status: int, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


class Admin:
    """The test client with the admin key on every request, and what the audit log should call it."""

    def __init__(self, client: TestClient, gateway: Gateway) -> None:
        key = (gateway.settings.data_dir / "admin_key").read_text().strip()
        self.client = client
        self.headers = _bearer(key)
        self.actor = f"admin:{authenticate_admin(gateway.db, key).key_id}"

    def get(self, path: str, **params: Any) -> Any:
        return self.client.get(path, headers=self.headers, params=params)

    def send(self, method: str, path: str, body: Any = None) -> Any:
        return self.client.request(method, path, headers=self.headers, json=body)


@pytest.fixture
def admin(billed_client: TestClient, gateway: Gateway) -> Admin:
    return Admin(billed_client, gateway)


def _audit(admin: Admin, **params: Any) -> list[dict[str, Any]]:
    return _ok(admin.get("/v1/admin/audit-log", **params))["data"]


def _org(admin: Admin, name: str, **fields: Any) -> dict[str, Any]:
    return _ok(admin.send("POST", "/v1/admin/organizations", {"name": name, **fields}))


# -- who may call ----------------------------------------------------------------------------------------


def test_the_routes_are_all_there() -> None:
    """Everything `tokenmill admin` does to accounts, money and the model square has its route."""
    assert {
        ("GET", "/v1/admin/organizations"),
        ("POST", "/v1/admin/organizations"),
        ("PATCH", "/v1/admin/organizations/{org}"),
        ("POST", "/v1/admin/organizations/{org}/top-ups"),
        ("GET", "/v1/admin/users"),
        ("POST", "/v1/admin/users"),
        ("GET", "/v1/admin/keys"),
        ("POST", "/v1/admin/keys"),
        ("POST", "/v1/admin/keys/{key_id}/revoke"),
        ("GET", "/v1/admin/prices"),
        ("PUT", "/v1/admin/prices/{model}"),
        ("GET", "/v1/admin/tiers"),
        ("PUT", "/v1/admin/tiers/{tier}"),
        ("GET", "/v1/admin/usage"),
        ("GET", "/v1/admin/earnings"),
        ("GET", "/v1/admin/listings"),
        ("POST", "/v1/admin/listings"),
        ("GET", "/v1/admin/listings/{model}"),
        ("PATCH", "/v1/admin/listings/{model}"),
        ("POST", "/v1/admin/listings/{model}/publish"),
        ("POST", "/v1/admin/listings/{model}/retire"),
        ("POST", "/v1/admin/reservations/release"),
        ("GET", "/v1/admin/audit-log"),
    } <= set(ADMIN_ROUTES)


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
def test_every_admin_route_refuses_user_keys_with_403_and_bad_keys_with_the_usual_401(
    billed_client: TestClient, gateway: Gateway, method: str, path: str
) -> None:
    user = make_account(gateway.db)
    body = {} if method in CHANGES else None  # refused before the body is even validated
    response = billed_client.request(method, _url(path), headers=_bearer(user.key.key), json=body)
    error = _error(response, 403)
    assert error["code"] == "permission_denied" and error["type"] == "permission_error"
    assert error["message"] == "This endpoint requires an admin key."

    bad = [
        {},
        _bearer("sk-admin-" + "A" * 43),
        _bearer("sk-short"),
        {"Authorization": f"Basic {user.key.key}"},
    ]
    errors = []
    for headers in bad:
        response = billed_client.request(method, _url(path), headers=headers, json=body)
        assert response.headers["www-authenticate"] == "Bearer"
        errors.append(_error(response, 401))
    assert all(error == errors[0] for error in errors) and errors[0]["code"] == "invalid_api_key"
    assert audit.list_audit(gateway.db) == []


def test_a_rotated_admin_key_is_refused(admin: Admin, gateway: Gateway) -> None:
    new_key = rotate_admin_key(gateway.db, gateway.settings.data_dir)
    _error(admin.get("/v1/admin/organizations"), 401)
    assert admin.client.get("/v1/admin/organizations", headers=_bearer(new_key)).status_code == 200


def test_without_a_platform_the_admin_api_says_so(client: TestClient) -> None:
    for method, path in ADMIN_ROUTES:
        response = client.request(method, _url(path), json={} if method in CHANGES else None)
        assert _error(response, 400)["code"] == "auth_disabled", (method, path)


# -- organizations, users, keys --------------------------------------------------------------------------


def test_organizations_are_created_listed_and_moved_between_tiers(admin: Admin) -> None:
    created = _org(admin, "acme")
    assert (created["name"], created["tier"], created["balance_micros"], created["balance"]) == (
        "acme",
        "default",
        0,
        "0.000000",
    )
    listed = _ok(admin.get("/v1/admin/organizations"))["data"]
    assert [org["id"] for org in listed] == [created["id"]]

    moved = _ok(admin.send("PATCH", "/v1/admin/organizations/acme", {"tier": "unlimited"}))  # by name
    assert moved["id"] == created["id"] and moved["tier"] == "unlimited"
    assert _ok(admin.get("/v1/admin/organizations"))["data"][0]["tier"] == "unlimited"
    tiers = {tier["name"]: tier for tier in _ok(admin.get("/v1/admin/tiers"))["data"]}
    assert tiers["unlimited"]["num_organizations"] == 1

    assert (
        _error(admin.send("POST", "/v1/admin/organizations", {"name": "acme"}), 409, "name")["code"]
        == "conflict"
    )
    _error(admin.send("PATCH", f"/v1/admin/organizations/{created['id']}", {"tier": "gold"}), 404, "tier")


def test_users_are_created_in_an_organization_named_by_id_or_name(admin: Admin) -> None:
    acme, other = _org(admin, "acme"), _org(admin, "other")
    ann = _ok(
        admin.send("POST", "/v1/admin/users", {"org": "acme", "email": "Ann@Example.com", "name": "Ann"})
    )
    bob = _ok(admin.send("POST", "/v1/admin/users", {"org": other["id"], "email": "bob@example.com"}))
    assert (ann["org_id"], ann["email"], ann["name"]) == (acme["id"], "ann@example.com", "Ann")
    assert bob["name"] == "bob@example.com"

    assert [u["id"] for u in _ok(admin.get("/v1/admin/users"))["data"]] == [ann["id"], bob["id"]]
    assert [u["id"] for u in _ok(admin.get("/v1/admin/users", org="acme"))["data"]] == [ann["id"]]
    assert [u["id"] for u in _ok(admin.get("/v1/admin/users", org=other["id"]))["data"]] == [bob["id"]]
    _error(admin.get("/v1/admin/users", org="nobody"), 404, "organization")
    _error(admin.send("POST", "/v1/admin/users", {"org": "acme", "email": "not-an-email"}), 400, "email")


def test_a_created_key_works_its_secret_is_shown_once_and_revoking_it_takes_effect(admin: Admin) -> None:
    acme = _org(admin, "acme")
    _ok(admin.send("POST", "/v1/admin/users", {"org": "acme", "email": "ann@example.com"}))
    body = {
        "user": "ann@example.com",
        "name": "ci",
        "allowed_models": ["fake-chat"],
        "spend_limit_micros": 5_000_000,
        "requests_per_minute": 7,
    }
    created = _ok(admin.send("POST", "/v1/admin/keys", body))
    secret = created["key"]
    assert secret.startswith(created["prefix"]) and created["org_id"] == acme["id"]
    assert (created["allowed_models"], created["spend_limit_micros"], created["requests_per_minute"]) == (
        ["fake-chat"],
        5_000_000,
        7,
    )
    models = admin.client.get("/v1/models", headers=_bearer(secret))
    assert [m["id"] for m in _ok(models)["data"]] == ["fake-chat"]

    for params in ({}, {"org": "acme"}):
        listed = admin.get("/v1/admin/keys", **params)
        assert [k["id"] for k in _ok(listed)["data"]] == [created["id"]]
        assert secret not in listed.text and "key" not in listed.json()["data"][0]
    assert secret not in admin.get("/v1/admin/audit-log").text

    revoked = _ok(admin.send("POST", f"/v1/admin/keys/{created['id']}/revoke"))
    assert revoked["revoked_at"] is not None
    _error(admin.client.get("/v1/models", headers=_bearer(secret)), 401)
    assert _ok(admin.get("/v1/admin/keys"))["data"][0]["revoked_at"] == revoked["revoked_at"]
    _error(admin.send("POST", "/v1/admin/keys/key_nope/revoke"), 404, "key_id")
    _error(admin.send("POST", "/v1/admin/keys", {**body, "user": "nobody@example.com"}), 404, "user")


# -- money, prices, tiers --------------------------------------------------------------------------------


def test_a_top_up_changes_the_balance_once_per_idempotency_key(admin: Admin, gateway: Gateway) -> None:
    acme = _org(admin, "acme")
    url = "/v1/admin/organizations/acme/top-ups"
    body = {"amount_micros": 12_500_000, "idempotency_key": "invoice-1", "note": "March"}
    first = _ok(admin.send("POST", url, body))
    assert (first["created"], first["amount"], first["balance_micros"], first["balance"]) == (
        True,
        "12.500000",
        12_500_000,
        "12.500000",
    )
    again = _ok(admin.send("POST", url, body))
    assert (again["created"], again["id"], again["balance_micros"]) == (False, first["id"], 12_500_000)
    assert _ok(admin.get("/v1/admin/organizations"))["data"][0]["balance_micros"] == 12_500_000
    assert balance_micros(gateway.db, acme["id"]) == 12_500_000

    _error(admin.send("POST", url, {**body, "amount_micros": 1}), 409, "idempotency_key")
    _error(admin.send("POST", url, {"amount_micros": 1}), 400, "idempotency_key")
    _error(
        admin.send("POST", url, {**body, "idempotency_key": "i2", "amount_micros": -5}), 400, "amount_micros"
    )
    _error(
        admin.send("POST", url, {**body, "idempotency_key": "i3", "amount_micros": "5"}), 400, "amount_micros"
    )
    assert balance_micros(gateway.db, acme["id"]) == 12_500_000
    assert [row["action"] for row in _audit(admin)] == ["top_up", "create_org"]


def test_prices_are_set_and_listed(admin: Admin) -> None:
    set_price = admin.send(
        "PUT",
        "/v1/admin/prices/Qwen/Qwen2.5-7B",
        {"input_micros_per_mtok": 100_000, "output_micros_per_mtok": 300_000},
    )
    assert _ok(set_price) == {
        "object": "model_price",
        "model": "Qwen/Qwen2.5-7B",
        "pricing": {
            "input_micros_per_mtok": 100_000,
            "output_micros_per_mtok": 300_000,
            "input_per_1m": "0.100000",
            "output_per_1m": "0.300000",
            "free": False,
        },
    }
    prices = {p["model"]: p["pricing"] for p in _ok(admin.get("/v1/admin/prices"))["data"]}
    assert prices["Qwen/Qwen2.5-7B"]["output_micros_per_mtok"] == 300_000
    assert prices["fake-chat"]["free"] is True  # registered free at startup


def test_tiers_are_created_and_changed(admin: Admin) -> None:
    gold = _ok(
        admin.send(
            "PUT", "/v1/admin/tiers/gold", {"requests_per_minute": 5000, "free_tokens_per_minute": None}
        )
    )
    default = {tier["name"]: tier for tier in _ok(admin.get("/v1/admin/tiers"))["data"]}["default"]
    assert gold["paid_models"]["requests_per_minute"] == 5000
    assert gold["paid_models"]["tokens_per_minute"] == default["paid_models"]["tokens_per_minute"]  # copied
    assert gold["free_models"]["tokens_per_minute"] is None  # null: unlimited

    changed = _ok(admin.send("PUT", "/v1/admin/tiers/gold", {"max_concurrent_requests": 3}))
    assert changed["paid_models"] == {**gold["paid_models"], "max_concurrent_requests": 3}  # the rest kept
    listed = {tier["name"]: tier for tier in _ok(admin.get("/v1/admin/tiers"))["data"]}
    assert listed["gold"] == changed
    _error(admin.send("PUT", "/v1/admin/tiers/gold", {"copy_from": "platinum"}), 404)
    _error(admin.send("PUT", "/v1/admin/tiers/gold", {"rpm": 5}), 400, "rpm")


# -- the model square ------------------------------------------------------------------------------------


def test_a_listing_is_created_edited_published_and_retired(admin: Admin) -> None:
    acme = _org(admin, "acme")
    body = {
        "model": "acme/chat-7b",
        "provider": "acme",
        "description": "A chat model.",
        "tags": ["chat", "small"],
        "context_length": 8192,
        "price": {"input_micros_per_mtok": 200_000, "output_micros_per_mtok": 600_000},
        "status": "draft",
        "platform_fee_bps": 1500,
    }
    created = _ok(admin.send("POST", "/v1/admin/listings", body))
    assert (created["provider_org_id"], created["provider"], created["status"]) == (
        acme["id"],
        "acme",
        "draft",
    )
    assert created["pricing"]["input_per_1m"] == "0.200000" and created["platform_fee_bps"] == 1500
    assert "acme/chat-7b" in [item["model"] for item in _ok(admin.get("/v1/admin/listings"))["data"]]

    edit = {"description": "Better.", "price": {"input_micros_per_mtok": 1, "output_micros_per_mtok": 2}}
    edited = _ok(admin.send("PATCH", "/v1/admin/listings/acme/chat-7b", edit))
    assert edited["description"] == "Better." and edited["pricing"]["output_micros_per_mtok"] == 2
    prices = {p["model"]: p["pricing"] for p in _ok(admin.get("/v1/admin/prices"))["data"]}
    assert prices["acme/chat-7b"]["input_micros_per_mtok"] == 1  # a listing's price is the model's price

    assert _ok(admin.send("POST", "/v1/admin/listings/acme/chat-7b/publish"))["status"] == "published"
    assert _ok(admin.send("POST", "/v1/admin/listings/acme/chat-7b/retire"))["status"] == "retired"
    assert _ok(admin.get("/v1/admin/listings/acme/chat-7b"))["status"] == "retired"
    _error(admin.get("/v1/admin/listings/acme/nothing"), 404, "model")
    _error(admin.send("POST", "/v1/admin/listings/acme/nothing/retire"), 404, "model")


def _sell(gateway: Gateway, buyer: Account, model: str, prompt_tokens: int, completion_tokens: int) -> None:
    """One finished request, billed as admission and settlement bill it."""
    reservation = reserve_model(gateway.db, buyer.principal, model, prompt_tokens, completion_tokens)
    settle(gateway.db, reservation, prompt_tokens, completion_tokens, "ok", latency_s=0.1)


def test_usage_and_earnings_report_what_was_sold(admin: Admin, gateway: Gateway) -> None:
    provider = _org(admin, "acme")
    listing = {
        "model": "acme/chat",
        "provider": "acme",
        "price": {"input_micros_per_mtok": 1_000_000, "output_micros_per_mtok": 3_000_000},
        "platform_fee_bps": 2500,
    }
    _ok(admin.send("POST", "/v1/admin/listings", listing))
    buyer = make_account(gateway.db, 1_000_000)
    _sell(gateway, buyer, "acme/chat", 10, 20)  # 10 x 1 + 20 x 3 = 70 micros
    _sell(gateway, buyer, "acme/chat", 10, 10)  # 40 micros

    usage = _ok(admin.get("/v1/admin/usage", org=buyer.org.name))
    assert [(e["org_id"], e["model"], e["num_requests"], e["cost_micros"]) for e in usage["data"]] == [
        (buyer.org.id, "acme/chat", 2, 110)
    ]
    assert (usage["total_cost_micros"], usage["total_cost"]) == (110, "0.000110")
    assert _ok(admin.get("/v1/admin/usage", org="acme"))["data"] == []
    day = usage["data"][0]["date"]
    assert _ok(admin.get("/v1/admin/usage", start_date=day, end_date=day))["total_cost_micros"] == 110

    earnings = _ok(admin.get("/v1/admin/earnings", provider="acme"))
    (row,) = earnings["data"]
    assert (row["provider_org_id"], row["model"], row["num_requests"]) == (provider["id"], "acme/chat", 2)
    # 75% of each sale, rounded down per sale: 52 of 70 and 30 of 40.
    assert (row["sales_micros"], row["earnings_micros"], row["platform_fee_micros"]) == (110, 82, 28)
    assert (earnings["total_earnings_micros"], earnings["total_earnings"]) == (82, "0.000082")
    assert _ok(admin.get("/v1/admin/organizations"))["data"][0]["balance_micros"] == 82
    assert _ok(admin.get("/v1/admin/earnings", provider=buyer.org.id))["data"] == []
    _error(admin.get("/v1/admin/earnings", provider="nobody"), 404)
    _error(admin.get("/v1/admin/usage", start_date="2025-03-02", end_date="2025-03-01"), 400, "start_date")


# -- operations ------------------------------------------------------------------------------------------


def test_releasing_a_gone_gateways_reservations(admin: Admin, gateway: Gateway) -> None:
    buyer = make_account(gateway.db, 1_000_000)
    gone = reserve_model(gateway.db, buyer.principal, "fake-chat", 5, 5, owner="gone-gateway")
    live = reserve_model(gateway.db, buyer.principal, "fake-chat", 5, 5, owner="test-gateway")
    released = _ok(admin.send("POST", "/v1/admin/reservations/release", {"gateway_id": "gone-gateway"}))
    assert released["released_ids"] == [gone.id]
    with gateway.db.read() as session:
        states = {id_: state for id_, state in session.execute(select(Reservation.id, Reservation.state))}
    assert states == {gone.id: "released", live.id: "open"}
    again = _ok(admin.send("POST", "/v1/admin/reservations/release", {"gateway_id": "gone-gateway"}))
    assert again["released_ids"] == []
    _error(admin.send("POST", "/v1/admin/reservations/release", {}), 400)
    [row] = _audit(admin, action="release_reservations")  # the release that changed nothing has no row
    assert row["target"] == "gone-gateway" and row["after"]["reservation_ids"] == [gone.id]


def test_every_change_is_in_the_audit_log_under_the_admin_key(admin: Admin) -> None:
    _org(admin, "acme")
    admin.send("PATCH", "/v1/admin/organizations/acme", {"tier": "unlimited"})
    admin.send("POST", "/v1/admin/users", {"org": "acme", "email": "ann@example.com"})
    key = _ok(admin.send("POST", "/v1/admin/keys", {"user": "ann@example.com"}))
    admin.send("POST", f"/v1/admin/keys/{key['id']}/revoke")
    admin.send("POST", "/v1/admin/organizations/acme/top-ups", {"amount_micros": 5, "idempotency_key": "k"})
    admin.send("PUT", "/v1/admin/prices/m", {"input_micros_per_mtok": 1, "output_micros_per_mtok": 1})
    admin.send("PUT", "/v1/admin/tiers/gold", {"requests_per_minute": 9})
    admin.send("POST", "/v1/admin/listings", {"model": "m", "provider": "acme"})
    admin.send("PATCH", "/v1/admin/listings/m", {"description": "new"})
    admin.send("POST", "/v1/admin/listings/m/retire")
    admin.send("POST", "/v1/admin/listings/m/publish")
    rows = _audit(admin)
    assert [row["action"] for row in reversed(rows)] == [
        "create_org",
        "set_org_tier",
        "create_user",
        "create_key",
        "revoke_key",
        "top_up",
        "set_price",
        "set_tier_limits",
        "apply_listing",
        "update_listing",
        "set_listing_status",
        "set_listing_status",
    ]
    assert {row["actor"] for row in rows} == {admin.actor}
    (revoke,) = _audit(admin, action="revoke_key")
    assert (revoke["target"], revoke["before"]["revoked_at"]) == (key["id"], None)
    assert revoke["after"]["revoked_at"] is not None

    first = _audit(admin, limit=5)
    assert [row["id"] for row in first] == [row["id"] for row in rows[:5]]
    page = _ok(admin.get("/v1/admin/audit-log", limit=5, before_id=first[-1]["id"]))
    assert [row["id"] for row in page["data"]] == [row["id"] for row in rows[5:10]] and page["has_more"]
    last = _ok(admin.get("/v1/admin/audit-log", limit=5, before_id=rows[9]["id"]))
    assert len(last["data"]) == 2 and not last["has_more"]
    assert [row["action"] for row in _audit(admin, target="m")] == [
        "set_listing_status",
        "set_listing_status",
        "update_listing",
        "apply_listing",
        "set_price",
    ]


BAD_CHANGES = [
    (
        "PUT",
        "/v1/admin/prices/fake-chat",
        {"input_micros_per_mtok": -1, "output_micros_per_mtok": 0},
        400,
        "input_micros_per_mtok",
    ),
    (
        "PUT",
        "/v1/admin/prices/fake-chat",
        {"input_micros_per_mtok": 1.5, "output_micros_per_mtok": 0},
        400,
        "input_micros_per_mtok",
    ),
    (
        "PUT",
        "/v1/admin/prices/fake-chat",
        {"input_micros_per_mtok": 1, "output_micros_per_mtok": 1, "x": 1},
        400,
        "x",
    ),
    (
        "POST",
        "/v1/admin/organizations/nobody/top-ups",
        {"amount_micros": 5, "idempotency_key": "k"},
        404,
        "organization",
    ),
    ("PATCH", "/v1/admin/organizations/nobody", {"tier": "default"}, 404, "organization"),
    ("POST", "/v1/admin/users", {"org": "nobody", "email": "a@example.com"}, 404, "organization"),
    ("POST", "/v1/admin/organizations", {"name": "new", "tier": "gold"}, 404, "tier"),
    ("POST", "/v1/admin/organizations", {"name": ""}, 400, "name"),
    ("POST", "/v1/admin/listings", {"model": "m", "platform_fee_bps": 10001}, 400, "platform_fee_bps"),
    ("POST", "/v1/admin/listings", {"model": "m", "provider": "nobody"}, 404, "provider"),
    ("POST", "/v1/admin/listings", {"model": "m", "visibility": "shared"}, 400, "shared_with"),
    ("PATCH", "/v1/admin/listings/fake-chat", {"visibility": "everyone"}, 400, "visibility"),
    ("PATCH", "/v1/admin/listings/nothing", {"description": "x"}, 404, "model"),
    (
        "POST",
        "/v1/admin/keys",
        {"user": "acme-user@example.com", "requests_per_minute": 0},
        400,
        "requests_per_minute",
    ),
    ("PUT", "/v1/admin/tiers/Not A Tier", {"requests_per_minute": 5}, 400, "tier"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "param"), BAD_CHANGES)
def test_a_refused_change_writes_nothing(
    admin: Admin, method: str, path: str, body: Any, status: int, param: str
) -> None:
    _org(admin, "acme")
    _ok(admin.send("POST", "/v1/admin/users", {"org": "acme", "email": "acme-user@example.com"}))
    state = [
        admin.get(f"/v1/admin/{what}").json()
        for what in ("organizations", "users", "keys", "prices", "tiers", "listings", "audit-log")
    ]
    _error(admin.send(method, path, body), status, param)
    assert state == [
        admin.get(f"/v1/admin/{what}").json()
        for what in ("organizations", "users", "keys", "prices", "tiers", "listings", "audit-log")
    ]
