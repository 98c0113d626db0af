"""People's accounts in the browser: sign up with an invite, sign in and out, the one message for a wrong
password, the throttle after repeated failures, a password change, the Chinese switch, and pages a user may
not open."""

from __future__ import annotations

import secrets

import httpx
from playwright.sync_api import expect

from tests.console.conftest import PASSWORD


def test_sign_up_with_an_invite_then_sign_out_and_in(console):
    page = console.page
    code = console.server.invite()
    email = f"new-{secrets.token_hex(4)}@example.com"
    console.open(f"signup?invite={code}")
    expect(page.get_by_label("Invite code")).to_have_value(code)
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_label("Your name").fill("Ada")
    page.get_by_role("button", name="Create account").click()
    # A new organization lands on the model square, signed in, and can see the free model at once.
    expect(page.get_by_role("heading", level=1)).to_have_text("Model square")
    expect(page.locator(".who")).to_have_text(email)
    assert console.axe_violations() == []

    # The invite was single-use: the same code no longer signs anybody up.
    again = httpx.post(
        f"{console.server.url}/v1/auth/signup",
        json={"email": f"x-{email}", "password": PASSWORD, "invite_code": code},
        timeout=30,
    )
    assert again.status_code in (400, 403), again.text

    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator(".who")).to_have_text(email)


def test_sign_up_form_is_accessible_and_needs_an_invite(console):
    console.open("signup")
    expect(console.page.get_by_text("Sign-up needs an invite code")).to_be_visible()
    assert console.axe_violations() == []


def test_wrong_password_and_unknown_email_read_the_same_then_the_throttle_starts(console):
    page = console.page
    console.watch.expect(401, 429)
    email = console.server.sign_up()
    console.open("signin")
    assert console.axe_violations() == []
    messages = []
    for attempt_email in (email, f"nobody-{secrets.token_hex(3)}@example.com"):
        page.get_by_label("Email").fill(attempt_email)
        page.get_by_label("Password").fill("not the password")
        page.get_by_role("button", name="Sign in").click()
        alert = page.get_by_role("alert")
        expect(alert).to_be_visible()
        messages.append(alert.inner_text())
    assert messages[0] == messages[1] == "Incorrect email or password."

    # Two more failures for this email, then even the right password must wait.
    for _ in range(2):
        page.get_by_label("Email").fill(email)
        page.get_by_label("Password").fill("still wrong")
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("button", name="Sign in")).to_be_enabled()
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("Try again in")
    expect(page.locator(".who")).to_have_count(0)


def test_password_change_keeps_this_session_and_ends_the_others(console, browser):
    page = console.page
    email = console.server.sign_up()
    console.sign_in(email)
    other = browser.new_context()
    try:
        other_page = other.new_page()
        login = other_page.request.post(
            f"{console.server.url}/v1/auth/login", data={"email": email, "password": PASSWORD}
        )
        assert login.status == 200
        console.open("account")
        expect(page.get_by_role("heading", level=1)).to_have_text("Account")
        assert console.axe_violations() == []
        page.get_by_label("Current password").fill(PASSWORD)
        page.get_by_label("New password").fill(PASSWORD + "!")
        page.get_by_role("button", name="Change password").click()
        expect(page.get_by_role("status").filter(has_text="Password changed")).to_be_visible()
        assert (
            other_page.request.get(f"{console.server.url}/v1/auth/session").json().get("signed_in") is False
        )
        assert page.request.get(f"{console.server.url}/v1/models").status == 200
    finally:
        other.close()


def test_switch_to_chinese(console):
    page = console.page
    console.sign_in(console.server.sign_up())
    console.open("square")
    page.get_by_label("Language").select_option("zh")
    expect(page.get_by_role("heading", level=1)).to_have_text("模型广场")
    expect(page.get_by_role("navigation", name="Main")).to_contain_text("体验中心")
    expect(page.locator("html")).to_have_attribute("lang", "zh-CN")
    page.reload()
    expect(page.get_by_role("heading", level=1)).to_have_text("模型广场")
    assert console.axe_violations() == []


def test_a_user_opening_an_admin_page_is_told_no(console):
    console.watch.expect(403)
    page = console.page
    console.sign_in(console.server.sign_up())
    console.open("admin/organizations")
    expect(page.get_by_role("alert")).to_contain_text("permission")
    assert page.request.get(f"{console.server.url}/v1/admin/organizations").status == 403
