"""The chat and embeddings playgrounds in a browser, as a newly signed-up user: a reply that streams in piece
by piece and whose token count is what the server billed, a Stop that ends the bill early, "View code"
with the chosen model and parameters, the quota error of a paid model with no balance, a conversation that
survives an expired session, and a semantic ranking computed from real MiniLM embeddings."""

from __future__ import annotations

import ast
import json
import re
import time
from typing import Any

from playwright.sync_api import expect

from tests.console.conftest import (
    ARTIFACTS,
    CONTEXT_LENGTH,
    EMBEDDING_MODEL,
    FREE_MODEL,
    PAID_MODEL,
    PASSWORD,
)

STATS = ".bubble-assistant .bubble-stats"
COMPLETION = re.compile(r"\+ (\d+) completion tokens")

# Counts how a reply's text grows: one entry per distinct length the assistant's last bubble had.
WATCH_REPLY = """() => {
  window.__lengths = new Set();
  const log = document.querySelector('.chat-log');
  new MutationObserver(() => {
    const bubbles = log.querySelectorAll('.bubble-assistant .bubble-text');
    const length = bubbles.length ? bubbles[bubbles.length - 1].textContent.length : 0;
    if (length > 0) window.__lengths.add(length);
  }).observe(log, {subtree: true, childList: true, characterData: true});
}"""

# Resolves once GET /v1/usage (this browser's session) reports `model` completion tokens matching `wanted`.
BILLED_TOKENS = """async (model) => {
  const usage = await (await fetch('/v1/usage')).json();
  return usage.data.filter((row) => row.model === model).reduce((sum, row) => sum + row.completion_tokens, 0);
}"""


def open_playground(console, model: str = FREE_MODEL) -> Any:
    console.sign_in(console.server.sign_up())
    console.open(f"playground?model={model}")
    page = console.page
    expect(page.get_by_role("heading", level=1)).to_have_text("Chat playground")
    return page


def set_field(page, label: str, value: str) -> None:
    page.get_by_label(label, exact=True).fill(value)


def send(page, text: str) -> None:
    page.get_by_label("Message", exact=True).fill(text)
    page.get_by_label("Message", exact=True).press("Enter")


def billed_completion_tokens(page, model: str, wanted: int | None = None, timeout_s: float = 15) -> int:
    """Polls the signed-in user's usage until the server has settled the bill (`wanted` tokens, or any),
    then returns its completion tokens. (Not wait_for_function: it takes an async predicate's promise for
    a truthy answer at once, and returned before the bill was settled.)"""
    deadline = time.monotonic() + timeout_s
    while True:
        tokens = page.evaluate(BILLED_TOKENS, model)  # evaluate awaits the promise
        if tokens and (wanted is None or tokens == wanted):
            return tokens
        assert time.monotonic() < deadline, f"usage shows {tokens} completion tokens of {model}, not {wanted}"
        page.wait_for_timeout(100)


def test_a_reply_streams_in_and_shows_the_tokens_the_server_billed(console):
    page = open_playground(console)
    set_field(page, "System prompt", "You are a poet.")
    set_field(page, "Temperature", "2")  # random weights: hotter sampling writes words, not only blank lines
    set_field(page, "Max tokens", "60")
    set_field(page, "Seed", "2")
    page.evaluate(WATCH_REPLY)
    message = page.get_by_label("Message", exact=True)
    message.fill("Write a haiku")
    message.press("Shift+Enter")  # a new line, not a send
    message.press_sequentially("about autumn.")
    expect(message).to_have_value("Write a haiku\nabout autumn.")
    message.press("Enter")
    expect(message).to_have_value("")
    expect(page.locator(".bubble-user .bubble-text")).to_have_text("Write a haiku\nabout autumn.")
    stats = page.locator(STATS)
    expect(stats).to_contain_text("completion tokens", timeout=30_000)
    assert page.evaluate("() => window.__lengths.size") > 1, "the reply arrived all at once"
    expect(stats).to_contain_text("free")
    expect(stats).to_contain_text("tokens/s")
    expect(stats).to_contain_text("first token after")
    shown = int(COMPLETION.search(stats.inner_text()).group(1))
    assert 0 < shown <= 60
    assert billed_completion_tokens(page, FREE_MODEL, shown) == shown
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    expect(page.get_by_role("button", name="Stop")).to_be_disabled()
    assert console.axe_violations() == []
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "readme-playground.png"), full_page=True)


def test_stop_ends_the_reply_and_the_bill_counts_only_what_was_generated(console):
    page = open_playground(console)
    max_tokens = CONTEXT_LENGTH - 100  # seconds of generation: Stop lands long before the end
    set_field(page, "Max tokens", str(max_tokens))
    send(page, "Tell me a very long story.")
    reply = page.locator(".bubble-assistant .bubble-text")
    # The first tokens (random weights: often blank lines, which to_have_text would see as empty).
    page.wait_for_function(
        "() => document.querySelector('.bubble-assistant .bubble-text').textContent.length"
    )
    page.get_by_role("button", name="Stop").click()
    stats = page.locator(STATS)
    expect(stats).to_contain_text("Stopped")
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    length = len(reply.text_content())
    billed = billed_completion_tokens(page, FREE_MODEL)
    assert 0 < billed < max_tokens
    assert len(reply.text_content()) == length, "the reply kept growing after Stop"
    # The partial reply stays in the conversation, and the next message goes out normally.
    set_field(page, "Max tokens", "4")
    send(page, "Again")
    expect(page.locator(STATS).nth(1)).to_contain_text("completion tokens")
    expect(page.locator(".bubble-assistant")).to_have_count(2)


def test_view_code_shows_the_request_with_model_and_parameters(console):
    page = open_playground(console)
    set_field(page, "Temperature", "0.3")
    set_field(page, "Max tokens", "77")
    set_field(page, "Stop sequences", "END, STOP")
    page.get_by_label("Message", exact=True).fill("Why is the sky blue?")
    page.get_by_role("button", name="View code").click()
    code = page.locator("pre.code-sample")
    expect(code).to_contain_text(f"curl -N {console.server.url}/v1/chat/completions")
    expect(code).to_contain_text("Authorization: Bearer $TOKENMILL_API_KEY")
    for fragment in (f'"model": "{FREE_MODEL}"', '"temperature": 0.3', '"max_tokens": 77', '"END"', '"STOP"'):
        expect(code).to_contain_text(fragment)
    expect(code).to_contain_text('"content": "Why is the sky blue?"')
    body = json.loads(re.search(r"-d '(.*)'$", code.inner_text(), re.S).group(1))
    assert body == {
        "model": FREE_MODEL, "messages": [{"role": "user", "content": "Why is the sky blue?"}],
        "temperature": 0.3, "top_p": 1, "max_tokens": 77, "stop": ["END", "STOP"], "stream": True,
    }  # fmt: skip
    page.get_by_role("tab", name="Python").click()
    expect(code).to_contain_text('api_key=os.environ["TOKENMILL_API_KEY"]')
    ast.parse(code.inner_text())  # a script that runs, not just text that looks like one
    expect(code).to_contain_text(f'model="{FREE_MODEL}"')
    expect(code).to_contain_text("max_tokens=77")
    # The sample follows the form while it is open, and keeps the chosen language.
    set_field(page, "Max tokens", "42")
    expect(code).to_contain_text("max_tokens=42")
    page.get_by_role("tab", name="JavaScript").click()
    expect(code).to_contain_text("apiKey: process.env.TOKENMILL_API_KEY")
    expect(code).to_contain_text(f'baseURL: "{console.server.url}/v1"')


def test_a_paid_model_without_balance_shows_the_quota_error_and_keeps_the_question(console):
    console.watch.expect(429)  # OpenAI's insufficient_quota: the new organization has no balance
    page = open_playground(console, PAID_MODEL)
    expect(page.get_by_label("Model", exact=True)).to_have_value(PAID_MODEL)
    expect(page.locator("#model-price")).to_contain_text("per 1M tokens")
    send(page, "Hello, paid model")
    expect(page.get_by_role("alert")).to_contain_text("exceeded your current quota")
    expect(page.get_by_label("Message", exact=True)).to_have_value("Hello, paid model")
    expect(page.locator(".bubble")).to_have_count(0)
    # Not a dead end: the free model answers the same question.
    page.get_by_label("Model", exact=True).select_option(FREE_MODEL)
    set_field(page, "Max tokens", "4")
    page.get_by_role("button", name="Send").click()
    expect(page.locator(STATS)).to_contain_text("completion tokens")
    expect(page.get_by_role("alert")).to_have_count(0)


def test_an_expired_session_loses_nothing_of_the_conversation(console):
    page = open_playground(console)
    email = page.locator(".who").inner_text()
    set_field(page, "System prompt", "Be terse.")
    set_field(page, "Max tokens", "6")
    send(page, "First question")
    expect(page.locator(STATS)).to_contain_text("completion tokens")
    first_reply = page.locator(".bubble-assistant .bubble-text").inner_text()

    console.watch.expect(401)
    page.context.clear_cookies()
    send(page, "Second question")
    expect(page.get_by_role("heading", level=1)).to_have_text("Sign in")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()

    expect(page.get_by_role("heading", level=1)).to_have_text("Chat playground")
    expect(page.locator(".bubble-user .bubble-text")).to_have_text(["First question"])
    expect(page.locator(".bubble-assistant .bubble-text")).to_have_text([first_reply])
    expect(page.get_by_label("Message", exact=True)).to_have_value("Second question")
    expect(page.get_by_label("System prompt", exact=True)).to_have_value("Be terse.")
    expect(page.get_by_label("Max tokens", exact=True)).to_have_value("6")
    page.get_by_role("button", name="Send").click()
    expect(page.locator(".bubble-user .bubble-text")).to_have_text(["First question", "Second question"])
    expect(page.locator(STATS).nth(1)).to_contain_text("completion tokens")


def test_the_embeddings_page_ranks_the_closest_sentence_first(console):
    console.sign_in(console.server.sign_up())
    console.open("embeddings")
    page = console.page
    expect(page.get_by_role("heading", level=1)).to_have_text("Embeddings playground")
    expect(page.get_by_label("Embedding model")).to_have_value(EMBEDDING_MODEL)
    page.get_by_label("Query").fill("A kitten resting on a rug")
    page.get_by_label("Sentences").fill("Stock markets fell sharply\nThe cat sits on the mat")
    page.get_by_role("button", name="Rank").click()
    rows = page.locator("tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.nth(0)).to_contain_text("The cat sits on the mat")
    expect(rows.nth(1)).to_contain_text("Stock markets fell sharply")
    scores = [float(text) for text in page.locator(".score-value").all_inner_texts()]
    assert all(re.fullmatch(r"-?\d\.\d{3}", text) for text in page.locator(".score-value").all_inner_texts())
    assert scores[0] > scores[1]
    expect(page.get_by_text(re.compile(r"^\d+ tokens used$"))).to_be_visible()
    assert console.axe_violations() == []
