"""Sliding-window attention end to end: a Mistral whose window is far shorter than the context answers like
transformers (which attends through the window), while the engine keeps only about a window of KV per
sequence, so contexts longer than the whole KV pool are served."""

from __future__ import annotations

import random

import pytest

from tests.models.test_vs_transformers import assert_matches_reference
from tests.tiny_models import VOCAB_SIZE, build_tiny_model, load_reference
from tokenmill import SamplingParams
from tokenmill.engine.llm_engine import LLM

WINDOW = 16
BLOCK_SIZE = 8
NUM_BLOCKS = 12  # 96 tokens of KV: less than one context below


@pytest.fixture(scope="module")
def mistral(tmp_path_factory, smollm2_tokenizer):
    directory = tmp_path_factory.mktemp("mistral-window")
    build_tiny_model("mistral-window", directory, smollm2_tokenizer, sliding_window=WINDOW)
    return directory, load_reference(directory)


@pytest.fixture(scope="module")
def long_prompts() -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(VOCAB_SIZE) for _ in range(n)] for n in (150, 97, 40)]


def _engine(directory, backend: str, num_blocks: int = NUM_BLOCKS, **kwargs) -> LLM:
    return LLM(
        str(directory),
        dtype="float32",
        block_size=BLOCK_SIZE,
        num_blocks=num_blocks,
        max_num_batched_tokens=32,
        attention_backend=backend,
        cpu_kernels=backend,
        **kwargs,
    )


def _generate_tracking_blocks(llm: LLM, prompts, params) -> tuple[list, int]:
    """Outputs in prompt order and the most KV blocks in use at any step."""
    engine = llm.engine
    for index, prompt in enumerate(prompts):
        engine.add_request(f"r{index}", prompt, params)
    finished, peak = {}, 0
    while engine.has_unfinished:
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
        in_use = sum(1 for count in engine.pool.ref_counts if count > 0)
        peak = max(peak, in_use)
    return [finished[f"r{i}"] for i in range(len(prompts))], peak


@pytest.mark.parametrize("backend", ["kernel", "torch"])
def test_long_context_equals_transformers_with_kv_bounded_by_the_window(mistral, long_prompts, backend):
    directory, hf_model = mistral
    llm = _engine(directory, backend)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)
    outputs, peak = _generate_tracking_blocks(llm, long_prompts, params)
    assert len(long_prompts[0]) + 24 > NUM_BLOCKS * BLOCK_SIZE  # a context longer than the whole pool
    for prompt, output in zip(long_prompts, outputs, strict=True):
        assert_matches_reference(hf_model, prompt, output.outputs[0], max_tokens=24)
    # Prefill chunks of 32 plus the window before them: a handful of blocks, whatever the context length.
    assert peak <= NUM_BLOCKS
    assert llm.engine.pool.num_free_blocks == NUM_BLOCKS
    llm.engine.pool.check_invariants()


def test_one_sequence_holds_about_a_window_of_blocks(mistral):
    directory, _ = mistral
    llm = _engine(directory, "kernel", enable_prefix_caching=False)
    prompt = list(range(1000, 1200))
    _, peak = _generate_tracking_blocks(llm, [prompt], SamplingParams(max_tokens=60, ignore_eos=True))
    # The window (16) and one 32-token chunk, each end possibly in a partial block: at most 7 of 8 tokens.
    assert peak <= -(-(WINDOW - 1 + 32) // BLOCK_SIZE) + 1
    assert peak < (200 + 60) // BLOCK_SIZE


def test_prefix_cache_hits_past_the_window_give_the_same_tokens(mistral, long_prompts):
    directory, _ = mistral
    shared = [long_prompts[0][:120] + tail for tail in ([5, 6, 7], [8, 9], [10])]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    cold = _engine(directory, "kernel", enable_prefix_caching=False).generate(shared, params)
    # A pool that keeps the whole shared prefix cached once its blocks slide out of the window.
    warm = _engine(directory, "kernel", num_blocks=64)
    warm.generate(shared[:1], params)
    got = warm.generate(shared, params)
    assert warm.engine.stats().num_cached_prompt_tokens >= 100
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in cold]
    warm.engine.pool.check_invariants()
