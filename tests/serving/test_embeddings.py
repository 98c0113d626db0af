"""POST /v1/embeddings with the real all-MiniLM-L6-v2 (small, installed from PyPI): formats, input forms,
batching of concurrent requests, and the errors OpenAI gives."""

from __future__ import annotations

import base64
import concurrent.futures
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.serving.conftest import wait_ready
from tests.serving.fake_engine import FakeEngine
from tokenmill.engine.embedder import Embedder
from tokenmill.serving.app import create_app
from tokenmill.serving.settings import ServerSettings

MODEL = "all-MiniLM-L6-v2"


@pytest.fixture
def embed_client(fake_engine: FakeEngine, minilm: Embedder) -> Iterator[TestClient]:
    app = create_app({"fake-chat": fake_engine}, {MODEL: minilm}, ServerSettings(no_auth=True))
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client, timeout_s=60)
        yield client


def _embed(client: TestClient, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/embeddings", json={"model": MODEL, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_float_and_base64_are_the_same_vectors(embed_client: TestClient) -> None:
    texts = ["The cat sits on the mat.", "Quarterly revenue grew by four percent."]
    floats = _embed(embed_client, input=texts)
    encoded = _embed(embed_client, input=texts, encoding_format="base64")
    assert floats["object"] == "list" and floats["model"] == MODEL
    for f, b in zip(floats["data"], encoded["data"], strict=True):
        assert f["object"] == "embedding" and f["index"] == b["index"]
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        assert decoded.shape == (384,)
        np.testing.assert_array_equal(decoded, np.asarray(f["embedding"], dtype=np.float32))
        assert abs(np.linalg.norm(decoded) - 1.0) < 1e-5
    assert floats["usage"]["prompt_tokens"] == floats["usage"]["total_tokens"] > 10


def test_paraphrase_ranks_above_unrelated(embed_client: TestClient) -> None:
    data = _embed(
        embed_client,
        input=[
            "A man is playing a guitar.",
            "Someone strums a guitar.",
            "The stock market fell sharply today.",
        ],
    )["data"]
    query, paraphrase, unrelated = (np.asarray(d["embedding"]) for d in data)
    assert query @ paraphrase > query @ unrelated + 0.3


def test_input_forms(embed_client: TestClient, minilm: Embedder) -> None:
    text = "hello world"
    single = _embed(embed_client, input=text)["data"][0]["embedding"]
    ids = minilm._tokenizer(text)["input_ids"]
    by_ids = _embed(embed_client, input=ids)
    assert np.allclose(by_ids["data"][0]["embedding"], single, atol=1e-6)
    assert by_ids["usage"]["prompt_tokens"] == len(ids)
    assert len(_embed(embed_client, input=[ids, ids[:2]])["data"]) == 2


def test_concurrent_requests_are_batched_and_get_their_own_vectors(
    embed_client: TestClient, minilm: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = [f"sentence number {i} about topic {i % 3}" for i in range(12)]
    alone = [_embed(embed_client, input=t)["data"][0]["embedding"] for t in texts]
    batch_sizes: list[int] = []
    forward = minilm._forward

    def counting_forward(sequences: list[list[int]]) -> np.ndarray:
        batch_sizes.append(len(sequences))
        time.sleep(0.05)  # a slower model: requests pile up while it runs
        return forward(sequences)

    monkeypatch.setattr(minilm, "_forward", counting_forward)
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        together = list(pool.map(lambda t: _embed(embed_client, input=t)["data"][0]["embedding"], texts))
    for a, b in zip(alone, together, strict=True):
        assert np.allclose(a, b, atol=1e-5)
    assert sum(batch_sizes) == 12 and len(batch_sizes) < 12 and max(batch_sizes) > 1


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        ({"input": "x", "dimensions": 128}, 400, "dimensions", None),
        ({"input": "word " * 300}, 400, "input", "context_length_exceeded"),
        ({"input": []}, 400, "input", None),
        ({"input": ""}, 400, "input", None),
        ({"input": [""]}, 400, "input", None),
        ({"input": [10**9]}, 400, "input", None),
        ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format", None),
        ({"input": "x", "model": "fake-chat"}, 400, "model", "model_not_supported"),
    ],
)
def test_errors(embed_client: TestClient, body: dict, status: int, param: str, code: str | None) -> None:
    response = embed_client.post("/v1/embeddings", json={"model": MODEL, **body})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, code)


def test_native_dimensions_are_accepted(embed_client: TestClient) -> None:
    assert len(_embed(embed_client, input="x", dimensions=384)["data"][0]["embedding"]) == 384


def test_chat_routes_refuse_embedding_models(embed_client: TestClient) -> None:
    response = embed_client.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "model"
