"""The LoRA trainer: on a tiny random Llama it learns, reports every step in order, stops when asked, resumes
from a checkpoint to the very adapter an uninterrupted run makes, and writes an adapter peft (and the serving
engine) load. (The real SmolLM2 learning a fact: tests/e2e/test_fine_tuning.py.)"""

from __future__ import annotations

import json
from dataclasses import FrozenInstanceError

import pytest
import torch
from safetensors.torch import load_file

from tokenmill.jobs.hyperparameters import BASE_LEARNING_RATE, Hyperparameters, InvalidHyperparameters
from tokenmill.jobs.trainer import (
    TrainingProgress,
    UnsupportedBaseModel,
    check_base_model,
    load_base_model,
    train_lora,
)
from tokenmill.jobs.training_data import TrainingSet, parse_chat_jsonl, render_prompt

HYPER = Hyperparameters(n_epochs=3, batch_size=4, learning_rate_multiplier=2.0, seed=1)


def chat_set(tokenizer, n: int, offset: int = 0) -> TrainingSet:
    lines = [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"What is the code of door {i}?"},
                    {"role": "assistant", "content": f"Door {i} opens with code {i * 7 % 10}{i % 3}."},
                ]
            }
        )
        for i in range(offset, offset + n)
    ]
    return parse_chat_jsonl("\n".join(lines).encode(), tokenizer, 512, min_examples=1)


@pytest.fixture(scope="module")
def train_set(smollm2_tokenizer) -> TrainingSet:
    return chat_set(smollm2_tokenizer, 10)


@pytest.fixture(scope="module")
def valid_set(smollm2_tokenizer) -> TrainingSet:
    return chat_set(smollm2_tokenizer, 3, offset=50)


@pytest.fixture(scope="module")
def full_run(tiny_llama_dir, train_set, valid_set, tmp_path_factory):
    events: list[TrainingProgress] = []
    out = tmp_path_factory.mktemp("full-run")
    result = train_lora(str(tiny_llama_dir), train_set, valid_set, HYPER, out, events.append, lambda: False)
    return result, events, out


def test_progress_arrives_for_every_step_in_order(full_run, train_set):
    result, events, _ = full_run
    assert [e.step for e in events] == list(range(1, 10))  # 3 epochs x ceil(10 / 4) steps
    assert {e.total_steps for e in events} == {9}
    assert [e.epoch for e in events] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert [e.valid_loss is not None for e in events] == [False, False, True] * 3
    assert [e.checkpoint is not None for e in events] == [False, False, True] * 3
    tokens = [e.trained_tokens for e in events]
    assert tokens == sorted(tokens)
    assert tokens[2] == tokens[5] - tokens[2] == train_set.num_tokens  # an epoch reads every token once
    assert result.trained_tokens == 3 * train_set.num_tokens
    assert not result.cancelled
    assert result.steps == 9


def test_loss_decreases(full_run):
    result, events, _ = full_run
    epoch_losses = [c.train_loss for c in result.checkpoints]
    assert epoch_losses[0] > epoch_losses[1] > epoch_losses[2]
    valid_losses = [e.valid_loss for e in events if e.valid_loss is not None]
    assert valid_losses[-1] < valid_losses[0]
    assert result.final_valid_loss == pytest.approx(valid_losses[-1])
    assert result.final_train_loss == epoch_losses[-1]


def test_checkpoints_are_adapters_at_each_epoch_end(full_run):
    result, events, out = full_run
    assert [c.step for c in result.checkpoints] == [3, 6, 9]
    assert [c.path for c in result.checkpoints] == [out / "checkpoints" / f"step-{n}" for n in (3, 6, 9)]
    assert [e.checkpoint for e in events if e.checkpoint] == list(result.checkpoints)
    for checkpoint in result.checkpoints:
        assert (checkpoint.path / "adapter_config.json").is_file()
        assert (checkpoint.path / "adapter_model.safetensors").is_file()


def test_the_adapter_is_peft_format_and_changes_the_outputs(full_run, tiny_llama_dir, smollm2_tokenizer):
    from peft import PeftModel

    result, _, out = full_run
    assert result.adapter_dir == out / "adapter"
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert (config["r"], config["lora_alpha"]) == (8, 16.0)
    assert set(config["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    keys = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    assert len(keys) == 2 * 7 * 2  # A and B, 7 modules, 2 layers

    ids = torch.tensor([render_prompt(smollm2_tokenizer, [{"role": "user", "content": "Which door?"}])])
    base = load_base_model(str(tiny_llama_dir)).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
        tuned = PeftModel.from_pretrained(base, result.adapter_dir).eval()
        tuned_logits = tuned(ids).logits
    assert not torch.allclose(base_logits, tuned_logits, atol=1e-3)


def test_the_serving_engine_accepts_the_adapter(full_run, tiny_llama_dir):
    from tokenmill.engine.lora import LoRARequest, read_adapter

    result, _, _ = full_run
    base = load_base_model(str(tiny_llama_dir))
    layer = base.model.layers[0]
    modules = {**dict(layer.self_attn.named_children()), **dict(layer.mlp.named_children())}
    shapes = {
        name: (m.in_features, m.out_features) for name, m in modules.items() if isinstance(m, torch.nn.Linear)
    }
    spec = read_adapter(LoRARequest("ft", str(result.adapter_dir)), shapes, num_layers=2, max_rank=64)
    assert spec.rank == 8
    assert len(spec.modules) == 14


def test_should_stop_cancels_between_steps(tiny_llama_dir, train_set, tmp_path):
    events: list[TrainingProgress] = []
    result = train_lora(
        str(tiny_llama_dir), train_set, None, HYPER, tmp_path, events.append, lambda: len(events) >= 2
    )
    assert result.cancelled
    assert result.steps == 2
    assert [e.step for e in events] == [1, 2]
    assert result.trained_tokens == events[-1].trained_tokens > 0
    assert result.final_train_loss == events[-1].train_loss
    assert result.adapter_dir is None
    assert result.checkpoints == ()
    assert not (tmp_path / "adapter").exists()


def test_resuming_from_a_checkpoint_ends_with_the_uninterrupted_adapter(
    tiny_llama_dir, train_set, valid_set, tmp_path
):
    hyper = Hyperparameters(
        n_epochs=2, batch_size=3, lora_dropout=0.1, seed=7
    )  # dropout draws random numbers
    whole = train_lora(
        str(tiny_llama_dir), train_set, valid_set, hyper, tmp_path / "whole", lambda e: None, lambda: False
    )
    first: list[TrainingProgress] = []
    cut = train_lora(
        str(tiny_llama_dir),
        train_set,
        valid_set,
        hyper,
        tmp_path / "cut",
        first.append,
        lambda: bool(first) and first[-1].checkpoint is not None,
    )
    assert cut.cancelled
    assert [c.step for c in cut.checkpoints] == [4]
    rest: list[TrainingProgress] = []
    resumed = train_lora(
        str(tiny_llama_dir),
        train_set,
        valid_set,
        hyper,
        tmp_path / "cut",
        rest.append,
        lambda: False,
        resume_from=cut.checkpoints[0].path,
    )
    assert [e.step for e in rest] == [5, 6, 7, 8]
    assert resumed.steps == whole.steps == 8
    assert resumed.trained_tokens == whole.trained_tokens
    assert [c.step for c in resumed.checkpoints] == [4, 8]
    assert resumed.final_valid_loss == pytest.approx(whole.final_valid_loss, rel=1e-5)
    expected = load_file(whole.adapter_dir / "adapter_model.safetensors")
    actual = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6)


def test_resuming_with_other_data_is_refused(tiny_llama_dir, train_set, smollm2_tokenizer, tmp_path):
    events: list[TrainingProgress] = []
    hyper = Hyperparameters(n_epochs=2, batch_size=5)
    cut = train_lora(
        str(tiny_llama_dir),
        train_set,
        None,
        hyper,
        tmp_path,
        events.append,
        lambda: bool(events) and events[-1].checkpoint is not None,
    )
    with pytest.raises(ValueError, match="another base model, data set or hyperparameters"):
        train_lora(
            str(tiny_llama_dir),
            chat_set(smollm2_tokenizer, 10, offset=20),
            None,
            hyper,
            tmp_path,
            events.append,
            lambda: False,
            resume_from=cut.checkpoints[0].path,
        )


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_architectures_train(arch, smollm2_tokenizer, train_set, tmp_path):
    from tests.tiny_models import build_tiny_model

    model_dir = build_tiny_model(arch, tmp_path / arch, smollm2_tokenizer)
    check_base_model(str(model_dir))
    hyper = Hyperparameters(n_epochs=1, batch_size=5, lora_rank=4, target_modules=("q_proj", "v_proj"))
    result = train_lora(
        str(model_dir), train_set, None, hyper, tmp_path / "out", lambda e: None, lambda: False
    )
    assert result.steps == 2
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


def test_base_models_that_cannot_be_fine_tuned_are_refused_up_front(tmp_path, train_set):
    from transformers import BertConfig, BertModel

    bert_dir = tmp_path / "minilm"
    BertModel(
        BertConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
        )
    ).save_pretrained(bert_dir)
    with pytest.raises(UnsupportedBaseModel, match="BertModel"):
        check_base_model(str(bert_dir))
    with pytest.raises(UnsupportedBaseModel, match="does not exist"):
        check_base_model(str(tmp_path / "nowhere"))
    events: list[TrainingProgress] = []
    with pytest.raises(UnsupportedBaseModel):
        train_lora(str(bert_dir), train_set, None, HYPER, tmp_path / "out", events.append, lambda: False)
    assert events == []
    assert issubclass(UnsupportedBaseModel, ValueError)


def test_check_base_model_accepts_the_tiny_llama(tiny_llama_dir):
    check_base_model(str(tiny_llama_dir))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_epochs", 0),
        ("n_epochs", "many"),
        ("n_epochs", True),
        ("batch_size", 0),
        ("batch_size", 2.5),
        ("learning_rate_multiplier", 0),
        ("learning_rate_multiplier", -1.0),
        ("learning_rate_multiplier", float("nan")),
        ("lora_rank", 0),
        ("lora_rank", 65),
        ("lora_alpha", 0),
        ("lora_dropout", 1.0),
        ("target_modules", ()),
        ("target_modules", ("q_proj", "lm_head")),
        ("target_modules", "q_proj"),
        ("seed", -1),
    ],
)
def test_invalid_hyperparameters_name_the_field(field, value):
    with pytest.raises(InvalidHyperparameters, match=f"hyperparameters.{field}:") as caught:
        Hyperparameters(**{field: value})
    assert caught.value.field == field
    assert isinstance(caught.value, ValueError)


def test_auto_hyperparameters_resolve_to_numbers():
    auto = Hyperparameters()
    with pytest.raises(FrozenInstanceError):
        auto.n_epochs = 2  # type: ignore[misc]
    tiny = auto.resolved(10)
    assert (tiny.n_epochs, tiny.batch_size, tiny.learning_rate_multiplier) == (3, 2, 1.0)
    small = auto.resolved(20)
    assert (small.n_epochs, small.batch_size) == (3, 4)
    large = auto.resolved(5000)
    assert (large.n_epochs, large.batch_size) == (3, 8)
    few = auto.resolved(3)
    assert (few.n_epochs, few.batch_size) == (5, 1)
    assert small.learning_rate == BASE_LEARNING_RATE
    chosen = Hyperparameters(n_epochs=2, batch_size=16, learning_rate_multiplier=0.5).resolved(20)
    assert (chosen.n_epochs, chosen.batch_size, chosen.learning_rate) == (2, 16, BASE_LEARNING_RATE / 2)
    with pytest.raises(ValueError, match="resolved"):
        _ = auto.learning_rate
