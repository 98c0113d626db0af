"""The provider page and the operator's pages in the browser: a provider edits its own listing and the catalog
shows it, and sees its earnings as the API reports them; the operator creates an organization and tops it up
exactly once however often the form is sent (and the audit log shows it), creates an invite, watches the
models, edits a price; a user opening an admin page is told no, and the API refuses their session too."""

from __future__ import annotations

import secrets
from typing import Any
from urllib.parse import quote

from playwright.sync_api import expect

from tests.console.conftest import FREE_MODEL, PAID_MODEL, PROVIDER_ORG, XSS_PAYLOAD


def _user_key(console: Any, org: str) -> str:
    """A new user of `org` and an API key of theirs, made by the operator."""
    email = f"member-{secrets.token_hex(4)}@example.com"
    console.server.admin("POST", "/users", {"org": org, "email": email})
    return console.server.admin("POST", "/keys", {"user": email, "name": "browser"})["key"]


def _sign_in_with_key(console: Any, key: str) -> None:
    response = console.page.request.post(f"{console.server.url}/v1/auth/login", data={"api_key": key})
    assert response.status == 200, response.text()


def _buy_from_acme(console: Any) -> None:
    """One paid request to the provider's model by another organization, so the provider earned something."""
    org = f"buyer-{secrets.token_hex(3)}"
    console.server.admin("POST", "/organizations", {"name": org})
    body = {"amount_micros": 5_000_000, "idempotency_key": f"seed-{org}", "note": "browser test"}
    console.server.admin("POST", f"/organizations/{org}/top-ups", body)
    chat = {"model": PAID_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    response = console.server.api("POST", "/v1/chat/completions", _user_key(console, org), json=chat)
    assert response.status_code == 200, response.text


def _money(micros: int) -> str:
    """How format.js `money` shows an amount in en-US: at least 2 decimals, up to 6, thousands separated."""
    whole, _, fraction = f"{micros / 1e6:,.6f}".rstrip("0").partition(".")
    return f"{whole}.{fraction.ljust(2, '0')}"


def test_a_provider_edits_its_listing_and_sees_its_earnings(console):
    page = console.page
    server = console.server
    listing_path = f"/listings/{quote(PAID_MODEL, safe='')}"
    original = server.admin("GET", listing_path)
    _buy_from_acme(console)
    key = _user_key(console, PROVIDER_ORG)
    _sign_in_with_key(console, key)
    console.open("provider")
    expect(page.get_by_role("heading", level=1)).to_have_text("Provider")
    card = page.locator("article").filter(has_text=PAID_MODEL)
    expect(card.get_by_role("heading", level=3)).to_have_text("Acme Tiny Pro")
    # The description is the provider's text, payload included, shown as text and never run.
    expect(card.get_by_label("Description")).to_have_value(original["description"])
    assert page.evaluate("() => window.__xss") is None
    # The earnings are the API's own totals, and there is at least the request made above.
    report = server.api("GET", "/v1/usage", key, params={"role": "provider"}).json()
    assert report["total_earnings_micros"] > 0
    earnings = page.locator("section").filter(has=page.get_by_role("heading", name="Earnings"))
    expect(earnings.locator("dl")).to_contain_text(_money(report["total_earnings_micros"]))
    expect(earnings.get_by_role("row").filter(has_text=PAID_MODEL).first).to_be_visible()
    assert console.axe_violations() == []

    new_description = f"Fast drafts, now sharper. {XSS_PAYLOAD}"
    try:
        card.get_by_label("Description").fill(new_description)
        card.get_by_label("Input price per 1M tokens").fill("0.75")
        card.get_by_role("button", name="Save").click()
        expect(card.get_by_role("status").filter(has_text="Saved")).to_be_visible()
        expect(card.locator("dl")).to_contain_text("input 0.750000")
        shown = server.api("GET", f"/v1/catalog/models/{quote(PAID_MODEL, safe='')}", key).json()
        assert shown["description"] == new_description
        assert shown["pricing"]["input_per_1m"] == "0.750000"
        assert shown["pricing"]["output_per_1m"] == original["pricing"]["output_per_1m"]

        # The API's refusal is shown inline, naming the field, and changes nothing.
        console.watch.expect(400)
        expect(card.get_by_label("Shared with")).to_be_hidden()
        card.get_by_label("Visibility").select_option("shared")
        card.get_by_label("Shared with").fill("org_doesnotexist")
        card.get_by_role("button", name="Save").click()
        expect(card.get_by_role("alert")).to_contain_text("shared_with")
        expect(card.get_by_label("Shared with")).to_have_attribute("aria-invalid", "true")
        assert server.admin("GET", listing_path)["visibility"] == original["visibility"]
        assert page.evaluate("() => window.__xss") is None
    finally:
        pricing = original["pricing"]
        price = {k: pricing[k] for k in ("input_micros_per_mtok", "output_micros_per_mtok")}
        body = {"description": original["description"], "price": price, "visibility": original["visibility"]}
        server.admin("PATCH", listing_path, body)
    restored = server.admin("GET", listing_path)
    assert (restored["description"], restored["pricing"]) == (original["description"], original["pricing"])


def test_a_user_without_listings_is_told_how_to_become_a_provider(console):
    console.sign_in(console.server.sign_up())
    console.open("provider")
    expect(console.page.get_by_text("ask the server's operator to list it")).to_be_visible()
    expect(console.page.get_by_text("No sales in this period.")).to_be_visible()


def test_the_operator_tops_up_an_organization_once_and_the_audit_log_shows_it(console):
    page = console.page
    server = console.server
    console.sign_in_as_admin()
    console.open("admin/organizations")
    name = f"org-{secrets.token_hex(4)}"
    page.get_by_label("Name").fill(name)
    page.get_by_label("Rate-limit tier").select_option("default")
    page.get_by_role("button", name="Create organization").click()
    row = page.get_by_role("row").filter(has_text=name)
    expect(row).to_contain_text("0.00")
    org = next(o for o in server.admin("GET", "/organizations")["data"] if o["name"] == name)

    row.get_by_role("button", name=f"Top up {name}").click()
    key = page.get_by_label("Idempotency key").input_value()
    assert len(key) == 36
    page.get_by_label("Amount").fill("12.50")
    page.get_by_label("Note (optional)").fill("browser test")
    page.get_by_role("button", name="Add to balance").click()
    expect(page.get_by_text(f"Added 12.50 to {name}. Balance now 12.50.")).to_be_visible()
    expect(row).to_contain_text("12.50")
    assert console.axe_violations() == []

    # The same form again (a double click, a retry): the key already paid, so nothing is added.
    page.get_by_role("button", name="Add to balance").click()
    expect(page.get_by_text("already recorded with this key")).to_be_visible()
    expect(row).to_contain_text("12.50")
    orgs = {o["name"]: o for o in server.admin("GET", "/organizations")["data"]}
    assert orgs[name]["balance_micros"] == 12_500_000
    # A new form is a new payment, with a new key.
    row.get_by_role("button", name=f"Top up {name}").click()
    assert page.get_by_label("Idempotency key").input_value() != key

    console.open("admin/audit")
    entry = page.get_by_role("row").filter(has_text=org["id"]).filter(has_text="top_up")
    expect(entry).to_have_count(1)
    expect(entry).to_contain_text('{"balance_micros":12500000')
    assert console.axe_violations() == []


def test_the_operator_creates_an_invite_and_sees_its_code(console):
    page = console.page
    console.sign_in_as_admin()
    console.open("admin/invites")
    note = f"for {secrets.token_hex(4)}"
    page.get_by_label("Note (optional)").fill(note)
    page.get_by_label("Maximum sign-ups").fill("3")
    page.get_by_label("Expires in days (optional)").fill("7")
    page.get_by_role("button", name="Create invite").click()
    expect(page.get_by_role("heading", name="Invite created")).to_be_visible()
    invite = next(i for i in console.server.admin("GET", "/invites")["data"] if i["note"] == note)
    assert invite["max_uses"] == 3 and invite["expires_at"] is not None
    expect(page.locator(".invite-code")).to_have_text(invite["code"])
    link = f"{console.server.url}/#/signup?invite={invite['code']}"
    expect(page.get_by_label("Sign-up link")).to_have_value(link)
    row = page.get_by_role("row").filter(has_text=note)
    expect(row).to_contain_text("0 / 3")
    expect(row).to_contain_text("Active")
    assert console.axe_violations() == []

    row.get_by_role("button", name=f"Revoke invite {invite['code']}").click()
    row.get_by_role("button", name="Yes, revoke").click()
    expect(page.get_by_role("row").filter(has_text=note)).to_contain_text("Revoked")
    revoked = next(i for i in console.server.admin("GET", "/invites")["data"] if i["id"] == invite["id"])
    assert revoked["revoked_at"] is not None


def test_the_operator_sees_the_models_and_edits_a_price(console):
    page = console.page
    server = console.server
    console.sign_in_as_admin()
    console.open("admin/models")
    row = page.get_by_role("row").filter(has=page.get_by_text(FREE_MODEL, exact=True))
    expect(row).to_contain_text("Loaded")
    expect(page.get_by_text("Memory in use:")).to_be_visible()
    row.get_by_role("button", name=f"Load {FREE_MODEL}", exact=True).click()
    expect(page.get_by_text(f"{FREE_MODEL}: Load done; state Loaded.")).to_be_visible()
    assert console.axe_violations() == []

    # A model only this test prices: set it, then edit it in its row.
    model = f"priced-{secrets.token_hex(3)}"
    console.open("admin/prices")
    form = page.locator("form").filter(has=page.get_by_role("button", name="Set price"))
    form.get_by_label("Model").fill(model)
    form.get_by_label("Input per 1M").fill("0.2")
    form.get_by_label("Output per 1M").fill("0.4")
    form.get_by_role("button", name="Set price").click()
    row = page.get_by_role("row").filter(has_text=model)
    expect(row).to_contain_text("0.200000")
    row.get_by_role("button", name=f"Edit the price of {model}").click()
    row.get_by_label(f"Input price per 1M tokens of {model}").fill("1.25")
    row.get_by_role("button", name=f"Save the price of {model}").click()
    expect(row).to_contain_text("1.250000")
    saved = next(p["pricing"] for p in server.admin("GET", "/prices")["data"] if p["model"] == model)
    assert (saved["input_micros_per_mtok"], saved["output_micros_per_mtok"]) == (1_250_000, 400_000)
    assert console.axe_violations() == []


def test_a_user_may_not_open_the_admin_pages(console):
    page = console.page
    console.sign_in(console.server.sign_up())
    console.open("admin/organizations")
    expect(page.get_by_text("You don't have permission")).to_be_visible()
    assert console.axe_violations() == []
    console.watch.expect(403)
    response = page.request.get(f"{console.server.url}/v1/admin/organizations")
    assert response.status == 403


DRAFT_MODEL = "acme/tiny-draft"
"""acme's draft in conftest's models.yaml: this test alone publishes it, then retires it."""


def test_a_provider_publishes_its_draft_renames_it_and_retires_it(console):
    page = console.page
    server = console.server
    listing_path = f"/listings/{quote(DRAFT_MODEL, safe='')}"
    assert server.admin("GET", listing_path)["status"] == "draft"
    key = _user_key(console, PROVIDER_ORG)
    buyer = server.sign_up()

    def square_card():
        return page.locator(f'article.model-card[data-model="{DRAFT_MODEL}"]')

    try:
        _sign_in_with_key(console, key)
        console.open("provider")
        card = page.locator(f'article.provider-listing[data-model="{DRAFT_MODEL}"]')
        expect(card.locator("dl")).to_contain_text("Draft (only your organization can call it)")
        expect(card.get_by_role("button", name="Retire")).to_have_count(0)
        assert console.axe_violations() == []

        card.get_by_label("Display name").fill("Acme Tiny Draft v2")
        card.get_by_label("Tags").fill("chat, fresh")
        card.get_by_role("button", name="Save").click()
        expect(card.get_by_role("status").filter(has_text="Saved")).to_be_visible()
        expect(card.get_by_role("heading", level=3)).to_have_text("Acme Tiny Draft v2")
        card.get_by_role("button", name="Publish Acme Tiny Draft v2").click()
        expect(card.get_by_role("status").filter(has_text="Published.")).to_be_visible()
        expect(card.locator("dl")).to_contain_text("Published")
        assert server.admin("GET", listing_path)["status"] == "published"

        # Another organization now finds it in the model square, under its new name and tags.
        console.sign_in(buyer)
        console.open("square")
        expect(square_card().get_by_role("heading", level=2)).to_have_text("Acme Tiny Draft v2")
        expect(square_card().locator(".tag-list li")).to_have_text(["chat", "fresh"])

        _sign_in_with_key(console, key)
        console.open("provider")
        card.get_by_role("button", name="Retire Acme Tiny Draft v2").click()
        expect(card.get_by_text("only the server's operator can bring it back")).to_be_visible()
        card.get_by_role("button", name="Cancel").click()  # asking first: nothing happened yet
        assert server.admin("GET", listing_path)["status"] == "published"
        card.get_by_role("button", name="Retire Acme Tiny Draft v2").click()
        card.get_by_role("button", name="Yes, retire").click()
        expect(card.get_by_role("status").filter(has_text="Retired.")).to_be_visible()
        expect(card.locator("dl")).to_contain_text("Retired")
        note = card.get_by_role("status").filter(has_text="This model is retired")
        expect(note).to_contain_text("Only the server's operator can bring it back.")
        expect(card.locator("input, textarea, select, button")).to_have_count(0)  # read-only now
        assert server.admin("GET", listing_path)["status"] == "retired"
        assert console.axe_violations() == []
        chat = {"model": DRAFT_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
        assert server.api("POST", "/v1/chat/completions", key, json=chat).status_code == 410

        console.sign_in(buyer)
        console.open("square")
        expect(page.locator("article.model-card").first).to_be_visible()
        expect(square_card()).to_have_count(0)
    finally:
        if server.admin("GET", listing_path)["status"] == "published":
            server.admin("POST", f"{listing_path}/retire")  # never leave it in the other tests' square
