"""Structured output over a real `tokenmill serve` with a tiny random-weight model, where nothing but the
grammar can make the output valid: `response_format` (JSON schema, JSON object) and vLLM's `guided_*` fields
through the official openai SDK, streamed and not, on chat and completions; bad schemas and regexes are a
400 naming the field."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest
from transformers import PreTrainedTokenizerBase

from tests.serving.server_process import ServerProcess

pytestmark = pytest.mark.slow  # runs a server process

MODEL = "tiny"
USER = [{"role": "user", "content": "Describe a planet."}]
PLANET = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "moons": {"type": "integer", "minimum": 0, "maximum": 200},
        "kind": {"enum": ["rocky", "gas giant", "ice giant"]},
        "rings": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"radius_km": {"type": "number", "minimum": 1, "maximum": 1e6}},
                "required": ["radius_km"],
                "additionalProperties": False,
            },
            "maxItems": 2,
        },
    },
    "required": ["name", "moons", "kind", "rings"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "planet", "schema": PLANET, "strict": True}}


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    args = ["--model", f"{MODEL}={tiny_llama_dir}", "--embedding-model", "none", "--kv-cache-memory", "64M"]
    process = ServerProcess([*args, "--no-auth"], tmp_path_factory.mktemp("serve") / "serve.log")
    yield process.start(timeout_s=180)
    process.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-needed", max_retries=0, timeout=120)


def test_json_schema_answers_always_validate_streamed_or_not(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(
        model=MODEL, messages=USER, response_format=RESPONSE_FORMAT, n=8, seed=1, max_tokens=200
    )
    for choice in chat.choices:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), PLANET)
    stream = client.chat.completions.create(
        model=MODEL, messages=USER, response_format=RESPONSE_FORMAT, seed=1, max_tokens=200, stream=True
    )
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason == "stop"
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    jsonschema.validate(json.loads(streamed), PLANET)


def test_json_object_and_the_guided_fields_on_chat_and_completions(
    client: openai.OpenAI, smollm2_tokenizer: PreTrainedTokenizerBase
) -> None:
    # A random model never closes a free string; a bias towards the tokens made of '"' and '}' closes most.
    # It applies after the grammar's mask, so it cannot put a '}' where JSON forbids one.
    vocab = smollm2_tokenizer.get_vocab().items()
    closers = {str(token_id): 10 for token, token_id in vocab if token and set(token) <= set('"}')}
    chat = client.chat.completions.create(
        model=MODEL,
        messages=USER,
        response_format={"type": "json_object"},
        n=8,
        seed=3,
        max_tokens=48,
        logit_bias=closers,
    )
    finished = [choice.message.content for choice in chat.choices if choice.finish_reason == "stop"]
    assert finished and all(isinstance(json.loads(text), dict) for text in finished)
    assert all(choice.message.content.startswith("{") for choice in chat.choices)

    options = ["yes", "no", 'a "quoted" (maybe)?']
    choices = client.completions.create(
        model=MODEL, prompt="Answer:", n=6, seed=4, max_tokens=40, extra_body={"guided_choice": options}
    ).choices
    assert {choice.text for choice in choices} <= set(options)

    pattern = r"\d{3}-[a-z]{2,4}"
    choices = client.completions.create(
        model=MODEL, prompt="Code:", n=6, seed=5, max_tokens=40, extra_body={"guided_regex": pattern}
    ).choices
    assert all(re.fullmatch(pattern, choice.text) for choice in choices), [c.text for c in choices]

    guided_json = client.completions.create(
        model=MODEL, prompt="Planet:", seed=6, max_tokens=200, extra_body={"guided_json": json.dumps(PLANET)}
    )
    jsonschema.validate(json.loads(guided_json.choices[0].text), PLANET)


def test_an_answer_cut_by_max_tokens_says_length(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(
        model=MODEL, messages=USER, response_format=RESPONSE_FORMAT, max_tokens=3, seed=1
    )
    assert chat.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
         "response_format"),
        ({"guided_regex": "(unclosed"}, "guided_regex"),
        ({"guided_json": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}, "guided_json"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_choice": ["a"], "response_format": {"type": "json_object"}}, "guided_choice"),
    ],
)  # fmt: skip
def test_a_bad_schema_regex_or_combination_is_a_400_naming_the_field(
    client: openai.OpenAI, fields: dict[str, object], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=MODEL, messages=USER, max_tokens=5, extra_body=fields)
    error = raised.value.body
    assert isinstance(error, dict) and error["param"] == param, error
    assert error["type"] == "invalid_request_error"
