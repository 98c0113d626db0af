"""API keys and usage & billing in the browser: a key created in the page is shown once and works, revoking it
(through the confirm step) makes it a 401; a request shows up in the day's chart data, the recent requests and
the CSV export; an operator's top-up shows up in the ledger and the balance; both pages pass axe and fit a
phone's width."""

from __future__ import annotations

import csv
import re
import secrets
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect

from tests.console.conftest import FREE_MODEL

PHONE = {"width": 390, "height": 844}


def _units(micros: int) -> str:
    """How format.js `money` shows an amount in en-US: at least 2 decimals, up to 6, thousands separated."""
    text = f"{micros / 1e6:,.6f}".rstrip("0")
    whole, _, fraction = text.partition(".")
    return f"{whole}.{fraction.ljust(2, '0')}"


def _session(console: Any) -> dict[str, Any]:
    return console.page.request.get(f"{console.server.url}/v1/auth/session").json()


def _api_key(console: Any, name: str = "script") -> str:
    """A key of the signed-in user, made through the public API with the browser's session (and its CSRF
    token, as the console sends it)."""
    response = console.page.request.post(
        f"{console.server.url}/v1/keys",
        data={"name": name},
        headers={"X-CSRF-Token": _session(console)["csrf_token"]},
    )
    assert response.status == 200, response.text()
    return response.json()["key"]


def _chat(console: Any, key: str, max_tokens: int = 4) -> dict[str, int]:
    body = {"model": FREE_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": max_tokens}
    response = console.server.api("POST", "/v1/chat/completions", key, json=body)
    assert response.status_code == 200, response.text
    return response.json()["usage"]


def _models_status(console: Any, key: str) -> int:
    return httpx.get(
        f"{console.server.url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30
    ).status_code


def test_a_key_is_shown_once_works_and_stops_working_once_revoked(console):
    page = console.page
    console.sign_in(console.server.sign_up())
    console.open("keys")
    expect(page.get_by_role("heading", level=1)).to_have_text("API keys")
    name = f"laptop-{secrets.token_hex(2)}"
    page.get_by_label("Name").fill(name)
    page.get_by_label(FREE_MODEL, exact=True).check()
    page.get_by_label("Spend limit (optional)").fill("5")
    page.get_by_label("Expires").select_option(label="In 30 days")
    page.get_by_role("button", name="Create key").click()

    secret_box = page.locator(".secret-box")
    expect(secret_box).to_contain_text("only time it is shown")
    secret = page.get_by_label("Secret key").input_value()
    assert secret.startswith("sk-") and len(secret) > 20
    assert _models_status(console, secret) == 200
    assert console.axe_violations() == []

    row = page.get_by_role("row").filter(has_text=name)
    expect(row).to_contain_text("Active")
    expect(row).to_contain_text(FREE_MODEL)
    expect(row).to_contain_text("Spend limit 5.00")
    expect(row).to_contain_text(secret[:9])  # the prefix, never the rest
    listed = [
        k for k in page.request.get(f"{console.server.url}/v1/keys").json()["data"] if k["name"] == name
    ]
    assert listed[0]["allowed_models"] == [FREE_MODEL] and listed[0]["spend_limit_micros"] == 5_000_000

    # Shown once: dismissed, it is nowhere in the page, and a fresh visit never shows it again.
    page.get_by_role("button", name="I have stored the key").click()
    expect(secret_box).to_have_count(0)
    assert secret not in page.content()
    page.reload()
    expect(page.get_by_role("row").filter(has_text=name)).to_contain_text("Active")
    assert secret not in page.content()

    # The first click only asks; the key works until the second.
    row = page.get_by_role("row").filter(has_text=name)
    row.get_by_role("button", name=f"Revoke key {name}").click()
    confirm = row.get_by_role("button", name="Yes, revoke")
    expect(confirm).to_be_focused()
    assert _models_status(console, secret) == 200
    row.get_by_role("button", name="Cancel").click()
    expect(confirm).to_have_count(0)
    row.get_by_role("button", name=f"Revoke key {name}").click()
    row.get_by_role("button", name="Yes, revoke").click()
    expect(page.get_by_role("row").filter(has_text=name)).to_contain_text("Revoked")
    assert _models_status(console, secret) == 401


def test_a_request_shows_in_the_chart_the_requests_the_csv_and_a_top_up_in_the_ledger(console):
    page = console.page
    console.sign_in(console.server.sign_up())
    usage = _chat(console, _api_key(console))
    today = datetime.now(UTC).date().isoformat()
    console.open("usage")
    expect(page.get_by_role("heading", level=1)).to_have_text("Usage & billing")

    canvas = page.locator("canvas.usage-chart")
    expect(canvas).to_have_attribute("role", "img")
    expect(canvas).to_have_attribute("aria-label", re.compile(rf"{usage['total_tokens']} tokens in total"))
    data = page.evaluate("() => Chart.getChart(document.querySelector('canvas.usage-chart')).data")
    day = data["labels"].index(today)
    assert [d["label"] for d in data["datasets"]] == [FREE_MODEL]
    assert sum(d["data"][day] for d in data["datasets"]) == usage["total_tokens"]
    assert sum(sum(d["data"]) for d in data["datasets"]) == usage["total_tokens"]  # no other day has any
    by_day = page.locator("table", has=page.locator("caption", has_text="Usage by day and model"))
    expect(by_day.get_by_role("row").filter(has_text=today)).to_contain_text(str(usage["total_tokens"]))

    page.get_by_role("tab", name="Spend").click()
    expect(page.get_by_role("tab", name="Spend")).to_have_attribute("aria-selected", "true")
    expect(canvas).to_have_attribute("aria-label", re.compile(r"spend per day .* 0\.00 in total"))
    spend = page.evaluate("() => Chart.getChart(document.querySelector('canvas.usage-chart')).data")
    assert sum(sum(d["data"]) for d in spend["datasets"]) == 0  # the free model costs nothing

    recent = page.locator("table", has=page.locator("caption", has_text="Requests in this period"))
    (row,) = recent.locator("tbody tr").all()
    expect(row).to_contain_text(FREE_MODEL)
    expect(row).to_contain_text(
        f"{usage['total_tokens']} ({usage['prompt_tokens']} + {usage['completion_tokens']})"
    )
    expect(row).to_contain_text("OK")

    with page.expect_download() as download:
        page.get_by_role("button", name="Export CSV").click()
    with open(download.value.path(), newline="") as file:
        rows = list(csv.DictReader(file))
    assert sum(int(r["total_tokens"]) for r in rows) == usage["total_tokens"]
    assert [(r["date"], r["model"], r["num_requests"]) for r in rows] == [(today, FREE_MODEL, "1")]
    assert console.axe_violations() == []

    org = _session(console)["organization"]["id"]
    note = f"Welcome credit {secrets.token_hex(2)}"
    body = {"amount_micros": 12_340_000, "idempotency_key": secrets.token_hex(8), "note": note}
    top_up = console.server.admin("POST", f"/organizations/{org}/top-ups", body)
    page.reload()
    ledger = page.locator("table", has=page.locator("caption", has_text="Top-ups, charges and credits"))
    entry = ledger.get_by_role("row").filter(has_text=note)
    expect(entry).to_contain_text("Top-up")
    expect(entry).to_contain_text("12.34")
    balance = page.locator(".facts").first
    expect(balance).to_contain_text(f"Balance{_units(top_up['balance_micros'])}")
    expect(balance).to_contain_text(f"Available balance{_units(top_up['balance_micros'])}")
    assert console.axe_violations() == []


def test_the_ledger_loads_more_without_gaps(console):
    page = console.page
    console.sign_in(console.server.sign_up())
    org = _session(console)["organization"]["id"]
    for n in range(1, 53):  # one more than a page (50) and then some
        body = {"amount_micros": n * 1000, "idempotency_key": secrets.token_hex(8), "note": f"credit #{n}"}
        console.server.admin("POST", f"/organizations/{org}/top-ups", body)
    console.open("usage")
    ledger = page.locator("table", has=page.locator("caption", has_text="Top-ups, charges and credits"))
    expect(ledger.locator("tbody tr")).to_have_count(50)
    expect(ledger.locator("tbody tr").first).to_contain_text("credit #52")
    page.get_by_role("button", name="Load more").click()
    expect(ledger.locator("tbody tr")).to_have_count(52)
    notes = [text.split("credit #")[1] for text in ledger.locator("tbody tr").all_inner_texts()]
    assert notes == [str(n) for n in range(52, 0, -1)]
    expect(page.get_by_role("button", name="Load more")).to_have_count(0)


@pytest.mark.parametrize("console", [PHONE], indirect=True)
def test_both_pages_fit_a_phone(console):
    page = console.page
    console.sign_in(console.server.sign_up())
    _chat(console, _api_key(console, name="a rather long key name for a narrow screen"))
    for route, heading in (("keys", "API keys"), ("usage", "Usage & billing")):
        console.open(route)
        expect(page.get_by_role("heading", level=1)).to_have_text(heading)
        expect(page.locator("tbody tr").first).to_be_visible()
        overflow = page.evaluate(
            "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0, f"{route} scrolls sideways by {overflow}px"
        assert console.axe_violations() == []
