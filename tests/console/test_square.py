"""The model square and compare in a browser, as a newly signed-up user: the free and the paid model on
cards with their prices, filters that narrow the cards and survive a reload, two models side by side with
the cost of a typed request shape (billing's own arithmetic), a provider's description shown as text and
never run, no serious accessibility findings, and no sideways scrolling on a phone."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from tests.console.conftest import ARTIFACTS, FREE_MODEL, PAID_MODEL, XSS_PAYLOAD

PAID_INPUT_MICROS_PER_MTOK = 500_000  # 0.5 per 1M prompt tokens
PAID_OUTPUT_MICROS_PER_MTOK = 1_500_000  # 1.5 per 1M completion tokens
PHONE = {"width": 390, "height": 844}


def cost_micros(prompt_tokens: int, completion_tokens: int, input_price: int, output_price: int) -> int:
    """The documented billing rule: ceil((prompt * input + completion * output) / 1e6) micros."""
    return -(-(prompt_tokens * input_price + completion_tokens * output_price) // 1_000_000)


def shown(micros: int) -> str:
    """How the console writes an amount in English: 2 decimals, up to 6 (6 below one cent), thousands
    separated."""
    units = micros / 1_000_000
    digits = 2 if units >= 0.01 or units == 0 else 6
    text = f"{units:,.6f}"
    whole, fraction = text.split(".")
    fraction = fraction.rstrip("0").ljust(digits, "0")
    return f"{whole}.{fraction}"


def card(page, model: str):
    return page.locator(f'article.model-card[data-model="{model}"]')


def fact(scope, label: str):
    return scope.locator("dt", has_text=label).locator("xpath=following-sibling::dd[1]")


def signed_in(console, route: str = "square") -> None:
    console.sign_in(console.server.sign_up())
    console.open(route)


def test_square_shows_the_free_and_the_paid_model_with_prices_and_live_figures(console):
    page = console.page
    signed_in(console)
    free, paid = card(page, FREE_MODEL), card(page, PAID_MODEL)
    expect(free.locator(".badge-free")).to_have_text("Free")
    expect(free.get_by_role("heading", level=2)).to_have_text("Tiny Chat")
    expect(paid.get_by_role("heading", level=2)).to_have_text("Acme Tiny Pro")
    expect(paid.locator(".badge-free")).to_have_count(0)
    expect(fact(paid, "Input price per 1M tokens")).to_have_text(shown(PAID_INPUT_MICROS_PER_MTOK))
    expect(fact(paid, "Output price per 1M tokens")).to_have_text(shown(PAID_OUTPUT_MICROS_PER_MTOK))
    expect(fact(paid, "Provider")).to_have_text("acme")
    expect(fact(paid, "Task")).to_have_text("Chat")
    expect(paid.locator(".tag-list li")).to_have_text(["chat", "pro"])
    expect(paid.get_by_role("link", name="Try in playground")).to_have_attribute(
        "href", "#/playground?model=acme%2Ftiny-pro"
    )

    # The live figures and the state say what the API says, in words.
    listing = page.request.get(f"{console.server.url}/v1/catalog/models/{PAID_MODEL}").json()
    live = fact(paid, "Live")
    if listing["live"]["has_traffic"]:
        expect(live).to_contain_text("tokens/s")
    else:
        expect(live).to_have_text("No traffic yet")
    expect(paid.locator(".model-card-badges")).to_contain_text(listing["state"].capitalize())

    assert console.axe_violations() == []
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "readme-square.png"), full_page=True)


def test_a_providers_html_description_is_shown_as_text_and_never_runs(console):
    page = console.page
    signed_in(console)
    paid = card(page, PAID_MODEL)
    expect(paid.locator(".model-description")).to_have_text(f"Fast drafts. {XSS_PAYLOAD}")
    expect(paid.locator("script, img")).to_have_count(0)
    assert page.evaluate("() => typeof window.__xss") == "undefined"

    console.open(f"compare?models={FREE_MODEL},{PAID_MODEL}")
    cell = page.locator("td .model-description", has_text="Fast drafts.")
    expect(cell).to_have_text(f"Fast drafts. {XSS_PAYLOAD}")
    expect(page.locator("main table script, main table img")).to_have_count(0)
    assert page.evaluate("() => typeof window.__xss") == "undefined"


def test_filters_narrow_the_cards_and_survive_a_reload(console):
    page = console.page
    signed_in(console)
    cards = page.locator("article.model-card")
    expect(card(page, PAID_MODEL)).to_be_visible()

    page.get_by_label("Free models only").check()
    expect(card(page, PAID_MODEL)).to_have_count(0)
    expect(card(page, FREE_MODEL)).to_be_visible()
    expect(page).to_have_url(re.compile(r"#/square\?.*free=1"))
    page.reload()
    expect(page.get_by_label("Free models only")).to_be_checked()
    expect(card(page, FREE_MODEL)).to_be_visible()
    expect(card(page, PAID_MODEL)).to_have_count(0)

    page.get_by_label("Free models only").uncheck()
    page.get_by_label("Search").fill("pro")
    expect(cards).to_have_count(1)
    expect(cards.first).to_have_attribute("data-model", PAID_MODEL)
    expect(page.get_by_role("status").filter(has_text=re.compile(r"^\d+ models?$"))).to_have_text("1 model")
    page.reload()
    expect(page.get_by_label("Search")).to_have_value("pro")
    expect(cards).to_have_count(1)
    expect(cards.first).to_have_attribute("data-model", PAID_MODEL)

    page.get_by_label("Search").fill("no-model-is-called-this")
    expect(page.get_by_text("No model matches these filters")).to_be_visible()
    page.get_by_role("button", name="Clear filters").click()
    expect(card(page, FREE_MODEL)).to_be_visible()

    # The dearest output price first: the paid model leads.
    page.get_by_label("Sort by").select_option(label="Price: high to low")
    expect(cards.first).to_have_attribute("data-model", PAID_MODEL)
    expect(page).to_have_url(re.compile(r"sort=-price"))


def test_compare_two_models_and_the_cost_of_a_request_shape(console):
    page = console.page
    signed_in(console)
    compare = page.get_by_role("button", name=re.compile(r"^Compare \(\d\)$"))
    expect(compare).to_be_disabled()
    card(page, FREE_MODEL).get_by_label("Compare").check()
    card(page, PAID_MODEL).get_by_label("Compare").check()
    expect(compare).to_have_text("Compare (2)")
    compare.click()

    expect(page.get_by_role("heading", level=1)).to_have_text("Compare models")
    expect(page).to_have_url(re.compile(r"#/compare\?models=tiny-chat,acme%2Ftiny-pro"))
    headers = page.locator("thead th")
    expect(headers.nth(1)).to_contain_text("Tiny Chat")
    expect(headers.nth(2)).to_contain_text("Acme Tiny Pro")

    prompt, completion, requests = 1234, 567, 1000
    page.get_by_label("Prompt tokens per request").fill(str(prompt))
    page.get_by_label("Completion tokens per request").fill(str(completion))
    page.get_by_label("Number of requests").fill(str(requests))
    one = cost_micros(prompt, completion, PAID_INPUT_MICROS_PER_MTOK, PAID_OUTPUT_MICROS_PER_MTOK)
    assert one == 1468  # 1467.5 micros, rounded up as billing does

    def row(label: str):
        return page.locator("tbody tr").filter(has=page.get_by_role("rowheader", name=label, exact=True))

    per_request = row("Cost per request").locator("td")
    expect(per_request.nth(1)).to_have_text(shown(one))
    expect(per_request.nth(0)).to_have_text(shown(0) + "Cheapest")
    expect(row(f"Cost of {requests:,} requests").locator("td").nth(1)).to_have_text(shown(one * requests))
    expect(page.get_by_role("status").filter(has_text="Cheapest for this request")).to_have_text(
        "Cheapest for this request: Tiny Chat."
    )
    expect(row("Input price per 1M tokens").locator("td").nth(1)).to_have_text(
        shown(PAID_INPUT_MICROS_PER_MTOK)
    )
    expect(row("Free").locator("td")).to_have_text(["Yes", "No"])
    assert console.axe_violations() == []
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "readme-compare.png"), full_page=True)

    # Down to one model the page says so and points back; adding one brings the table back, shape kept.
    page.get_by_role("button", name="Remove Tiny Chat from the comparison").click()
    expect(page.get_by_text("Pick at least 2 models")).to_be_visible()
    expect(page.get_by_role("link", name="Choose models in the model square")).to_have_attribute(
        "href", "#/square"
    )
    page.get_by_label("Model to add").select_option(FREE_MODEL)
    page.get_by_role("button", name="Add to comparison").click()
    expect(headers.nth(2)).to_contain_text("Tiny Chat")
    expect(row("Cost per request").locator("td").nth(0)).to_have_text(shown(one))
    expect(page.get_by_label("Prompt tokens per request")).to_have_value(str(prompt))


@pytest.mark.parametrize("console", [PHONE], indirect=True)
def test_square_and_compare_fit_a_phone_without_sideways_scrolling(console):
    page = console.page
    signed_in(console)
    expect(card(page, PAID_MODEL)).to_be_visible()
    wide = "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
    assert page.evaluate(wide) <= 0
    console.open(f"compare?models={FREE_MODEL},{PAID_MODEL}")
    expect(page.locator("thead th").nth(2)).to_contain_text("Acme Tiny Pro")
    assert page.evaluate(wide) <= 0


def test_square_and_compare_in_chinese_and_dark_theme(console):
    page = console.page
    signed_in(console)
    page.emulate_media(color_scheme="dark")
    page.get_by_label("Language").select_option("zh")
    expect(page.get_by_role("heading", level=1)).to_have_text("模型广场")
    expect(card(page, FREE_MODEL).locator(".badge-free")).to_have_text("免费")
    expect(fact(card(page, PAID_MODEL), "输出价格")).to_have_text(shown(PAID_OUTPUT_MICROS_PER_MTOK))
    assert console.axe_violations() == []
    console.open(f"compare?models={FREE_MODEL},{PAID_MODEL}&input=1000&output=1000&requests=2")
    expect(page.get_by_role("heading", level=1)).to_have_text("模型对比")
    cost = cost_micros(1000, 1000, PAID_INPUT_MICROS_PER_MTOK, PAID_OUTPUT_MICROS_PER_MTOK)
    expect(page.locator("tbody tr", has_text="2 次请求费用").locator("td").nth(1)).to_have_text(
        shown(cost * 2)
    )
    assert console.axe_violations() == []


def test_a_language_switch_while_the_square_loads_shows_the_page_once(console):
    page = console.page
    signed_in(console, route="keys")
    # The keys page rendered and done loading first (its form loads the catalog's models too, which the
    # route below would hold), so the only "Loading" below is the square's.
    expect(page.get_by_role("heading", level=1)).to_have_text("API keys")
    expect(page.get_by_role("status").filter(has_text="Loading")).to_have_count(0)
    held = []  # the first render's catalog answer waits here until the second render has begun
    released = False

    def hold(route):
        if released:
            route.continue_()
        else:
            held.append(route)

    page.route("**/v1/catalog/models**", hold)
    page.get_by_role("link", name="Model square").click()
    expect(page.get_by_role("status").filter(has_text="Loading")).to_be_visible()
    page.get_by_label("Language").select_option("zh")
    released = True
    for route in held:
        route.continue_()
    expect(page.get_by_role("heading", level=1)).to_have_text("模型广场")
    expect(card(page, PAID_MODEL)).to_have_count(1)
    expect(page.get_by_role("search")).to_have_count(1)


def test_live_figures_refresh_while_the_square_is_open_and_stop_after_leaving(console):
    page = console.page
    console.sign_in(console.server.sign_up())
    page.clock.install()  # the page's timers run on a clock the test moves: no waiting ten real seconds
    console.open("square")
    live = fact(card(page, FREE_MODEL), "Live")
    expect(live).not_to_be_empty()

    # Traffic on the free model through the public API, with a key of this user.
    csrf = page.request.get(f"{console.server.url}/v1/auth/session").json()["csrf_token"]
    made = page.request.post(
        f"{console.server.url}/v1/keys", data={"name": "square"}, headers={"X-CSRF-Token": csrf}
    )
    assert made.status == 200, made.text()
    body = {"model": FREE_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    chat = console.server.api("POST", "/v1/chat/completions", made.json()["key"], json=body)
    assert chat.status_code == 200, chat.text

    def square_list(response) -> bool:
        return "/v1/catalog/models?" in response.url and "limit=20" in response.url

    with page.expect_response(square_list) as refreshed:
        page.clock.fast_forward(10_000)
    figures = next(m for m in refreshed.value.json()["data"] if m["id"] == FREE_MODEL)["live"]
    assert figures["has_traffic"] is True
    expect(live).to_contain_text("TTFT")
    expect(live).not_to_have_text("No traffic yet")

    # Another page: the square's timer is gone, moving the clock asks nothing more of the catalog.
    asked = []
    page.on("request", lambda request: asked.append(request.url) if "limit=20" in request.url else None)
    console.open(f"compare?models={FREE_MODEL},{PAID_MODEL}")
    expect(page.locator("thead th").nth(2)).to_contain_text("Acme Tiny Pro")
    page.clock.fast_forward(30_000)
    page.get_by_label("Number of requests").fill("3")
    expect(page.locator("tbody tr", has_text="Cost of 3 requests")).to_be_visible()
    assert asked == []
