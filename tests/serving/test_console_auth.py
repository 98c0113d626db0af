"""The web console's sign-in over real HTTP (the ASGI app, a real platform on SQLite and PostgreSQL, the
FakeEngine as the free model "fake-chat"): sign-up and sign-in set an HttpOnly session cookie, and that cookie
calls the same /v1 API a script calls, with a CSRF token for anything that changes something. Each `Browser`
sends its own cookie by hand, so one test can hold several browsers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from tests.platform.conftest import BACKENDS, EmptyDatabase
from tests.platform.helpers import FakeDateTime, make_account, unique
from tests.serving.conftest import wait_ready
from tests.serving.fake_engine import FakeEngine
from tokenmill.cli import build_parser
from tokenmill.config import ConfigError
from tokenmill.platform.db import open_database
from tokenmill.platform.gateway import Gateway, PlatformSettings
from tokenmill.platform.migrate import upgrade
from tokenmill.platform.ratelimit_memory import InMemoryRateLimiter
from tokenmill.platform.tables import ApiKey
from tokenmill.serving.app import create_app
from tokenmill.serving.settings import ServerSettings

PASSWORD = "correct horse battery"
CHAT = {"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
WEEK_S = 7 * 24 * 3600


@pytest.fixture
def clock() -> FakeDateTime:
    return FakeDateTime(datetime.now(UTC).replace(microsecond=0))


@pytest.fixture(params=BACKENDS)
def gateway(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeDateTime) -> Iterator[Gateway]:
    """A started platform whose clock the test moves (throttling and expiry without sleeping)."""
    empty = EmptyDatabase(request.param, tmp_path)
    settings = PlatformSettings(data_dir=tmp_path / "data", database_url=empty.url, gateway_id="console")
    db = open_database(empty.url, clock=clock)
    upgrade(db)
    opened = Gateway(settings, db, InMemoryRateLimiter(owner="console"))
    opened.start()
    opened.register_models(["fake-chat"])
    yield opened
    opened.close()
    empty.drop()


@contextmanager
def serving(fake_engine: FakeEngine, gateway: Gateway, signup: str) -> Iterator[TestClient]:
    settings = ServerSettings(max_body_bytes=64 * 1024, signup=signup)
    app = create_app({"fake-chat": fake_engine}, {}, settings, gateway)
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client)
        yield client


@pytest.fixture
def console(fake_engine: FakeEngine, gateway: Gateway) -> Iterator[TestClient]:
    with serving(fake_engine, gateway, "open") as client:
        yield client


class Browser:
    """One browser: its session cookie and the CSRF token its console read from the session answer."""

    def __init__(self, client: TestClient, cookie: str | None = None, csrf: str | None = None) -> None:
        self.client, self.cookie, self.csrf = client, cookie, csrf

    def request(self, method: str, path: str, *, csrf: bool = True, **kwargs: Any) -> Any:
        headers = dict(kwargs.pop("headers", {}))
        if self.cookie:
            headers["cookie"] = f"tm_session={self.cookie}"
        if csrf and self.csrf:
            headers["x-csrf-token"] = self.csrf
        self.client.cookies.clear()  # only this browser's cookie goes out
        response = self.client.request(method, path, headers=headers, **kwargs)
        self.client.cookies.clear()
        return response

    def sign(self, path: str, body: dict[str, Any], status: int = 200) -> dict[str, Any]:
        """POST a sign-up or sign-in; keep the cookie it sets and the CSRF token it answers with."""
        response = self.request("POST", path, json=body)
        assert response.status_code == status, response.text
        self.cookie, self.csrf = response.cookies["tm_session"], response.json()["csrf_token"]
        return response.json()


def _email() -> str:
    return f"{unique('person')}@example.com"


def _signed_up(client: TestClient, **body: Any) -> tuple[Browser, dict[str, Any]]:
    browser = Browser(client)
    session = browser.sign("/v1/auth/signup", {"email": _email(), "password": PASSWORD, **body}, 201)
    return browser, session


SIGNED_OUT = {"object": "session", "signed_in": False}
"""GET /v1/auth/session for a browser whose cookie signs no one in: an answer, not an error."""


def _error(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_the_config_says_how_to_sign_up(
    fake_engine: FakeEngine, gateway: Gateway, client: TestClient
) -> None:
    for mode in ("open", "invite", "closed"):
        with serving(fake_engine, gateway, mode) as served:
            config = served.get("/v1/auth/config").json()
            assert config == {"object": "auth.config", "signup": mode, "auth_enabled": True}
    local = client.get("/v1/auth/config").json()  # --no-auth: nothing to sign in to
    assert local == {"object": "auth.config", "signup": "closed", "auth_enabled": False}


def test_a_new_person_signs_up_and_calls_a_free_model_at_once(
    console: TestClient, clock: FakeDateTime
) -> None:
    email = _email()
    response = console.post("/v1/auth/signup", json={"email": email, "password": PASSWORD, "name": "Ada"})
    assert response.status_code == 201, response.text
    cookie = response.headers["set-cookie"]
    attributes = {part.strip().split("=")[0].lower(): part for part in cookie.split(";")[1:]}
    assert cookie.startswith("tm_session=sk-") and "httponly" in attributes and "secure" not in attributes
    assert attributes["samesite"].strip().lower() == "samesite=lax" and attributes["path"].strip() == "Path=/"
    assert attributes["max-age"].strip() == f"Max-Age={WEEK_S}"
    session = response.json()
    assert session["object"] == "session" and session["kind"] == "password" and not session["is_admin"]
    assert session["user"]["email"] == email and session["user"]["name"] == "Ada"
    assert session["organization"]["tier"] == "free"
    assert session["expires_at"] == int(clock().timestamp()) + WEEK_S

    browser = Browser(console, response.cookies["tm_session"], session["csrf_token"])
    assert browser.request("GET", "/v1/auth/session").json() == session
    assert [m["id"] for m in browser.request("GET", "/v1/models").json()["data"]] == ["fake-chat"]
    info = browser.request("GET", "/v1/user/info").json()["data"]
    assert info["email"] == email and info["balance_micros"] == 0
    chat = browser.request("POST", "/v1/chat/completions", json=CHAT)  # free: no balance needed
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"]
    clock.advance(days=7)  # a week on, the session has expired: the console shows its sign-in page
    assert browser.request("GET", "/v1/auth/session").json() == SIGNED_OUT


def test_sign_up_by_invitation_takes_one_use_of_the_code(fake_engine: FakeEngine, gateway: Gateway) -> None:
    admin_key = (gateway.settings.data_dir / "admin_key").read_text().strip()
    with serving(fake_engine, gateway, "invite") as client:
        invite = client.post(
            "/v1/admin/invites", headers={"Authorization": f"Bearer {admin_key}"}, json={"note": "Ada"}
        )
        assert invite.status_code == 201 and invite.json()["max_uses"] == 1
        code = invite.json()["code"]
        assert len(code) == 16
        body = {"email": _email(), "password": PASSWORD}
        assert _error(client.post("/v1/auth/signup", json=body), 403)["code"] == "invite_invalid"
        _signed_up(client, invite_code=code)
        used_up = client.post("/v1/auth/signup", json={**body, "invite_code": code})
        assert _error(used_up, 403)["code"] == "invite_invalid"
        listed = client.get("/v1/admin/invites", headers={"Authorization": f"Bearer {admin_key}"}).json()
        assert [(i["code"], i["uses"]) for i in listed["data"]] == [(code, 1)]
    with serving(fake_engine, gateway, "closed") as client:
        closed = client.post("/v1/auth/signup", json={**body, "invite_code": code})
        assert _error(closed, 403)["code"] == "signup_closed"


def test_taken_emails_and_organizations_are_409s(console: TestClient) -> None:
    _, session = _signed_up(console, organization=unique("org"))
    again = console.post("/v1/auth/signup", json={"email": session["user"]["email"], "password": PASSWORD})
    assert _error(again, 409)["code"] == "email_taken"
    org = {"email": _email(), "password": PASSWORD, "organization": session["organization"]["name"]}
    assert _error(console.post("/v1/auth/signup", json=org), 409)["code"] == "organization_taken"
    short = console.post("/v1/auth/signup", json={"email": _email(), "password": "short"})
    assert _error(short, 400)["param"] == "password"


def test_wrong_passwords_are_refused_alike_then_throttled(console: TestClient, clock: FakeDateTime) -> None:
    _, session = _signed_up(console)
    email = session["user"]["email"]
    wrong = console.post("/v1/auth/login", json={"email": email, "password": "wrong password"})
    unknown = console.post("/v1/auth/login", json={"email": _email(), "password": PASSWORD})
    assert wrong.status_code == unknown.status_code == 401 and wrong.json() == unknown.json()
    assert wrong.json()["error"] == {
        "message": "Incorrect email or password.",
        "type": "authentication_error",
        "param": None,
        "code": "invalid_credentials",
    }
    for _ in range(2):
        console.post("/v1/auth/login", json={"email": email, "password": "wrong password"})
    throttled = console.post("/v1/auth/login", json={"email": email, "password": PASSWORD})
    assert _error(throttled, 429)["code"] == "too_many_login_attempts"
    assert throttled.headers["retry-after"] == "1" and "set-cookie" not in throttled.headers
    clock.advance(seconds=1)
    Browser(console).sign("/v1/auth/login", {"email": email, "password": PASSWORD})
    again = console.post("/v1/auth/login", json={"email": email, "password": "wrong password"})
    assert _error(again, 401)["code"] == "invalid_credentials"  # the success cleared the count


def test_a_cookie_needs_the_csrf_token_to_change_anything(console: TestClient, gateway: Gateway) -> None:
    browser, session = _signed_up(console)
    bare = browser.request("POST", "/v1/keys", json={"name": "laptop"}, csrf=False)
    assert _error(bare, 403)["code"] == "csrf_failed"
    guessed = {"x-csrf-token": "0" * 32}
    forged = browser.request("POST", "/v1/keys", json={"name": "laptop"}, csrf=False, headers=guessed)
    assert _error(forged, 403)["code"] == "csrf_failed"
    created = browser.request("POST", "/v1/keys", json={"name": "laptop"})
    assert created.status_code == 200, created.text
    bearer = {"Authorization": f"Bearer {created.json()['key']}"}
    assert (
        Browser(console).request("POST", "/v1/keys", json={"name": "ci"}, headers=bearer).status_code == 200
    )

    listed = browser.request("GET", "/v1/keys").json()["data"]
    assert sorted(k["name"] for k in listed) == ["ci", "laptop"]  # the sign-in's session is no listed key
    with gateway.db.read() as db_session:
        session_key_id = db_session.scalar(
            select(ApiKey.id).where(ApiKey.user_id == session["user"]["id"], ApiKey.kind == "session")
        )
    assert _error(browser.request("DELETE", f"/v1/keys/{session_key_id}"), 404)["code"] == "not_found"
    assert browser.request("GET", "/v1/auth/session").status_code == 200


def test_signing_out_revokes_the_session(console: TestClient) -> None:
    browser, _ = _signed_up(console)
    assert _error(browser.request("POST", "/v1/auth/logout", csrf=False), 403)["code"] == "csrf_failed"
    out = browser.request("POST", "/v1/auth/logout")
    assert out.status_code == 200 and out.json() == {"object": "session.deleted", "deleted": True}
    assert "max-age=0" in out.headers["set-cookie"].lower()
    assert browser.request("GET", "/v1/auth/session").json() == SIGNED_OUT
    assert browser.request("GET", "/v1/models").status_code == 401
    again = browser.request("POST", "/v1/auth/logout")  # a dead cookie: still cleared, still 200
    assert again.status_code == 200 and "max-age=0" in again.headers["set-cookie"].lower()
    assert Browser(console).request("POST", "/v1/auth/logout").status_code == 200


def test_a_new_password_signs_out_every_other_browser(console: TestClient) -> None:
    laptop, session = _signed_up(console)
    email = session["user"]["email"]
    phone = Browser(console)
    phone.sign("/v1/auth/login", {"email": email, "password": PASSWORD})
    change = {"current_password": "wrong password", "new_password": "a new password"}
    assert (
        _error(phone.request("POST", "/v1/auth/password", json=change), 401)["code"] == "invalid_credentials"
    )
    assert (
        _error(phone.request("POST", "/v1/auth/password", json=change, csrf=False), 403)["code"]
        == "csrf_failed"
    )
    changed = phone.request("POST", "/v1/auth/password", json={**change, "current_password": PASSWORD})
    assert changed.status_code == 200 and changed.json()["csrf_token"] == phone.csrf
    assert laptop.request("GET", "/v1/auth/session").json() == SIGNED_OUT
    assert phone.request("GET", "/v1/auth/session").status_code == 200
    old = console.post("/v1/auth/login", json={"email": email, "password": PASSWORD})
    assert _error(old, 401)["code"] == "invalid_credentials"
    Browser(console).sign("/v1/auth/login", {"email": email, "password": "a new password"})


def test_signing_in_with_a_key_puts_that_key_in_the_cookie(console: TestClient, gateway: Gateway) -> None:
    account = make_account(gateway.db)
    browser = Browser(console)
    session = browser.sign("/v1/auth/login", {"api_key": account.key.key})
    assert session["kind"] == "api_key" and session["user"]["id"] == account.user.id
    response = console.post("/v1/auth/login", json={"api_key": account.key.key})
    assert "max-age" not in response.headers["set-cookie"].lower()  # gone when the browser closes
    assert browser.request("GET", "/v1/user/info").status_code == 200
    assert browser.request("POST", "/v1/auth/logout").status_code == 200
    bearer = {"Authorization": f"Bearer {account.key.key}"}
    assert Browser(console).request("GET", "/v1/models", headers=bearer).status_code == 200  # not revoked
    bad = console.post("/v1/auth/login", json={"api_key": "sk-" + "A" * 43})
    assert _error(bad, 401)["code"] == "invalid_api_key"


def test_the_admin_key_signs_in_to_the_operator_api_and_a_user_does_not(
    console: TestClient, gateway: Gateway
) -> None:
    admin_key = (gateway.settings.data_dir / "admin_key").read_text().strip()
    admin = Browser(console)
    session = admin.sign("/v1/auth/login", {"api_key": admin_key})
    assert (session["kind"], session["is_admin"], session["user"], session["organization"]) == (
        "admin_key",
        True,
        None,
        None,
    )
    assert admin.request("GET", "/v1/admin/invites").status_code == 200
    denied = admin.request("POST", "/v1/admin/invites", json={"max_uses": 3}, csrf=False)
    assert _error(denied, 403)["code"] == "csrf_failed"
    created = admin.request("POST", "/v1/admin/invites", json={"max_uses": 3, "expires_in_days": 7})
    assert created.status_code == 201 and created.json()["uses"] == 0
    revoked = admin.request("POST", f"/v1/admin/invites/{created.json()['id']}/revoke")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    user, _ = _signed_up(console)
    assert _error(user.request("GET", "/v1/admin/invites"), 403)["code"] == "permission_denied"


def test_the_key_list_says_when_each_key_was_last_used(console: TestClient, clock: FakeDateTime) -> None:
    browser, _ = _signed_up(console)
    created = browser.request("POST", "/v1/keys", json={"name": "script"}).json()
    assert [k["last_used_at"] for k in browser.request("GET", "/v1/keys").json()["data"]] == [None]
    clock.advance(seconds=30)
    script = Browser(console)
    bearer = {"Authorization": f"Bearer {created['key']}"}
    assert script.request("POST", "/v1/chat/completions", json=CHAT, headers=bearer).status_code == 200
    (listed,) = browser.request("GET", "/v1/keys").json()["data"]
    assert listed["id"] == created["id"] and listed["last_used_at"] == int(clock().timestamp())


def test_serve_takes_the_signup_mode_and_refuses_others() -> None:
    assert build_parser().parse_args(["serve"]).signup == "invite"
    assert build_parser().parse_args(["serve", "--signup", "open"]).signup == "open"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--signup", "everyone"])
    with pytest.raises(ConfigError, match="signup"):
        ServerSettings(signup="everyone")


def test_asking_who_is_signed_in_without_a_session_is_an_answer_but_a_bad_key_is_a_401(
    console: TestClient,
) -> None:
    assert Browser(console).request("GET", "/v1/auth/session").json() == SIGNED_OUT
    bad = {"Authorization": "Bearer sk-" + "x" * 40}
    assert _error(Browser(console).request("GET", "/v1/auth/session", headers=bad), 401)["code"] == (
        "invalid_api_key"
    )
