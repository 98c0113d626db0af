"""The contract every out-of-process replica keeps (ProcessEngine's worker processes, RayEngine's actors): to
the server it must be indistinguishable from the in-process AsyncLLM (same outputs, same refusals, aborts
that free the replica's KV), and its death must end its requests at once with EngineError, not hang them,
while the other replicas serve on, until a new one serves again.

The checks are plain async functions, not tests (pytest collects nothing here): each engine's test module
builds its own replicas and calls them from short tests of its own, so every check runs once per replica
kind. The in-process
reference engine and its outputs are fixtures here, bound into those modules by name; `two_replicas` starts
the pair of replicas each module's own fixture hands to the checks."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from tokenmill.engine.async_engine import AsyncLLM
from tokenmill.engine.client import EngineError
from tokenmill.engine.lora import LoRARequest
from tokenmill.engine.request import RequestOutput
from tokenmill.engine.sampling_params import Guidance, InvalidRequestError, SamplingParams

ENGINE = dict(dtype="float32", block_size=8, num_blocks=256, max_num_seqs=32)
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
LONG = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
"""Outlasts any check that reads a stream's first snapshot and then leaves, aborts or kills it."""
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards"]
SAFETY_S = 60.0
"""A bound no healthy run comes near: it only turns a hang into a failure."""


def prompts() -> list[str | list[int]]:
    """Mixed lengths (1 to 40 words), every eighth one as token ids."""
    texts = [" ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(1 + (i * 13) % 40)) for i in range(64)]
    return [
        [1 + (i * 97 + k * 31) % 40000 for k in range(3 + i % 29)] if i % 8 == 7 else t
        for i, t in enumerate(texts)
    ]


async def run(
    engine, prompt: str | list[int], request_id: str, params: SamplingParams = GREEDY
) -> RequestOutput:
    snapshots = [output async for output in engine.generate(prompt, params, request_id)]
    assert snapshots[-1].finished and not any(s.finished for s in snapshots[:-1])
    texts = [s.outputs[0].text for s in snapshots]
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:], strict=False))
    return snapshots[-1]


async def collect(stream) -> list[RequestOutput]:
    return [output async for output in stream]


def comparable(output: RequestOutput) -> RequestOutput:
    """Which prompt blocks came from the prefix cache depends on which replica saw which prompts first."""
    return dataclasses.replace(output, request_id="", num_cached_tokens=0)


async def wait_until(condition, what: str) -> None:
    for _ in range(int(SAFETY_S / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting until {what}")


@contextlib.asynccontextmanager
async def two_replicas(engine_class: Callable, model_dir: Path) -> AsyncIterator[list]:
    """Two replicas of `engine_class` (ProcessEngine or a subclass), loading side by side: each imports torch
    in a process of its own, which takes seconds. Both are shut down, and unhealthy, afterwards."""
    engines = await asyncio.gather(
        *(asyncio.to_thread(engine_class, str(model_dir), torch_threads=1, **ENGINE) for _ in range(2))
    )
    for engine in engines:
        await engine.start()
    yield engines
    await asyncio.gather(*(engine.shutdown() for engine in engines))
    assert not any(engine.healthy for engine in engines)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def reference(tiny_llama_dir):
    """The in-process engine every replica is compared with."""
    engine = AsyncLLM(str(tiny_llama_dir), **ENGINE)
    await engine.start()
    yield engine
    await engine.shutdown()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def expected(reference) -> list[RequestOutput]:
    """The reference's final outputs for `prompts()`, made `comparable`."""
    finals = await asyncio.gather(*(run(reference, p, f"ref-{i}") for i, p in enumerate(prompts())))
    return [comparable(final) for final in finals]


async def check_same_outputs_as_local(replicas, reference, expected: list[RequestOutput]) -> None:
    """Two replicas, serving the 64 `prompts()` concurrently between them, answer exactly as the reference."""
    assert all(
        r.model_id == reference.model_id and r.max_model_len == reference.max_model_len for r in replicas
    )
    assert replicas[0].tokenizer("hello world").input_ids == reference.tokenizer("hello world").input_ids
    finals = await asyncio.wait_for(
        asyncio.gather(*(run(replicas[i % 2], p, f"req-{i}") for i, p in enumerate(prompts()))), SAFETY_S
    )
    assert [comparable(final) for final in finals] == expected
    assert finals[1].prompt == prompts()[1] and finals[7].prompt is None
    for replica in replicas:  # each did half the work, and holds nothing now
        stats = replica.stats()
        assert stats.num_generated_tokens >= 32 * GREEDY.max_tokens
        assert stats.num_running_seqs == 0 and stats.num_free_blocks == stats.num_total_blocks


async def check_abort_frees_kv(engine) -> None:
    """A reader that leaves its stream early, or an abort from outside, frees the request's KV in the
    replica `engine`."""
    stream = engine.generate("abort me", LONG, "leaver")
    first = await anext(stream)
    assert not first.finished and engine.stats().num_free_blocks < engine.stats().num_total_blocks
    await stream.aclose()
    await wait_until(lambda: engine.stats().num_running_seqs == 0, "the replica dropped the request")
    assert engine.stats().num_free_blocks == engine.stats().num_total_blocks

    # An abort from outside ends a reader's stream with an "abort" snapshot instead of leaving it waiting.
    stream = engine.generate("abort me too", LONG, "aborted")
    await anext(stream)
    await engine.abort("aborted")
    rest = await asyncio.wait_for(collect(stream), SAFETY_S)
    assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"
    await wait_until(lambda: engine.stats().num_running_seqs == 0, "the replica dropped the request")
    assert engine.stats().num_free_blocks == engine.stats().num_total_blocks


async def check_refusals_match(engine, reference, tmp_path: Path) -> None:
    """Every invalid request is refused with the reference's InvalidRequestError (not a subclass, not an
    EngineError), word for word; a refused request leaves nothing behind, and the replica serves on."""

    async def refusal(client, call) -> InvalidRequestError:
        with pytest.raises(InvalidRequestError) as caught:
            await call(client)
        return caught.value

    calls = [
        lambda e: anext(e.generate("x", SamplingParams(max_tokens=10**6), "too-long")),
        lambda e: anext(e.generate([e.tokenizer.vocab_size + 10**6], GREEDY, "bad-id")),
        lambda e: anext(e.generate("x", SamplingParams(guidance=Guidance.regex("(", "guided_regex")), "re")),
        lambda e: asyncio.to_thread(e.check_fits, 10, 10**6),
        lambda e: asyncio.to_thread(e.check_guidance, Guidance.regex("(unclosed", "guided_regex")),
        lambda e: asyncio.to_thread(e.check_lora, LoRARequest("missing", str(tmp_path / "no-adapter"))),
    ]
    for call in calls:
        theirs, ours = await refusal(reference, call), await refusal(engine, call)
        assert type(ours) is InvalidRequestError
        assert (ours.message, ours.param, ours.code) == (theirs.message, theirs.param, theirs.code)
    assert engine.stats().num_running_seqs == 0  # refused before any work, not started and dropped

    running = engine.generate("a duplicate", GREEDY, "twice")
    await anext(running)
    with pytest.raises(InvalidRequestError, match="already running"):
        await anext(engine.generate("a duplicate", GREEDY, "twice"))
    await running.aclose()
    # Nothing was left behind, and the engine keeps serving.
    await wait_until(lambda: engine.stats().num_running_seqs == 0, "the replica dropped the request")
    assert engine.stats().num_free_blocks == engine.stats().num_total_blocks
    assert (await run(engine, "still serving", "after")).outputs[0].finish_reason == "length"


async def check_a_killed_replica_fails_at_once_and_comes_back(
    replicas, expected: list[RequestOutput]
) -> None:
    """SIGKILL to the second replica's process (worker or actor) while it streams: its requests end with
    EngineError at once, it refuses new work the same way while the first serves on, and a new process takes
    its place by itself, with the same outputs and /metrics counters that carry on."""
    survivor, engine = replicas
    started = asyncio.Event()

    async def doomed(i: int) -> None:
        async for _ in engine.generate(f"doomed stream {i}", LONG, f"doomed-{i}"):
            started.set()

    streams = [asyncio.create_task(doomed(i)) for i in range(16)]
    meanwhile = asyncio.gather(*(run(survivor, p, f"meanwhile-{i}") for i, p in enumerate(prompts()[:8])))
    await started.wait()
    generated_before, old_pid = engine.stats().num_generated_tokens, engine.pid
    os.kill(old_pid, signal.SIGKILL)
    results = await asyncio.wait_for(asyncio.gather(*streams, return_exceptions=True), SAFETY_S)
    assert all(isinstance(result, EngineError) for result in results), results
    assert not engine.healthy and survivor.healthy
    with pytest.raises(EngineError):  # refused the same way until a new process is up
        await anext(engine.generate("too soon", GREEDY, "too-soon"))
    with pytest.raises(EngineError):
        await asyncio.to_thread(engine.check_guidance, Guidance.regex("[ab]+", "guided_regex"))
    finals = await asyncio.wait_for(meanwhile, SAFETY_S)  # the other replica served on
    assert [comparable(final) for final in finals] == expected[:8]

    await wait_until(lambda: engine.healthy, "a new process serves")  # started by itself after 0.5 s
    assert engine.pid != old_pid
    finals = await asyncio.wait_for(
        asyncio.gather(*(run(engine, p, f"again-{i}") for i, p in enumerate(prompts()[:16]))), SAFETY_S
    )
    assert [comparable(final) for final in finals] == expected[:16]
    stats = engine.stats()  # /metrics counters carry on across the restart
    assert stats.num_generated_tokens >= generated_before + 16 * GREEDY.max_tokens
    assert stats.num_running_seqs == 0 and stats.num_free_blocks == stats.num_total_blocks
