"""models.yaml as an operator meets it: the shipped example loads and documents every field, and each mistake
stops the load with one message naming the file, the model and the field."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from tokenmill.catalog.deployments import (
    AutoscalingSettings,
    Deployment,
    EngineSettings,
    LimitSettings,
    ListingSettings,
    PriceSettings,
    ResourceSettings,
    load_deployments,
)
from tokenmill.catalog.fleet_model import Autoscaling
from tokenmill.config import ConfigError, EngineConfig
from tokenmill.serving.settings import CompletionLimits

EXAMPLE = Path(__file__).parents[2] / "examples" / "models.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def load_error(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_deployments(path)
    return str(caught.value).replace(str(path), "models.yaml")


def test_the_example_serves_the_builtin_models():
    models = load_deployments(EXAMPLE).models
    chat, embedding = models
    assert (chat.id, chat.source, chat.task, chat.pinned) == ("smollm2", "smollm2", "chat", True)
    assert chat.listing.display_name == "SmolLM2 135M Instruct"
    assert chat.listing.price_micros() == (0, 0)
    config = EngineConfig.from_kwargs(chat.source, **chat.engine_kwargs())
    assert config.cache.kv_cache_memory == 256 * 1024**2
    assert config.model.max_model_len == 4096
    assert (embedding.id, embedding.source, embedding.task) == (
        "all-MiniLM-L6-v2",
        "all-MiniLM-L6-v2",
        "embedding",
    )
    assert embedding.listing.price_micros() == (0, 0)


@pytest.mark.parametrize(
    "model",
    [
        Deployment,
        EngineSettings,
        LimitSettings,
        ListingSettings,
        PriceSettings,
        AutoscalingSettings,
        ResourceSettings,
    ],
)
def test_the_example_documents_every_field(model):
    text = EXAMPLE.read_text()
    undocumented = [
        name for name in model.model_fields if not re.search(rf"^\s*#?\s*-? ?{name}:", text, re.M)
    ]
    assert not undocumented


def test_a_bare_deployment_is_a_public_on_demand_chat_model(tmp_path):
    (model,) = load_deployments(write(tmp_path, "models: [{id: m, source: ./weights}]")).models
    assert (model.task, model.pinned, model.replicas, model.max_queue) == ("chat", False, 1, None)
    assert model.engine_kwargs() == {}
    assert model.limits is None
    assert (model.listing.visibility, model.listing.status) == ("public", "published")
    assert model.listing.price_micros() is None  # the stored price is left alone


def test_engine_kwargs_hold_only_what_the_file_sets_in_engine_units(tmp_path):
    path = write(
        tmp_path,
        """
        models:
          - id: m
            source: smollm2
            engine: {kv_cache_memory: 2G, max_num_seqs: 4, dtype: float32}
        """,
    )
    (model,) = load_deployments(path).models
    assert model.engine_kwargs() == {"dtype": "float32", "kv_cache_memory": 2 * 1024**3, "max_num_seqs": 4}


@pytest.mark.parametrize(
    ("price", "micros"),
    [
        ("free", (0, 0)),
        ('{input: "0.10", output: "2.5"}', (100_000, 2_500_000)),
        ("{input: 0.10, output: 3}", (100_000, 3_000_000)),  # YAML numbers, read exactly
        ("{input: 0, output: 0.000001}", (0, 1)),
    ],
)
def test_prices_are_exact_micros(tmp_path, price, micros):
    path = write(tmp_path, f"models: [{{id: m, source: s, listing: {{price: {price}}}}}]")
    assert load_deployments(path).models[0].listing.price_micros() == micros


def test_limits_override_only_what_they_set():
    server = CompletionLimits(default_max_tokens=1024, max_completion_tokens=4096)
    assert LimitSettings(max_completion_tokens=100).apply_to(server) == CompletionLimits(1024, 100)
    assert LimitSettings(default_max_tokens=None).apply_to(server) == CompletionLimits(None, 4096)


TWO_MODELS = """
models:
  - id: small
    source: s
  - id: qwen
    source: q
    {extra}
"""


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            "listing: {price: {input: -0.5, output: 1}}",
            "listing.price.input: must not be negative",
        ),
        (
            'listing: {price: {input: "1", output: "0.0000001"}}',
            "listing.price.output: '0.0000001' has more than 6 decimal places",
        ),
        (
            "listing: {price: cheap}",
            "listing.price: must be free or {input: ..., output: ...} (currency units per 1M tokens), "
            "not 'cheap'",
        ),
        ("engine: {max_seq_len: 100}", "engine.max_seq_len: unknown field; did you mean 'max_model_len'?"),
        ("colour: red", "colour: unknown field; expected one of: " + ", ".join(Deployment.model_fields)),
        ("replicas: '2'", "replicas: must be a valid integer, not '2'"),
        ("replicas: 0", "replicas: must be greater than or equal to 1, not 0"),
        ("task: chatbot", "task: must be 'chat' or 'embedding', not 'chatbot'"),
        (
            "autoscaling: {min_replicas: 3, max_replicas: 2}",
            "autoscaling.max_replicas: must be at least 1 and at least min_replicas (3), got 2",
        ),
        (
            "replicas: 3\n    autoscaling: {max_replicas: 2}",
            "replicas: must lie between autoscaling's min_replicas and max_replicas",
        ),
        (
            "pinned: true\n    autoscaling: {min_replicas: 0}",
            "autoscaling.min_replicas: 0 unloads an idle model; a pinned one never is",
        ),
        (
            "autoscaling: {target_in_flight: 0}",
            "autoscaling.target_in_flight: must be greater than or equal to 1, not 0",
        ),
        ("engine: {max_model_len: 8}", "engine.max_model_len: must be >= 16"),
        (
            "engine: {kv_cache_memory: 2 gigs}",
            "engine.kv_cache_memory: '2 gigs' is not a size such as 268435456, 512M or 2G",
        ),
        (
            "limits: {default_max_tokens: 0}",
            "limits.default_max_tokens: must be greater than or equal to 1, not 0",
        ),
        (
            "listing: {shared_with: [beta-co]}",
            "listing.shared_with: only with visibility: shared (visibility is public)",
        ),
        (
            "listing: {visibility: shared}",
            "listing.shared_with: must name at least one organization when visibility is shared",
        ),
        (
            "listing: {platform_fee_bps: 10001}",
            "listing.platform_fee_bps: must be less than or equal to 10000, not 10001",
        ),
        ("listing: {tags: [chat, '  ']}", "listing.tags[1]: must not be empty"),
    ],
)
def test_a_mistake_names_the_file_the_model_and_the_field(tmp_path, extra, message):
    assert (
        load_error(tmp_path, TWO_MODELS.format(extra=extra))
        == f"models.yaml: models[1] (id 'qwen'): {message}"
    )


@pytest.mark.parametrize(
    "field",
    [
        "engine: {dtype: float32}",
        "limits: {default_max_tokens: 8}",
        "replicas: 2",
        "autoscaling: {max_replicas: 2}",
    ],
)
def test_embedding_models_refuse_chat_settings(tmp_path, field):
    message = load_error(tmp_path, f"models:\n  - id: e\n    source: s\n    task: embedding\n    {field}\n")
    name = field.partition(":")[0]
    assert (
        message
        == f"models.yaml: models[0] (id 'e'): {name}: only chat models take it; remove it from this embedding model"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("models:\n  - id: a\n", "models.yaml: models[0] (id 'a'): source: is required"),
        (
            "models:\n  - {id: a, source: s}\n  - {id: a, source: t}\n",
            "models.yaml: models[1] (id 'a'): id: 'a' is already the id of models[0]",
        ),
        ("models: []\n", "models.yaml: models: must declare at least one model"),
        ("", "models.yaml: the file is empty; it must declare a `models:` list"),
        (
            "model:\n  - {id: a, source: s}\n",
            "models.yaml: models: is required\nmodels.yaml: model: unknown field; did you mean 'models'?",
        ),
        ("models:\n  - 5\n", "models.yaml: models[0]: must be a mapping (key: value lines), not 5"),
        (
            f"models: [{{id: {'x' * 201}, source: s}}]",
            f"models.yaml: models[0] (id '{'x' * 56}...): id: at most 200 characters",
        ),
        (
            'models: [{id: "bad\\ud800", source: s}]',
            "models.yaml: models[0] (id 'bad\\ud800'): id: must be valid Unicode text: it holds a lone "
            "surrogate (U+D800) at character 3",
        ),
    ],
)
def test_file_level_mistakes(tmp_path, text, message):
    assert load_error(tmp_path, text) == message


def test_yaml_errors_give_the_line(tmp_path):
    message = load_error(tmp_path, "models:\n  - id: a\n   source: s\n")
    assert message.startswith("models.yaml: line 3, column 4: YAML syntax error: ")


def test_a_repeated_key_is_refused_not_silently_overwritten(tmp_path):
    text = "models:\n  - id: a\n    source: s\n    listing:\n      price: free\n      price: {input: 1, output: 1}\n"
    assert (
        load_error(tmp_path, text)
        == "models.yaml: line 6, column 7: YAML syntax error: duplicate key 'price'"
    )


def test_every_mistake_is_reported_at_once(tmp_path):
    message = load_error(
        tmp_path, "models:\n  - {id: a, replicas: -1}\n  - {id: b, source: s, pinned: yes please}\n"
    )
    assert message.splitlines() == [
        "models.yaml: models[0] (id 'a'): source: is required",
        "models.yaml: models[0] (id 'a'): replicas: must be greater than or equal to 1, not -1",
        "models.yaml: models[1] (id 'b'): pinned: must be a valid boolean, not 'yes please'",
    ]


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read it: No such file or directory"):
        load_deployments(tmp_path / "nope.yaml")


def test_autoscaling_starts_each_load_at_its_minimum_unless_replicas_says_otherwise(tmp_path):
    path = write(
        tmp_path,
        """
        models:
          - {id: a, source: s, autoscaling: {min_replicas: 0, max_replicas: 3, scale_down_delay_s: 30}}
          - {id: b, source: s, replicas: 2, autoscaling: {min_replicas: 1, max_replicas: 4}}
          - {id: c, source: s, replicas: 2}
        """,
    )
    a, b, c = load_deployments(path).models
    assert (a.num_replicas, a.max_replicas, b.num_replicas, b.max_replicas) == (1, 3, 2, 4)
    assert a.autoscaling_policy() == Autoscaling(min_replicas=0, max_replicas=3, scale_down_delay_s=30)
    assert (c.num_replicas, c.max_replicas, c.autoscaling_policy()) == (2, 2, None)
