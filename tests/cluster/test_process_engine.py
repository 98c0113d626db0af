"""ProcessEngine: replicas in worker processes keep the contract of `replica_contract` (indistinguishable from
the in-process engine to the server: same outputs, same refusals, aborts that free the worker's KV; a
worker's death ends its requests at once with EngineError, not hanging them, while the other replicas serve
on, until a new worker serves again), and everything a snapshot can carry crosses the pipe intact."""

from __future__ import annotations

import dataclasses

import pytest
import pytest_asyncio

# The shared checks assert inside a module pytest does not collect: have their failures explained too.
pytest.register_assert_rewrite("tests.cluster.replica_contract")

from tests.cluster import replica_contract  # noqa: E402 - after the rewrite is registered
from tests.cluster.replica_contract import collect  # noqa: E402
from tokenmill.cluster.process_engine import ProcessEngine  # noqa: E402
from tokenmill.engine.sampling_params import Guidance, Priority, SamplingParams  # noqa: E402

pytestmark = pytest.mark.asyncio(loop_scope="module")

# The contract's fixtures: the in-process reference engine and its outputs for `prompts()`.
reference = replica_contract.reference
expected = replica_contract.expected


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def replicas(tiny_llama_dir):
    """Two worker processes."""
    async with replica_contract.two_replicas(ProcessEngine, tiny_llama_dir) as engines:
        yield engines


async def test_two_replicas_serve_64_streams_exactly_as_the_local_engine(replicas, reference, expected):
    await replica_contract.check_same_outputs_as_local(replicas, reference, expected)


async def test_leaving_a_stream_early_or_aborting_it_frees_its_kv_in_the_worker(replicas):
    await replica_contract.check_abort_frees_kv(replicas[0])


async def test_samples_logprobs_stops_grammars_and_batch_work_cross_the_pipe_intact(replicas, reference):
    """Everything a snapshot can carry, rebuilt in the gateway from the worker's deltas."""
    cases = [
        SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12, logprobs=2),
        SamplingParams(temperature=1.0, seed=11, max_tokens=24, stop=("me ti",)),
        SamplingParams(
            temperature=0.0, max_tokens=24, stop_token_ids=tuple(reference.tokenizer(" time").input_ids)
        ),
        SamplingParams(
            temperature=1.0, seed=3, max_tokens=12, guidance=Guidance.regex("[ab]{3,8}", "guided_regex")
        ),
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, priority=Priority.BATCH),
    ]
    for i, params in enumerate(cases):
        theirs = await collect(reference.generate("Once upon a time", params, f"ref-case-{i}"))
        ours = await collect(replicas[i % 2].generate("Once upon a time", params, f"case-{i}"))
        # Nobody reads batch work token by token: its last snapshot only.
        if params.priority is Priority.BATCH:
            assert len(ours) == len(theirs) == 1
        for mine, reference_sample in zip(ours[-1].outputs, theirs[-1].outputs, strict=True):
            # Replicas compute on one thread, the reference on two: sums may round differently.
            if mine.logprobs is not None:
                assert [(lp.token_id, lp.logprob) for lp in mine.logprobs] == [
                    (lp.token_id, pytest.approx(lp.logprob, abs=1e-4)) for lp in reference_sample.logprobs
                ]
        without_logprobs = [dataclasses.replace(s, logprobs=None) for s in ours[-1].outputs]
        expected_outputs = [dataclasses.replace(s, logprobs=None) for s in theirs[-1].outputs]
        assert without_logprobs == expected_outputs


async def test_invalid_requests_are_refused_as_the_local_engine_refuses_them(replicas, reference, tmp_path):
    await replica_contract.check_refusals_match(replicas[1], reference, tmp_path)


# Last: it leaves the second worker replaced.
async def test_a_killed_worker_fails_its_streams_at_once_and_a_new_one_serves(replicas, expected):
    await replica_contract.check_a_killed_replica_fails_at_once_and_comes_back(replicas, expected)
