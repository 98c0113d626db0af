"""Every page of the console, as the person it is for: it renders its heading, passes axe-core's checks with no
serious or critical violation in the light and the dark theme, and fits a phone without sideways scrolling."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from tests.console.conftest import FREE_MODEL, PAID_MODEL

USER_PAGES = {
    "square": "Model square",
    f"compare?models={FREE_MODEL},{PAID_MODEL}": "Compare",
    f"playground?model={FREE_MODEL}": "playground",
    "embeddings": "Embeddings",
    "keys": "API keys",
    "usage": "Usage",
    "provider": "Provider",
    "account": "Account",
}
ADMIN_PAGES = {
    "admin/organizations": "Organizations",
    "admin/invites": "Invites",
    "admin/models": "Models",
    "admin/prices": "Prices",
    "admin/audit": "Audit log",
}
PHONE = {"width": 390, "height": 844}


def _check(console, route: str, scheme: str) -> None:
    page = console.page
    page.emulate_media(color_scheme=scheme)
    console.open(route)
    expect(page.get_by_role("heading", level=1)).to_be_visible()
    page.wait_for_load_state("networkidle")
    assert console.axe_violations() == [], route
    width = page.evaluate(
        "() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]"
    )
    assert width[0] <= width[1], f"{route} scrolls sideways: {width}"


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_every_user_page(console, scheme):
    console.sign_in(console.server.sign_up())
    for route, heading in USER_PAGES.items():
        _check(console, route, scheme)
        expect(console.page.get_by_role("heading", level=1)).to_contain_text(re.compile(heading, re.I))


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_every_admin_page(console, scheme):
    console.sign_in_as_admin()
    for route, heading in ADMIN_PAGES.items():
        _check(console, route, scheme)
        expect(console.page.get_by_role("heading", level=1)).to_contain_text(re.compile(heading, re.I))


@pytest.mark.parametrize("console", [PHONE], indirect=True)
def test_every_page_on_a_phone(console):
    console.sign_in(console.server.sign_up())
    for route in USER_PAGES:
        _check(console, route, "light")
    console.page.get_by_role("button", name="Menu").click()
    expect(console.page.get_by_role("link", name="API keys")).to_be_visible()
