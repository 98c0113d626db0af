"""The model lifecycle as clients and the operator see it over real HTTP (uvicorn in a thread, so streams
and disconnects are real): three chat models under a memory budget that holds two, loaded on demand,
unloaded least-recently-used first but never while a stream is in flight, drained by the operator (the
stream in flight finishes, new requests get 503), and every action in the audit log."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.serving.conftest import LiveServer
from tests.serving.fake_engine import FakeEngine
from tokenmill.catalog.fleet_model import ModelDeployment
from tokenmill.catalog.lifecycle import Fleet
from tokenmill.platform import admin_ops
from tokenmill.platform.gateway import Gateway
from tokenmill.serving.app import create_app
from tokenmill.serving.settings import ServerSettings

MODELS = ("a", "b", "c")
MODEL_BYTES = 100
STEP_S = 0.02
STREAM_TOKENS = 60
"""A stream of ~1.2 s: long enough to still be running while the test acts around it."""


@dataclass
class Engines:
    tokenizer: Any
    built: dict[str, list[FakeEngine]] = field(default_factory=dict)

    def factory(self, model: str) -> Callable[[], FakeEngine]:
        def build() -> FakeEngine:
            engine = FakeEngine(self.tokenizer, model_id=model, step_delay_s=STEP_S)
            engine.endless = True  # only max_tokens ends a reply: streams last as long as asked
            self.built.setdefault(model, []).append(engine)
            return engine

        return build

    def latest(self, model: str) -> FakeEngine:
        return self.built[model][-1]


@dataclass
class Cloud:
    url: str
    key: str
    admin_key: str
    engines: Engines

    def chat(self, model: str, max_tokens: int = 4) -> httpx.Response:
        return httpx.post(
            f"{self.url}/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens},
            headers={"authorization": f"Bearer {self.key}"},
            timeout=30,
        )

    def states(self) -> dict[str, str]:
        body = self.admin("GET", "/v1/admin/models").json()
        return {model["id"]: model["state"] for model in body["data"]}

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {self.admin_key}"}
        return httpx.request(method, f"{self.url}{path}", headers=headers, timeout=30, **kwargs)


@pytest.fixture
def cloud(smollm2_tokenizer: Any, gateway: Gateway) -> Iterator[Cloud]:
    engines = Engines(smollm2_tokenizer)
    fleet = Fleet(
        [ModelDeployment(m, MODEL_BYTES, engines.factory(m), max_running=4, max_queue=4) for m in MODELS],
        memory_budget_bytes=2 * MODEL_BYTES + MODEL_BYTES // 2,
    )
    gateway.register_models(MODELS)
    admin_ops.create_org(gateway.db, "test", "buyer")
    admin_ops.create_user(gateway.db, "test", "buyer", "buyer@example.com")
    key = admin_ops.create_key(gateway.db, "test", "buyer@example.com").key
    admin_key = (gateway.settings.data_dir / "admin_key").read_text().strip()
    app = create_app(fleet, {}, ServerSettings(shutdown_timeout_s=5), gateway)
    with LiveServer(app) as live:
        live.wait_ready()
        yield Cloud(live.url, key, admin_key, engines)


class Stream:
    """A streaming chat request read from a thread: started, seen producing, then read to its end."""

    def __init__(self, cloud: Cloud, model: str) -> None:
        self.first_token = threading.Event()
        self.chunks: list[str] = []
        self.status: int | None = None
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "a long one"}],
            "max_tokens": STREAM_TOKENS,
            "stream": True,
        }
        self._thread = threading.Thread(target=self._read, args=(cloud, body), daemon=True)
        self._thread.start()
        assert self.first_token.wait(30), "the stream produced nothing"

    def _read(self, cloud: Cloud, body: dict[str, Any]) -> None:
        headers = {"authorization": f"Bearer {cloud.key}"}
        with httpx.stream("POST", f"{cloud.url}/v1/chat/completions", json=body, headers=headers) as response:
            self.status = response.status_code
            for line in response.iter_lines():
                if line.startswith("data: "):
                    self.chunks.append(line.removeprefix("data: "))
                    self.first_token.set()
        self.first_token.set()

    def finish(self) -> list[str]:
        self._thread.join(30)
        assert not self._thread.is_alive()
        return self.chunks


def test_a_cold_model_loads_on_demand_and_the_least_recently_used_idle_one_makes_room(cloud: Cloud) -> None:
    assert cloud.states() == {"a": "unloaded", "b": "unloaded", "c": "unloaded"}
    assert cloud.chat("a").status_code == 200  # a cold start: loaded by this request
    assert cloud.chat("b").status_code == 200
    assert cloud.chat("a").status_code == 200  # a is now the more recently used
    assert cloud.states() == {"a": "loaded", "b": "loaded", "c": "unloaded"}

    assert cloud.chat("c").status_code == 200
    assert cloud.states() == {"a": "loaded", "b": "unloaded", "c": "loaded"}
    assert not cloud.engines.latest("b").started  # its engine was shut down
    metrics = httpx.get(f"{cloud.url}/metrics").text
    assert 'tokenmill_model_state{model="b",state="unloaded"} 1.0' in metrics
    assert 'tokenmill_model_loads_total{model="c"} 1.0' in metrics
    catalog = httpx.get(f"{cloud.url}/v1/catalog/models", headers={"authorization": f"Bearer {cloud.key}"})
    assert {m["id"]: m["state"] for m in catalog.json()["data"]} == cloud.states()
    # The square shows how many engines serve each model now: none for the one unloaded.
    assert {m["id"]: m["replicas"] for m in catalog.json()["data"]} == {"a": 1, "b": 0, "c": 1}


def test_a_model_with_a_stream_in_flight_is_never_the_one_unloaded(cloud: Cloud) -> None:
    assert cloud.chat("a").status_code == 200
    assert cloud.chat("b").status_code == 200
    stream = Stream(cloud, "a")  # a is the least recently used, but busy
    assert cloud.chat("c").status_code == 200
    assert cloud.states() == {"a": "loaded", "b": "unloaded", "c": "loaded"}
    chunks = stream.finish()
    assert stream.status == 200 and chunks[-1] == "[DONE]"
    assert '"finish_reason":"length"' in chunks[-2]


def test_drain_finishes_the_streams_in_flight_and_refuses_new_requests(cloud: Cloud) -> None:
    assert cloud.chat("a").status_code == 200
    stream = Stream(cloud, "a")
    drained: list[httpx.Response] = []
    drainer = threading.Thread(target=lambda: drained.append(cloud.admin("POST", "/v1/admin/models/a/drain")))
    drainer.start()
    deadline = time.monotonic() + 10
    while cloud.states()["a"] != "draining":
        assert time.monotonic() < deadline, "the drain did not start"
        time.sleep(0.01)

    refused = cloud.chat("a")
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "model_unavailable"
    assert "drained" in refused.json()["error"]["message"]

    chunks = stream.finish()  # the stream in flight runs to its end
    assert stream.status == 200 and chunks[-1] == "[DONE]" and '"finish_reason":"length"' in chunks[-2]
    drainer.join(30)
    assert drained[0].status_code == 200 and drained[0].json()["state"] == "stopped"
    assert not cloud.engines.latest("a").started
    assert cloud.chat("a").status_code == 503  # stopped stays stopped ...
    assert cloud.admin("POST", "/v1/admin/models/a/load").json()["state"] == "loaded"
    assert cloud.chat("a").status_code == 200  # ... until the operator loads it again

    audit = cloud.admin("GET", "/v1/admin/audit-log", params={"target": "a"}).json()["data"]
    assert [entry["action"] for entry in audit] == ["load_model", "drain_model"]
    assert audit[1]["before"]["state"] == "loaded" and audit[1]["after"]["state"] == "stopped"


def test_user_keys_cannot_drive_the_models(cloud: Cloud) -> None:
    headers = {"authorization": f"Bearer {cloud.key}"}
    for path in ("/v1/admin/models", "/v1/admin/models/a/load"):
        method = "GET" if path.endswith("models") else "POST"
        response = httpx.request(method, f"{cloud.url}{path}", headers=headers)
        assert response.status_code == 403 and response.json()["error"]["code"] == "permission_denied"
    assert cloud.states()["a"] == "unloaded"


def test_the_operator_switches_a_models_routing(cloud: Cloud) -> None:
    switched = cloud.admin("POST", "/v1/admin/models/a/routing", json={"routing": "least-load"})
    assert switched.status_code == 200 and switched.json()["routing"] == "least-load"
    assert cloud.chat("a").status_code == 200  # loads it: the pool takes the model's routing
    body = cloud.admin("GET", "/v1/admin/models").json()
    listed = {m["id"]: m for m in body["data"]}
    assert listed["a"]["routing"] == "least-load" and listed["b"]["routing"] == "prefix"
    assert listed["a"]["prefix_cache_hit_rate"] is not None  # a prompt went through: a rate, maybe 0
    assert body["prefix_cache_hit_rate"] == listed["a"]["prefix_cache_hit_rate"]  # the only model used
    session = cloud.admin("POST", "/v1/admin/models/a/routing", json={"routing": "session"})
    assert session.status_code == 200 and session.json()["routing"] == "session"
    refused = cloud.admin("POST", "/v1/admin/models/a/routing", json={"routing": "random"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "routing"
    assert cloud.admin("POST", "/v1/admin/models/zzz/routing", json={"routing": "prefix"}).status_code == 404


def test_the_operator_cannot_drain_a_models_last_replica_or_one_it_lacks(cloud: Cloud) -> None:
    assert cloud.chat("a").status_code == 200
    last = cloud.admin("POST", "/v1/admin/models/a/replicas/0/drain")
    assert last.status_code == 409 and last.json()["error"]["param"] == "replica"
    assert "drain the model" in last.json()["error"]["message"]
    missing = cloud.admin("POST", "/v1/admin/models/a/replicas/5/drain")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "replica_not_found"
    assert cloud.admin("POST", "/v1/admin/models/zzz/replicas/0/drain").status_code == 404
    assert cloud.chat("a").status_code == 200  # nothing changed
