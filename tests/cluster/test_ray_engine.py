"""RayEngine: replicas in Ray actors keep the contract of `replica_contract` (indistinguishable from the
in-process engine to the server: same outputs, same refusals, aborts that free the actor's KV; an actor's
death ends its requests at once with EngineError while the other replicas serve on, until a new actor serves
again), also when Ray itself kills the actor; and a replica that could never start says why at once instead
of waiting forever."""

from __future__ import annotations

import asyncio
import subprocess
import time

import pytest
import pytest_asyncio

ray = pytest.importorskip("ray", reason="the Ray replicas need ray (pip install 'ray>=2.60')")

# The shared checks assert inside a module pytest does not collect: have their failures explained too.
pytest.register_assert_rewrite("tests.cluster.replica_contract")

from tests.cluster import replica_contract  # noqa: E402 - after the skip
from tests.cluster.replica_contract import ENGINE, SAFETY_S, run, wait_until  # noqa: E402
from tokenmill.cluster.ray_engine import RayEngine  # noqa: E402
from tokenmill.config import ConfigError  # noqa: E402
from tokenmill.models.errors import ModelLoadError  # noqa: E402

pytestmark = pytest.mark.asyncio(loop_scope="module")

# The contract's fixtures: the in-process reference engine and its outputs for `prompts()`.
reference = replica_contract.reference
expected = replica_contract.expected

CLUSTER_CPUS = 2


def ray_processes() -> set[int]:
    found = subprocess.run(["pgrep", "-f", "raylet|gcs_server"], capture_output=True, text=True).stdout
    return {int(pid) for pid in found.split()}


@pytest.fixture(scope="module")
def cluster():
    """A fresh local cluster ("local": never one a `ray start` left running); its ports are the OS's choice,
    so it cannot take Redis's 6379. Its processes are gone after the module."""
    before = ray_processes()
    ray.init(address="local", num_cpus=CLUSTER_CPUS, include_dashboard=False, logging_level="WARNING")
    ours = ray_processes() - before
    assert ours, "the local cluster's raylet and GCS server were not found"
    yield
    ray.shutdown()
    deadline = time.monotonic() + SAFETY_S
    while ours & ray_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not ours & ray_processes(), "ray.shutdown() left Ray processes behind"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def replicas(cluster, tiny_llama_dir):
    """Two actors of one CPU each: the whole cluster."""
    async with replica_contract.two_replicas(RayEngine, tiny_llama_dir) as engines:
        yield engines


async def test_two_actors_serve_64_streams_exactly_as_the_local_engine(replicas, reference, expected):
    # Each actor is a process of its own, placed by Ray on this machine's (the only) node.
    assert (
        replicas[0].pid != replicas[1].pid and replicas[0].node_id == ray.get_runtime_context().get_node_id()
    )
    await replica_contract.check_same_outputs_as_local(replicas, reference, expected)


async def test_leaving_a_stream_early_or_aborting_it_frees_its_kv_in_the_actor(replicas):
    await replica_contract.check_abort_frees_kv(replicas[0])


async def test_invalid_requests_are_refused_as_the_local_engine_refuses_them(replicas, reference, tmp_path):
    await replica_contract.check_refusals_match(replicas[1], reference, tmp_path)


async def test_a_killed_actor_fails_its_streams_at_once_and_a_new_one_serves(replicas, expected):
    await replica_contract.check_a_killed_replica_fails_at_once_and_comes_back(replicas, expected)

    # An idle actor killed through Ray (no Ray restart asked for) is noticed and replaced all the same.
    engine = replicas[1]
    ray.kill(engine.actor, no_restart=True)
    await wait_until(lambda: not engine.healthy, "the death was noticed")
    await wait_until(lambda: engine.healthy, "a new actor serves")
    assert (await run(engine, "back again", "back")).outputs[0].finish_reason == "length"


async def test_a_replica_no_node_can_host_is_refused_naming_the_resource(cluster, tiny_llama_dir):
    with pytest.raises(ConfigError, match=r"num_gpus: .*'[^']*tiny-llama[^']*'.*1 GPU.*0 GPU") as caught:
        await asyncio.to_thread(RayEngine, str(tiny_llama_dir), num_gpus=1, **ENGINE)
    assert f"{CLUSTER_CPUS} CPU" in str(caught.value)
    with pytest.raises(ConfigError, match=r"num_cpus: .*3 CPU"):
        await asyncio.to_thread(RayEngine, str(tiny_llama_dir), num_cpus=CLUSTER_CPUS + 1, **ENGINE)


async def test_an_unreachable_cluster_is_refused_without_touching_the_connected_one(cluster, tiny_llama_dir):
    with pytest.raises(ConfigError, match=r"address: .*tiny-llama.*'127.0.0.1:1' could not be reached"):
        await asyncio.to_thread(RayEngine, str(tiny_llama_dir), address="127.0.0.1:1", **ENGINE)
    # Ray Client cannot stream from an actor: refused up front rather than failing at the first request.
    with pytest.raises(ConfigError, match=r"address: .*tiny-llama.*Ray Client \('ray://127.0.0.1:1'\)"):
        await asyncio.to_thread(RayEngine, str(tiny_llama_dir), address="ray://127.0.0.1:1", **ENGINE)
    assert ray.is_initialized() and ray.cluster_resources()["CPU"] == CLUSTER_CPUS


async def test_a_model_that_does_not_load_raises_the_engines_own_error(cluster, tmp_path):
    # No CPU asked for: it is placed even while the replicas hold the whole cluster.
    with pytest.raises(ModelLoadError) as caught:
        await asyncio.to_thread(RayEngine, str(tmp_path / "no-model"), num_cpus=0, **ENGINE)
    assert type(caught.value) is ModelLoadError and "no-model" in str(caught.value)
