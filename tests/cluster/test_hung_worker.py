"""A worker that stops answering without dying (here: SIGSTOP, as a process stuck holding the GIL would
look) is taken for hung once it has been silent for `hung_after_s`: it is killed, its requests end with
EngineError instead of waiting forever, and a new worker serves. An idle worker is never taken for hung: it
reports every second."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from tokenmill.cluster.process_engine import ProcessEngine
from tokenmill.cluster.worker import HEARTBEAT_S
from tokenmill.engine.client import EngineError
from tokenmill.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.asyncio(loop_scope="function")

ENGINE = dict(dtype="float32", block_size=8, num_blocks=64, max_num_seqs=4)
LONG = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
SAFETY_S = 60.0


async def test_a_silent_worker_is_killed_and_replaced(tiny_llama_dir):
    engine = await asyncio.to_thread(
        ProcessEngine, str(tiny_llama_dir), torch_threads=1, hung_after_s=3 * HEARTBEAT_S, **ENGINE
    )
    await engine.start()
    try:
        # Idle for longer than hung_after_s: its heartbeats keep it alive.
        first_pid = engine.pid
        idle_until = time.monotonic() + 5 * HEARTBEAT_S
        while time.monotonic() < idle_until:
            assert engine.healthy and engine.pid == first_pid
            await asyncio.sleep(0.1)

        stream = engine.generate("the sea", LONG, "stuck")
        await anext(stream)
        assert first_pid is not None
        os.kill(first_pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(EngineError):
            await asyncio.wait_for(_drain(stream), SAFETY_S)
        assert time.monotonic() - started < SAFETY_S

        deadline = time.monotonic() + SAFETY_S
        while not (engine.healthy and engine.pid != first_pid):
            assert time.monotonic() < deadline, "no new worker"
            await asyncio.sleep(0.05)
        outputs = [o async for o in engine.generate("the sea", SamplingParams(max_tokens=4), "after")]
        assert outputs[-1].finished and len(outputs[-1].outputs[0].token_ids) == 4
    finally:
        await engine.shutdown()


async def _drain(stream) -> None:
    async for _ in stream:
        pass
