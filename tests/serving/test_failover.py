"""A replica that fails before a request's first output (its worker died) hands the request to another
replica: the client, who has seen nothing yet, gets a whole answer, and is billed for it once. Only when no
other replica can take it does the client get the clean 503. And the router's count of each replica's
outstanding work follows the request to where it runs, and drops its prompt once that is computed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.serving.conftest import LiveServer
from tests.serving.fake_engine import FakeEngine
from tokenmill.catalog.fleet_model import ModelDeployment
from tokenmill.catalog.lifecycle import Fleet
from tokenmill.engine.client import EngineError
from tokenmill.platform import accounts, admin_ops, ledger
from tokenmill.platform.gateway import Gateway
from tokenmill.serving.app import create_app
from tokenmill.serving.settings import ServerSettings

DIED = EngineError("the engine worker (pid 4242) died: killed by signal 9")


class Replicas:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.engines: list[FakeEngine] = []
        self.fleet: Fleet | None = None

    def __call__(self) -> FakeEngine:
        self.engines.append(FakeEngine(self.tokenizer, model_id="m"))
        return self.engines[-1]


@pytest.fixture
def served(smollm2_tokenizer: Any, gateway: Gateway) -> Iterator[tuple[str, str, Gateway, Replicas]]:
    replicas = Replicas(smollm2_tokenizer)
    fleet = Fleet([ModelDeployment("m", 1, replicas, pinned=True, num_replicas=2)])
    replicas.fleet = fleet
    gateway.register_models(["m"])
    admin_ops.create_org(gateway.db, "test", "buyer")
    admin_ops.create_user(gateway.db, "test", "buyer", "buyer@example.com")
    admin_ops.top_up(gateway.db, "test", "buyer", 10_000_000, idempotency_key="seed")
    admin_ops.set_price(gateway.db, "test", "m", 1_000_000, 2_000_000)  # 1 and 2 micros a token
    key = admin_ops.create_key(gateway.db, "test", "buyer@example.com").key
    app = create_app(fleet, {}, ServerSettings(shutdown_timeout_s=5), gateway)
    with LiveServer(app) as live:
        live.wait_ready()
        # In the router's order: with both idle, a request goes to the first.
        replicas.engines = [engine for _, _, engine in sorted(fleet.engines(), key=lambda e: e[1])]  # type: ignore[misc]
        yield live.url, key, gateway, replicas


def _post(url: str, key: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, headers={"authorization": f"Bearer {key}"}, timeout=30)


def _spent_micros(gateway: Gateway) -> int:
    return 10_000_000 - ledger.balance_micros(gateway.db, accounts.get_organization(gateway.db, "buyer").id)


def test_a_request_whose_replica_died_before_its_first_token_is_served_by_another(served) -> None:
    url, key, gateway, replicas = served
    dead, alive = replicas.engines
    dead.fail_at_submit = DIED
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}

    answer = _post(url, key, "/v1/chat/completions", chat)
    assert answer.status_code == 200, answer.text
    usage = answer.json()["usage"]
    assert answer.json()["choices"][0]["message"]["content"]
    assert (len(dead.submitted), len(alive.submitted)) == (0, 1)
    assert _spent_micros(gateway) == usage["prompt_tokens"] * 1 + usage["completion_tokens"] * 2  # once

    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json={**chat, "stream": True},
        headers={"authorization": f"Bearer {key}"}, timeout=30,
    ) as stream:  # fmt: skip
        assert stream.status_code == 200
        events = [line.removeprefix("data: ") for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and not any("error" in json.loads(e) for e in events[:-1])
    assert len(alive.submitted) == 2

    # Several prompts move together: all of them end up on the live replica.
    completion = _post(
        url, key, "/v1/completions", {"model": "m", "prompt": ["a", "b", "c"], "max_tokens": 4}
    )
    assert completion.status_code == 200, completion.text
    assert len(completion.json()["choices"]) == 3 and len(alive.submitted) == 5


def test_with_no_other_replica_left_the_client_gets_a_clean_503_and_pays_nothing(served) -> None:
    url, key, gateway, replicas = served
    for engine in replicas.engines:
        engine.fail_at_submit = DIED
    refused = _post(
        url, key, "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    error = refused.json()["error"]
    assert error["code"] == "engine_failed" and "Traceback" not in error["message"]
    assert _spent_micros(gateway) == 0


def test_a_computed_prompt_stops_counting_as_its_replicas_outstanding_work(served) -> None:
    """Prefix routing weighs a replica's outstanding work against the prompt tokens its cache holds: a
    request whose prompt is done and that only decodes must weigh its tokens to generate, not its prompt."""
    url, key, _, replicas = served
    dead, alive = replicas.engines
    dead.fail_at_submit = DIED  # the request moves: the count must follow it
    alive.step_delay_s = 0.5  # time to look between the first output and the next
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi " * 40}], "max_tokens": 20}

    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json={**chat, "stream": True},
        headers={"authorization": f"Bearer {key}"}, timeout=30,
    ) as stream:  # fmt: skip
        assert stream.status_code == 200
        lines = stream.iter_lines()  # held: a dropped iterator would close the stream, and end the request
        next(line for line in lines if line.startswith("data: "))
        assert replicas.fleet is not None
        counts = [(r.in_flight_seqs, r.outstanding_tokens) for r in replicas.fleet.status_of("m").replicas]
    prompt_tokens = len(alive.submitted[0][0])
    assert prompt_tokens > 40
    assert counts == [(0, 0), (1, 20)]  # the 20 tokens to generate; the prompt is behind the replica
