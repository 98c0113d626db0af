"""The whole-step decode kernel (models/cpu_decode_step.py) against the same kernels called one operator at a
time: bit for bit the same tokens and logprobs, in float32 and bfloat16, with grouped-query attention, q/k/v
biases, a sliding window, untied heads, batches of 1 to 10 decoding sequences and prompt tokens laid out as
queries over their own cache; and it leaves alone the steps and models it does not compute.
(tests/models/test_vs_transformers.py checks the default path, this one included, against transformers.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.models.cpu_decode_step import CpuDecodeStep

PROMPTS = [
    "Hello, my name is",
    "The capital of France is a city that",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15",
    "Once upon a time",
    "def fibonacci(n):",
    "The quick brown fox",
    "In the beginning",
    "A B C",
    "Lorem ipsum dolor sit amet, consectetur",
    "Water boils at",
]


@pytest.fixture(scope="module", params=["llama", "llama3", "qwen2", "mistral-window"])
def checkpoint(request, tmp_path_factory, smollm2_tokenizer) -> Path:
    from tests.tiny_models import build_tiny_model

    return build_tiny_model(request.param, tmp_path_factory.mktemp(request.param), smollm2_tokenizer)


def _generate(
    directory: Path,
    dtype: str,
    cpu_kernels: str,
    prompts: list[str],
    quantization: str = "none",
    query_rows: int | None = None,
) -> tuple[list, list[tuple[int, bool]], int]:
    """(each prompt's tokens and logprobs, each step's rows and whether the whole-step kernel took it, the
    most rows it takes). `query_rows`: lay out steps of up to that many tokens as the kernel's steps are."""
    llm = LLM(
        str(directory), dtype=dtype, block_size=4, num_blocks=512, cpu_kernels=cpu_kernels,
        quantization=quantization,
    )  # fmt: skip
    model = llm.engine.runner.model
    calls = []
    max_rows = 0
    if cpu_kernels == "kernel":
        step = model.decode_step
        if step is None:
            pytest.skip("this CPU has no few-row product kernel for this dtype")
        max_rows = step.max_rows

        def counted(x, *args):
            hidden = step(x, *args)
            calls.append((x.shape[0], hidden is not None))
            return hidden

        model.decode_step = counted
    else:
        assert model.decode_step is None
        llm.engine.runner.max_query_rows = query_rows or 0
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=3)
    outputs = llm.generate(prompts, params)
    answers = [
        (o.outputs[0].token_ids, [(lp.token_id, lp.logprob) for lp in o.outputs[0].logprobs or []])
        for o in outputs
    ]
    return answers, calls, max_rows


@pytest.mark.parametrize(
    ("dtype", "quantization"),
    [("float32", "none"), ("float32", "int8"), ("bfloat16", "none"), ("bfloat16", "int8")],
)
@pytest.mark.parametrize("num_prompts", [1, 3, 10, 40])
def test_whole_steps_equal_the_operators_one_by_one(checkpoint, dtype, quantization, num_prompts):
    """Every step of up to `max_rows` tokens goes through the kernel, prompt tokens included; the prompt
    step of 10 or 40 prompts (more rows than it takes) goes through the modules, and so do 40 decodes
    where the kernel takes fewer rows (int8 weights). Packed bfloat16 weights (AVX-512 BF16) take any number
    of rows: every step goes through the kernel."""
    prompts = (PROMPTS * 4)[:num_prompts]
    fused, calls, max_rows = _generate(checkpoint, dtype, "kernel", prompts, quantization)
    per_op, _, _ = _generate(checkpoint, dtype, "per-op", prompts, quantization, query_rows=max_rows)
    assert fused == per_op
    assert max_rows >= 8
    assert all(taken == (rows <= max_rows) for rows, taken in calls), calls
    # 12 tokens each: the first from the prompts' step, 11 from decode steps (all prompts end together).
    assert [rows for rows, _ in calls[1:]] == [num_prompts] * 11
    if num_prompts == 1:
        assert calls[0][1]  # the prompt's step: 5 tokens, each a query over the cache up to itself
    if num_prompts >= 10 and max_rows < sys.maxsize:
        assert calls[0][0] > max_rows


def test_models_and_steps_it_does_not_compute_go_through_the_modules(tmp_path, smollm2_tokenizer):
    from tests.tiny_models import build_tiny_model

    for architecture in ("gemma3", "qwen3"):  # their own norms and layers
        directory = build_tiny_model(architecture, tmp_path / architecture, smollm2_tokenizer)
        llm = LLM(str(directory), dtype="float32", num_blocks=64, cpu_kernels="kernel")
        assert llm.engine.runner.model.decode_step is None, architecture
    directory = build_tiny_model("llama", tmp_path / "llama", smollm2_tokenizer)
    llm = LLM(str(directory), dtype="float32", num_blocks=64, cpu_kernels="kernel", attention_backend="torch")
    assert llm.engine.runner.model.decode_step is None  # the torch attention backend: no kernel tables
    llm = LLM(str(directory), dtype="float32", num_blocks=64, cpu_kernels="kernel")
    assert isinstance(llm.engine.runner.model.decode_step, CpuDecodeStep)
