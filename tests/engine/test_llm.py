"""The public engine API on a tiny random-weight Llama: sampling contracts, stop strings, n, bad input."""

from __future__ import annotations

import asyncio

import pytest

from tokenmill import LLM, AsyncLLM, SamplingParams
from tokenmill.config import ConfigError
from tokenmill.engine.sampling_params import InvalidRequestError
from tokenmill.models.errors import ModelLoadError

PROMPTS = ["Hello, my name is", "你好，世界", "The capital of France is", "1 2 3 4 5"]


@pytest.fixture(scope="module")
def llm(tiny_llama_dir) -> LLM:
    return LLM(str(tiny_llama_dir), dtype="float32", block_size=8, num_blocks=512)


def test_generate_accepts_text_token_ids_and_per_prompt_params(llm):
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (1, 5, 9, 3)]
    outputs = llm.generate(PROMPTS, params)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [1, 5, 9, 3]
    assert [o.prompt for o in outputs] == PROMPTS
    again = llm.generate([o.prompt_token_ids for o in outputs], params)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in outputs]
    for output in outputs:
        completion = output.outputs[0]
        assert completion.text == llm.tokenizer.decode(completion.token_ids, skip_special_tokens=True)


def test_seed_reproduces_regardless_of_batch_companions(llm):
    seeded = SamplingParams(temperature=3.0, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate(PROMPTS[0], seeded)[0].outputs[0].token_ids
    other = SamplingParams(temperature=3.0, max_tokens=20, ignore_eos=True)
    crowded = llm.generate(PROMPTS, [seeded, other, other, other])[0].outputs[0].token_ids
    assert alone == crowded
    different = llm.generate(
        PROMPTS[0], SamplingParams(temperature=3.0, seed=99, max_tokens=16, ignore_eos=True)
    )
    assert different[0].outputs[0].token_ids != alone


def test_n_samples_are_distinct_and_share_the_prompt(llm):
    output = llm.generate(
        PROMPTS[2], SamplingParams(n=3, temperature=3.0, seed=7, max_tokens=8, ignore_eos=True)
    )[0]
    assert [c.index for c in output.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in output.outputs}) == 3


def test_stop_string_is_cut_and_not_emitted(llm):
    free = llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))[
        0
    ].outputs[0]
    assert len(free.text) > 12
    stop = free.text[6:10]
    stopped = llm.generate(
        PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop])
    )[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop
    assert stopped.text == free.text[: free.text.index(stop)]
    assert stop not in stopped.text


def test_stop_token_ids_and_max_tokens(llm):
    free = llm.generate(PROMPTS[3], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))[
        0
    ].outputs[0]
    stop_token = free.token_ids[3]
    first = free.token_ids.index(stop_token)
    stopped = llm.generate(
        PROMPTS[3],
        SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, stop_token_ids=[stop_token]),
    )[0].outputs[0]
    assert stopped.token_ids == free.token_ids[: first + 1]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop_token
    assert free.finish_reason == "length"


def test_bad_requests_raise_before_any_work_and_leave_the_engine_clean(llm):
    engine = llm.engine
    with pytest.raises(InvalidRequestError) as err:
        llm.generate(["fine", "hello " * 600], SamplingParams(max_tokens=4))
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(max_tokens=0)
    assert err.value.param == "max_tokens"
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-5), dict(n=0), dict(logprobs=99)):
        with pytest.raises(InvalidRequestError) as err:
            SamplingParams(**bad)
        assert err.value.param == next(iter(bad))
    with pytest.raises(InvalidRequestError) as err:
        llm.generate([[1, 2, 10**9]], SamplingParams())
    assert err.value.param == "prompt"
    assert not engine.has_unfinished and engine.pool.num_free_blocks == engine.pool.num_blocks
    assert llm.generate("still works", SamplingParams(max_tokens=2, ignore_eos=True))[0].outputs[0].token_ids


def test_bad_models_and_settings_name_the_problem(tmp_path, tiny_llama_dir):
    with pytest.raises(ModelLoadError, match="does not exist|not found|no such"):
        LLM(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="config.json"):
        LLM(str(tmp_path))
    with pytest.raises(ConfigError, match="block_size"):
        LLM(str(tiny_llama_dir), block_size=3)
    with pytest.raises(ConfigError, match="no_such_setting"):
        LLM(str(tiny_llama_dir), no_such_setting=1)
    with pytest.raises(ConfigError, match="target_tpot_ms: must be from 0"):
        LLM(str(tiny_llama_dir), target_tpot_ms=-5)
    with pytest.raises(ConfigError, match="chat_template: must be Jinja template text"):
        LLM(str(tiny_llama_dir), chat_template=str(tmp_path / "no-such-template.jinja"))


def test_a_configured_chat_template_replaces_the_tokenizers(tmp_path, tiny_llama_dir):
    """What a base model without a template (Gemma 3 270M) is given to chat with: text or a file."""
    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant]"
    file = tmp_path / "plain.jinja"
    file.write_text(template)
    messages = [{"role": "user", "content": "hi"}]
    for setting in (template, str(file)):
        tokenizer = LLM(str(tiny_llama_dir), num_blocks=8, chat_template=setting).tokenizer
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert rendered == "[user] hi\n[assistant]"


async def test_async_stream_deltas_reassemble_and_abort_frees_blocks(tiny_llama_dir):
    engine = AsyncLLM(str(tiny_llama_dir), dtype="float32", block_size=8, num_blocks=64)
    await engine.start()
    try:
        params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
        snapshots = [out async for out in engine.generate(PROMPTS[1], params, "r1")]
        assert snapshots[-1].finished and not any(s.finished for s in snapshots[:-1])
        texts = [s.outputs[0].text for s in snapshots]
        assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:], strict=False))
        final = snapshots[-1].outputs[0]
        assert final.text == engine.tokenizer.decode(final.token_ids, skip_special_tokens=True)
        long = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
        stream = engine.generate("abort me", long, "r2")
        await anext(stream)
        assert engine.stats().num_free_blocks < 64
        await stream.aclose()
        for _ in range(200):  # the engine thread applies the abort before its next step
            if engine.stats().num_free_blocks == 64:
                break
            await asyncio.sleep(0.01)
        assert engine.stats().num_free_blocks == 64 and engine.stats().num_running_seqs == 0
        # An abort from outside ends the reader's stream with an "abort" snapshot, not a wait forever.
        stream = engine.generate("abort me from outside", long, "r2b")
        await anext(stream)
        await engine.abort("r2b")
        rest = await asyncio.wait_for(_collect(stream), timeout=60)
        assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"
        with pytest.raises(InvalidRequestError):
            await anext(engine.generate("x", SamplingParams(max_tokens=10**6), "r3"))
    finally:
        await engine.shutdown()


async def _collect(stream) -> list:
    return [out async for out in stream]
