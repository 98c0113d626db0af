"""Structured output on a tiny random-weight Llama: its free output is gibberish, so every valid output
below is the grammar's doing, token by token, whatever the batch, cache, preemption or n."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import numpy as np
import pytest

from tokenmill import LLM, AsyncLLM, SamplingParams
from tokenmill.engine.guidance import unpack_bitmask
from tokenmill.engine.sampler import Sampler
from tokenmill.engine.sampling_params import Guidance, InvalidRequestError

PROMPTS = ["Hello, my name is", "你好，世界", "The capital of France is", "1 2 3 4 5"]
SHARED_PREFIX = "You are a careful assistant. Answer with one JSON object that matches the schema below. "
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "kind": {"enum": ["cat", "dog", "fish"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "score": {"type": "number", "minimum": -1, "maximum": 1, "multipleOf": 0.25},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
        "owner": {
            "type": "object",
            "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9}, "vip": {"type": "boolean"}},
            "required": ["id", "vip"],
            "additionalProperties": False,
        },
        "note": {"type": "string", "maxLength": 3},
    },
    "required": ["name", "kind", "age", "score", "tags", "owner"],
    "additionalProperties": False,
}
"""Nested, with every kind of bound. Strings are short and the number has a multipleOf: an unbounded
string or fraction lets a random model run to max_tokens (a grammar can only make it valid, not short)."""
MAX_TOKENS = 80
EOS = 2  # the tiny models' eos_token_id
TOKEN_QUOTE, TOKEN_CLOSE_BRACE = 18, 109  # '"' and '}' in the SmolLM2 vocabulary


def schema_params(seed: int, **overrides: object) -> SamplingParams:
    settings: dict[str, object] = dict(
        temperature=1.0, seed=seed, max_tokens=MAX_TOKENS, guidance=Guidance.json_schema(SCHEMA)
    )
    return SamplingParams(**{**settings, **overrides})


def assert_valid(completion) -> None:
    assert completion.finish_reason == "stop", completion.text
    jsonschema.validate(json.loads(completion.text), SCHEMA)


@pytest.fixture(scope="module")
def llm(tiny_llama_dir) -> LLM:
    return LLM(str(tiny_llama_dir), dtype="float32", block_size=8, num_blocks=512)


def test_bitmask_unpacks_in_token_order():
    rng = np.random.default_rng(0)
    vocab_size = 100  # not a multiple of 32: the last word is partly padding
    bitmask = rng.integers(-(2**31), 2**31, size=(3, 4), dtype=np.int64).astype(np.int32)
    expected = [[bool((int(row[t // 32]) >> (t % 32)) & 1) for t in range(vocab_size)] for row in bitmask]
    assert unpack_bitmask(bitmask, vocab_size).tolist() == expected


def test_100_sampled_requests_all_match_a_nested_schema(llm):
    outputs = llm.generate([PROMPTS[i % 4] for i in range(100)], [schema_params(seed) for seed in range(100)])
    for output in outputs:
        assert_valid(output.outputs[0])
        assert len(output.outputs[0].token_ids) < MAX_TOKENS
    assert len({output.outputs[0].text for output in outputs}) > 50  # sampled, not one forced answer


def test_json_object_choice_and_regex_outputs_always_match(llm):
    # Free JSON strings never end on a random model; a bias towards the tokens made of '"' and '}' ends
    # most of them. It comes after the mask, so it cannot put a '}' where the grammar forbids one.
    closers = {
        tid: 10.0 for token, tid in llm.tokenizer.get_vocab().items() if token and set(token) <= set('"}')
    }
    objects = llm.generate(
        PROMPTS * 5,
        [
            SamplingParams(
                temperature=1.0, seed=s, max_tokens=48, logit_bias=closers, guidance=Guidance.json_object()
            )
            for s in range(20)
        ],
    )
    completions = [output.outputs[0] for output in objects]
    complete = [c for c in completions if c.finish_reason == "stop"]
    assert len(complete) >= 10
    assert all(isinstance(json.loads(c.text), dict) for c in complete)
    for truncated in (c for c in completions if c.finish_reason == "length"):
        assert truncated.text.startswith("{")
        with pytest.raises(json.JSONDecodeError):
            json.loads(truncated.text)

    options = ['say "hi"', "back\\slash", "(a|b)*", "[.]+?", "ünï 日本", "yes", "no"]
    choice = Guidance.choice(options, "guided_choice")
    chosen = llm.generate(
        PROMPTS * 5,
        [SamplingParams(temperature=1.0, seed=s, max_tokens=16, guidance=choice) for s in range(20)],
    )
    texts = [output.outputs[0].text for output in chosen]
    assert set(texts) <= set(options) and len(set(texts)) >= 3
    assert all(output.outputs[0].finish_reason == "stop" for output in chosen)

    pattern = r"\d{3}-[a-z]{2,4}"
    regex = Guidance.regex(pattern, "guided_regex")
    matched = llm.generate(
        PROMPTS * 5,
        [SamplingParams(temperature=1.0, seed=s, max_tokens=16, guidance=regex) for s in range(20)],
    )
    for output in matched:
        assert output.outputs[0].finish_reason == "stop"
        assert re.fullmatch(pattern, output.outputs[0].text), output.outputs[0].text


def test_greedy_constrained_row_and_raw_logprobs(llm):
    free = llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=4, logprobs=3))[0].outputs[0]
    guided = llm.generate(
        PROMPTS[0],
        SamplingParams(
            temperature=0.0, max_tokens=MAX_TOKENS, logprobs=3, guidance=Guidance.json_schema(SCHEMA)
        ),
    )[0].outputs[0]
    assert_valid(guided)
    assert guided.token_ids[0] != free.token_ids[0]  # the model alone would not start a JSON object
    # Logprobs are the model's own distribution, not the masked one.
    assert guided.logprobs[0].top == free.logprobs[0].top
    assert guided.logprobs[0].logprob < free.logprobs[0].logprob


def token_ids(outputs) -> list[list[int]]:
    return [output.outputs[0].token_ids for output in outputs]


def test_constrained_outputs_are_the_same_with_and_without_prefix_cache(llm, tiny_llama_dir):
    prompts = [SHARED_PREFIX + p for p in PROMPTS]
    params = [schema_params(seed) for seed in range(len(prompts))]
    first = llm.generate(prompts, params)
    cached = llm.generate(prompts, params)
    assert all(output.num_cached_tokens > 0 for output in cached)
    no_cache = LLM(
        str(tiny_llama_dir), dtype="float32", block_size=8, num_blocks=512, enable_prefix_caching=False
    )
    uncached = no_cache.generate(prompts, params)
    assert token_ids(cached) == token_ids(first) == token_ids(uncached)
    for output in first:
        assert_valid(output.outputs[0])
    assert not llm.engine.guided.active and not no_cache.engine.guided.active  # every matcher freed


def test_constrained_outputs_survive_preemption(llm, tiny_llama_dir):
    params = [schema_params(seed) for seed in range(len(PROMPTS))]
    roomy = llm.generate(PROMPTS, params)
    # Room for about two of the four sequences: the others are preempted and recomputed mid-output.
    tight = LLM(
        str(tiny_llama_dir), dtype="float32", block_size=8, num_blocks=12, enable_prefix_caching=False
    )
    preempted = tight.generate(PROMPTS, params)
    assert tight.engine.scheduler.num_preemptions > 0
    assert token_ids(preempted) == token_ids(roomy)
    for output in preempted:
        assert_valid(output.outputs[0])
    assert not tight.engine.guided.active


def test_n_samples_each_follow_the_grammar(llm):
    output = llm.generate(PROMPTS[1], schema_params(seed=11, n=6))[0]
    assert [c.index for c in output.outputs] == list(range(6))
    for completion in output.outputs:
        assert_valid(completion)
    assert len({c.text for c in output.outputs}) > 1


def test_max_tokens_first_is_length_and_ignore_eos_still_stops_on_a_complete_grammar(llm):
    short = llm.generate(PROMPTS[2], schema_params(seed=3, max_tokens=8))[0].outputs[0]
    assert short.finish_reason == "length" and len(short.token_ids) == 8
    with pytest.raises(json.JSONDecodeError):
        json.loads(short.text)

    assert_valid(llm.generate(PROMPTS[2], schema_params(seed=3, ignore_eos=True))[0].outputs[0])
    # "a" and "ab" can end with EOS or go on: with ignore_eos an accepted EOS still completes the grammar.
    choice = Guidance.choice(["a", "ab", "abc"], "guided_choice")
    params = [
        SamplingParams(
            temperature=1.0, seed=s, max_tokens=10, ignore_eos=True, logit_bias={EOS: 5.0}, guidance=choice
        )
        for s in range(12)
    ]
    outputs = [output.outputs[0] for output in llm.generate(PROMPTS * 3, params)]
    assert all(c.finish_reason == "stop" and c.text in ("a", "ab", "abc") for c in outputs)
    ended_by_eos = [c for c in outputs if c.token_ids[-1] == EOS]
    assert ended_by_eos and all(c.token_ids.count(EOS) == 1 for c in ended_by_eos)


def test_stop_strings_still_end_a_constrained_output(llm):
    full = llm.generate(PROMPTS[0], schema_params(seed=2))[0].outputs[0]
    assert_valid(full)
    stopped = llm.generate(PROMPTS[0], schema_params(seed=2, stop=['"age"']))[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == '"age"'
    assert stopped.text == full.text[: full.text.index('"age"')]
    assert not llm.engine.guided.active


def test_invalid_grammars_are_refused_before_anything_is_queued(llm):
    engine = llm.engine
    bad = [
        (Guidance.json_schema({"type": "no-such-type"}, "response_format"), "response_format"),
        (Guidance.json_schema({"type": "string", "format": "no-such-format"}, "schema"), "schema"),
        (Guidance.regex("(unclosed", "guided_regex"), "guided_regex"),
    ]
    for guidance, param in bad:
        with pytest.raises(InvalidRequestError) as err:
            engine.check_guidance(guidance)
        assert err.value.param == param and err.value.code == "invalid_grammar"
        assert err.value.message.startswith(f"{param}: ")
        good = SamplingParams(max_tokens=4, guidance=Guidance.json_object())
        with pytest.raises(InvalidRequestError) as err:
            llm.generate(PROMPTS[:2], [good, SamplingParams(max_tokens=4, guidance=guidance)])
        assert err.value.param == param
        assert not engine.has_unfinished and not engine.guided.active
    for options in ([], [""], ["ok", 3]):
        with pytest.raises(InvalidRequestError) as err:
            Guidance.choice(options, "guided_choice")
        assert err.value.param == "guided_choice"
    assert engine.pool.num_free_blocks == engine.pool.num_blocks


def test_unconstrained_rows_are_untouched_by_a_constrained_neighbour(llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    alone = llm.generate([PROMPTS[0], PROMPTS[3]], greedy)
    mixed = llm.generate([PROMPTS[0], PROMPTS[1], PROMPTS[3]], [greedy, schema_params(seed=1), greedy])
    assert [o.outputs[0].token_ids for o in alone] == [
        mixed[0].outputs[0].token_ids,
        mixed[2].outputs[0].token_ids,
    ]
    assert_valid(mixed[1].outputs[0])


def test_a_broken_matcher_ends_its_sequence_not_the_engine(llm, monkeypatch, caplog):
    """If a forbidden token ever got through, the sequence stops with an error logged."""

    def ignore_the_grammar(self, logits, rows, grammar=None):
        return [(TOKEN_CLOSE_BRACE, None)] * len(rows)  # '}' can never start a JSON document

    monkeypatch.setattr(Sampler, "__call__", ignore_the_grammar)
    with caplog.at_level(logging.ERROR, logger="tokenmill.engine.guidance"):
        output = llm.generate(PROMPTS[0], schema_params(seed=0))[0].outputs[0]
    assert output.finish_reason == "stop" and output.token_ids == [TOKEN_CLOSE_BRACE]
    assert "grammar rejected token" in caplog.text
    assert not llm.engine.has_unfinished and not llm.engine.guided.active


async def test_async_engine_checks_from_threads_and_streams_valid_json(tiny_llama_dir):
    engine = AsyncLLM(str(tiny_llama_dir), dtype="float32", block_size=8, num_blocks=128)
    await engine.start()
    try:
        stream = engine.generate(PROMPTS[0], schema_params(seed=5), "r1")
        first = await anext(stream)
        # The HTTP layer compiles from worker threads while the engine thread is generating.
        schemas = [
            {"type": "object", "properties": {"name": {"type": "string", "maxLength": i}}} for i in range(8)
        ]
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda s: engine.check_guidance(Guidance.json_schema(s)), schemas))
        snapshots = [first] + [snapshot async for snapshot in stream]
        assert_valid(snapshots[-1].outputs[0])
        with pytest.raises(InvalidRequestError) as err:
            await anext(
                engine.generate("x", SamplingParams(guidance=Guidance.regex("(", "guided_regex")), "r2")
            )
        assert err.value.param == "guided_regex"
        await asyncio.sleep(0)
        assert engine.stats().num_running_seqs == engine.stats().num_waiting_seqs == 0
    finally:
        await engine.shutdown()
