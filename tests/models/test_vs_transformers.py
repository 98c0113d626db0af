"""The engine against transformers on the same random weights: greedy tokens identical (up to documented
near-ties), logprobs within 1e-4, under chunked prefill, preemption and prefix-cache hits."""

from __future__ import annotations

import random

import pytest
import torch

from tests.tiny_models import ARCHITECTURES, VOCAB_SIZE, build_tiny_model, load_reference
from tokenmill import LLM, SamplingParams
from tokenmill.models.attention import sliding_windows

PROMPT_LENGTHS = (3, 17, 40, 9, 64, 1, 25, 33)
MAX_TOKENS = 12
LOGPROB_TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def checkpoint(request, tmp_path_factory, smollm2_tokenizer):
    directory = tmp_path_factory.mktemp(request.param)
    build_tiny_model(request.param, directory, smollm2_tokenizer)
    return directory, load_reference(directory)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(1)
    return [[rng.randrange(VOCAB_SIZE) for _ in range(n)] for n in PROMPT_LENGTHS]


def _remembered(kind: str, hf_model, tokens: list[int], compute, *args):
    """The reference's answers, computed once per model and input (kept on the model, so they go with it):
    several tests compare against the same ones."""
    if not hasattr(hf_model, "tokenmill_answers"):
        hf_model.tokenmill_answers = {}
    key = (kind, tuple(tokens), *args)
    if key not in hf_model.tokenmill_answers:
        hf_model.tokenmill_answers[key] = compute(hf_model, tokens, *args)
    return hf_model.tokenmill_answers[key]


def reference_logprobs(hf_model, tokens: list[int]) -> torch.Tensor:
    """log_softmax of the reference logits at every position of `tokens`."""
    return _remembered("logprobs", hf_model, tokens, _reference_logprobs)


def reference_greedy(hf_model, prompt: list[int], max_tokens: int) -> list[int]:
    return list(_remembered("greedy", hf_model, prompt, _reference_greedy, max_tokens))


def _reference_logprobs(hf_model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = hf_model(torch.tensor([tokens])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def _reference_greedy(hf_model, prompt: list[int], max_tokens: int) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def assert_matches_reference(hf_model, prompt: list[int], ours, max_tokens: int = MAX_TOKENS) -> None:
    """Identical greedy ids; the only tolerated divergence is a near-tie (each side's token is the other's
    runner-up with logprobs within 1e-4), after which the sequence is not compared further."""
    ref = reference_greedy(hf_model, prompt, max_tokens)
    mine = ours.token_ids
    for i, (a, b) in enumerate(zip(ref, mine, strict=True)):
        if a != b:
            ref_lp = reference_logprobs(hf_model, prompt + ref[:i])[-1]
            top2 = ref_lp.topk(2)
            assert set(top2.indices.tolist()) == {a, b}, f"position {i}: {b} is not the reference runner-up"
            assert abs(ref_lp[a] - ref_lp[b]) < LOGPROB_TOLERANCE, f"position {i}: not a near-tie"
            ours_top = dict(ours.logprobs[i].top)
            assert a in ours_top and abs(ours_top[a] - ours_top[b]) < LOGPROB_TOLERANCE
            return
    # Top-1 logprobs along the way equal the reference's.
    ref_lp = reference_logprobs(hf_model, prompt + ref)
    for i, token_lp in enumerate(ours.logprobs):
        expected = ref_lp[len(prompt) - 1 + i, ref[i]].item()
        assert token_lp.logprob == pytest.approx(expected, abs=LOGPROB_TOLERANCE)


GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2)


@pytest.mark.parametrize("backend", ["kernel", "torch"])
def test_greedy_batch_equals_transformers(checkpoint, prompts, backend):
    """With the C kernels (decode attention, fused residual + RMSNorm and rotary) and with torch ops only."""
    directory, hf_model = checkpoint
    llm = LLM(
        str(directory),
        dtype="float32",
        block_size=8,
        num_blocks=256,
        attention_backend=backend,
        cpu_kernels=backend,
    )
    outputs = llm.generate(prompts, GREEDY)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.prompt_token_ids == prompt
        assert output.outputs[0].finish_reason == "length"
        assert_matches_reference(hf_model, prompt, output.outputs[0])


@pytest.mark.parametrize("backend", ["kernel", "torch"])
def test_chunked_prefill_and_preemption_give_the_same_tokens(checkpoint, prompts, backend):
    directory, hf_model = checkpoint
    # 8 tokens per step forces chunked prefill; 24 blocks of 4 cannot hold every sequence at once (nor 10
    # when every layer attends through a window: sequences then hold a window of blocks each).
    config = hf_model.config
    windowed = None not in sliding_windows(config, config.num_hidden_layers)
    num_blocks = 10 if windowed else 24
    llm = LLM(
        str(directory),
        dtype="float32",
        block_size=4,
        num_blocks=num_blocks,
        max_num_batched_tokens=8,
        attention_backend=backend,
        cpu_kernels=backend,
    )
    outputs = llm.generate(prompts, GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0
    for prompt, output in zip(prompts, outputs, strict=True):
        assert_matches_reference(hf_model, prompt, output.outputs[0])
    llm.engine.pool.check_invariants()
    assert llm.engine.pool.num_free_blocks == num_blocks


def test_prefix_cache_hits_give_the_same_outputs_as_misses(checkpoint, prompts):
    directory, _ = checkpoint
    system = prompts[4]  # 64 tokens shared by every prompt
    shared = [system + p for p in prompts[:4]]
    cold = LLM(str(directory), dtype="float32", block_size=8, num_blocks=256, enable_prefix_caching=False)
    warm = LLM(str(directory), dtype="float32", block_size=8, num_blocks=256)
    expected = [o.outputs[0].token_ids for o in cold.generate(shared, GREEDY)]
    warm.generate(shared[:1], GREEDY)
    got = [o.outputs[0].token_ids for o in warm.generate(shared, GREEDY)]
    assert warm.engine.stats().num_cached_prompt_tokens >= 4 * 64
    assert got == expected


def test_bfloat16_runs_and_mostly_agrees(checkpoint, prompts):
    directory, hf_model = checkpoint
    llm = LLM(str(directory), dtype="bfloat16", block_size=8, num_blocks=256)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    first_tokens_equal = sum(
        o.outputs[0].token_ids[0] == reference_greedy(hf_model, p, 1)[0]
        for p, o in zip(prompts, outputs, strict=True)
    )
    assert first_tokens_equal >= len(prompts) - 2
