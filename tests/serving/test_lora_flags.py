"""`tokenmill serve --lora NAME=PATH[@BASE]`: the flag's forms, and the adapters refused at start with a
message naming the flag (a served adapter's greedy text is checked in tests/e2e/test_fine_tuning.py)."""

from __future__ import annotations

import json

import pytest

from tokenmill.config import ConfigError
from tokenmill.serving.fleet_setup import lora_models
from tokenmill.serving.served import ServedModel
from tokenmill.serving.settings import LoraSpec

SERVED = {"base": ServedModel("base", "chat", 2048), "embed": ServedModel("embed", "embedding", 512)}


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("bot=/a/b", LoraSpec("bot", "/a/b")),
        ("bot=/a/b@base", LoraSpec("bot", "/a/b", "base")),
        ("bot=/a@x/b@base", LoraSpec("bot", "/a@x/b", "base")),
    ],
)
def test_the_flag_names_the_model_the_adapter_and_maybe_its_base(text, spec):
    assert LoraSpec.parse(text) == spec


@pytest.mark.parametrize("text", ["bot", "=/a", "bot=", "bot=/a@", "bot=@base"])
def test_a_malformed_flag_is_refused(text):
    with pytest.raises(ConfigError, match="NAME=PATH"):
        LoraSpec.parse(text)


@pytest.fixture
def adapter(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    return tmp_path


def test_an_adapter_is_served_on_its_base(adapter):
    (served,) = lora_models([LoraSpec("bot", str(adapter))], SERVED).values()
    assert (served.model_id, served.base_model, served.context_length) == ("bot", "base", 2048)
    assert served.lora.name == "bot" and served.lora.path == str(adapter)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (LoraSpec("base", "{adapter}"), "used twice"),
        (LoraSpec("bot", "{adapter}", "embed"), "not a chat model"),
        (LoraSpec("bot", "{adapter}", "nope"), "not a chat model"),
        (LoraSpec("bot", "{adapter}/missing"), "not a PEFT adapter directory"),
    ],
)
def test_a_bad_adapter_stops_the_start(adapter, spec, message):
    spec = LoraSpec(spec.name, spec.path.format(adapter=adapter), spec.base)
    with pytest.raises(ConfigError, match=message):
        lora_models([spec], SERVED)


def test_the_base_must_be_named_when_several_chat_models_run(adapter):
    served = {**SERVED, "other": ServedModel("other", "chat", 1024)}
    with pytest.raises(ConfigError, match="name its base model"):
        lora_models([LoraSpec("bot", str(adapter))], served)
