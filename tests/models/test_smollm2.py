"""The built-in real model (SmolLM2-135M-Instruct GGUF): tokenmill's greedy chat answers equal transformers'
for the same file, and it knows the capital of France."""

from __future__ import annotations

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.models.errors import ModelLoadError
from tokenmill.models.loader import resolve_model

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "How many legs does a spider have?",
]


@pytest.fixture(scope="module")
def source():
    try:
        return resolve_model("smollm2")
    except ModelLoadError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def llm(source) -> LLM:
    return LLM("smollm2", dtype="float32", kv_cache_memory=256 << 20)


def chat_prompt(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )


def test_greedy_chat_equals_transformers_on_the_same_gguf(llm, source):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(
        source.path, gguf_file=source.gguf_file, dtype=torch.float32
    )
    prompts = [chat_prompt(llm.tokenizer, q) for q in QUESTIONS]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=32))
    for prompt, output in zip(prompts, outputs, strict=True):
        ids = torch.tensor([output.prompt_token_ids])
        with torch.no_grad():
            ref = reference.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False
            )
        ref_tokens = ref[0, ids.shape[1] :].tolist()
        # Both sides include the end-of-turn token when the answer ends before max_tokens.
        assert output.outputs[0].token_ids == ref_tokens, prompt


def test_answers_paris(llm):
    prompt = chat_prompt(llm.tokenizer, QUESTIONS[0])
    answer = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=24))[0].outputs[0]
    assert "Paris" in answer.text
    assert answer.finish_reason == "stop"


def test_bfloat16_with_the_cpu_kernels_knows_its_facts(source):
    """The serving default on a CPU: bfloat16 weights, decode products by the few-row kernel. Its
    numerics are tested against torch elsewhere (tests/models/test_cpu_ops.py); here the real model still
    answers what it knows."""
    from tokenmill.models.cpu_ops import CpuKernelOps

    llm = LLM("smollm2", dtype="bfloat16", kv_cache_memory=64 << 20)
    ops = llm.engine.runner.model.ops
    if not isinstance(ops, CpuKernelOps) or torch.bfloat16 not in ops.gemms:
        pytest.skip("this CPU lacks AVX-512 and AVX2: bfloat16 products run on torch")
    prompts = [chat_prompt(llm.tokenizer, q) for q in (QUESTIONS[0], QUESTIONS[3])]
    capital, legs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24))
    assert "Paris" in capital.outputs[0].text
    assert "8" in legs.outputs[0].text or "eight" in legs.outputs[0].text


def test_int8_weights_keep_the_perplexity_within_2_percent_and_the_facts(source, tmp_path):
    from tokenmill.bench import quality

    result = quality.main(["--output", str(tmp_path / "quality.json")])
    assert result["scored_tokens"] > 500
    assert result["perplexity_ratio"] < 1.02, result
    llm = LLM("smollm2", dtype="bfloat16", quantization="int8", kv_cache_memory=64 << 20)
    answer = llm.generate(
        chat_prompt(llm.tokenizer, QUESTIONS[0]), SamplingParams(temperature=0.0, max_tokens=24)
    )
    assert "Paris" in answer[0].outputs[0].text
