"""The OpenAPI schema is a contract and a fuzzer holds the server to it. Schemathesis generates requests for
every operation from the schema (valid ones, schema-violating ones and boundary values) and sends them over
real HTTP to a server in this process: a tiny random-weight Llama engine and the real MiniLM embedder behind
the full platform, called with a valid key and without one, on SQLite and on PostgreSQL, and behind
`--no-auth`. No answer may be a 5xx, nor have a status, content type or body the schema does not document."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.platform.conftest import EmptyDatabase
from tests.serving.conftest import LiveServer
from tokenmill.engine.embedder import Embedder
from tokenmill.platform import accounts, keys
from tokenmill.platform.gateway import Gateway, PlatformSettings
from tokenmill.serving.app import create_app
from tokenmill.serving.settings import ServerSettings

pytest.importorskip("tokenmill.engine.async_engine")

SCHEMA = schemathesis.openapi.from_dict(create_app({}, {}, ServerSettings(no_auth=True)).openapi())
SCHEMA.config.generation.update(max_examples=25, database="none")
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
SETUPS = [
    "no-auth",
    "sqlite-with-key",
    "sqlite-without-key",
    pytest.param("postgresql-with-key", marks=pytest.mark.postgres),
    pytest.param("postgresql-without-key", marks=pytest.mark.postgres),
]


@dataclass(frozen=True)
class Target:
    url: str
    headers: dict[str, str]


def _gateway(backend: str, tmp_path: Path) -> tuple[Gateway, EmptyDatabase]:
    empty = EmptyDatabase(backend, tmp_path)
    gateway = Gateway.open(
        PlatformSettings(data_dir=tmp_path / "data", database_url=empty.url, gateway_id="fuzz")
    )
    gateway.start()
    gateway.register_models(["tiny"])
    gateway.register_models(["all-MiniLM-L6-v2"], task="embedding")
    return gateway, empty


def _key(gateway: Gateway) -> str:
    org = accounts.create_organization(gateway.db, "fuzzers", tier="unlimited")
    user = accounts.create_user(gateway.db, org.id, "fuzz@example.com")
    return keys.create_key(gateway.db, user.id, name="fuzz").key


@pytest.fixture(scope="module", params=SETUPS)
def target(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_llama_dir: Path,
    minilm: Embedder,
) -> Iterator[Target]:
    from tokenmill.engine.async_engine import AsyncLLM

    setup: str = request.param
    engine = AsyncLLM(str(tiny_llama_dir), dtype="float32", max_model_len=96, kv_cache_memory=8 << 20)
    settings = ServerSettings(max_body_bytes=256 * 1024, no_auth=setup == "no-auth")
    gateway, empty, headers = None, None, {}
    if setup != "no-auth":
        gateway, empty = _gateway(setup.split("-")[0], tmp_path_factory.mktemp(setup))
        if setup.endswith("with-key"):
            headers = {"Authorization": f"Bearer {_key(gateway)}"}
    app = create_app({"tiny": engine}, {"all-MiniLM-L6-v2": minilm}, settings, gateway)
    try:
        with LiveServer(app) as live:
            live.wait_ready()
            yield Target(live.url, headers)
    finally:
        if gateway is not None:
            gateway.close()
        if empty is not None:
            empty.drop()


SERVED = {"/v1/chat/completions": "tiny", "/v1/completions": "tiny", "/v1/embeddings": "all-MiniLM-L6-v2"}
UNSUPPORTED = (
    *("tools", "tool_choice", "parallel_tool_calls", "functions", "suffix", "best_of", "echo", "dimensions"),
    *("response_format", "guided_json", "guided_regex", "guided_choice"),
)
"""Fields the server refuses by a rule the schema cannot state, or whose random values (schemas, regexes)
would almost never compile (they have their own tests)."""


def reach_the_engine(case: schemathesis.Case) -> None:
    """A generated body almost never names a served model, and a valid one almost always trips one of the
    cross-field rules; without repair, the fuzzer's sampling settings would never reach the engine. Only
    positive cases are repaired: negative ones are sent as generated."""
    body = case.body
    if case.path not in SERVED or not isinstance(body, dict) or case.meta is None:
        return
    if case.meta.generation.mode != GenerationMode.POSITIVE:
        return
    body["model"] = SERVED[case.path]
    for field in UNSUPPORTED:
        body.pop(field, None)
    if not body.get("stream"):
        body.pop("stream_options", None)
    if body.get("top_logprobs") is not None and case.path == "/v1/chat/completions":
        body["logprobs"] = True
    for message in body.get("messages") or []:
        if message.get("role") in ("tool", "function"):
            message["role"] = "user"


@SCHEMA.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_every_answer_is_documented_and_none_is_a_server_error(
    case: schemathesis.Case, target: Target
) -> None:
    reach_the_engine(case)
    case.call_and_validate(base_url=target.url, headers=target.headers, checks=CHECKS, timeout=60)
