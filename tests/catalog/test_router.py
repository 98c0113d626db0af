"""Routing over a model's replicas: least outstanding work wins, and a full bounded queue refuses at once."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from tokenmill.catalog.prefix_affinity import PrefixAffinity
from tokenmill.catalog.router import ModelOverloaded, Replica, ReplicaPool


def _pool(
    num_replicas: int, max_running: int = 2, max_queue: int = 4, routing: str = "least-load"
) -> tuple[ReplicaPool, list[Any]]:
    engines = [SimpleNamespace(model_id="chat", index=i, healthy=True) for i in range(num_replicas)]
    replicas = [Replica(e, max_running=max_running, max_queue=max_queue) for e in engines]  # type: ignore[arg-type]
    return ReplicaPool("chat", replicas, routing), engines


def test_work_goes_to_the_replica_with_the_least_outstanding_tokens():
    pool, engines = _pool(2, max_running=8, max_queue=8)
    long_request = pool.assign(work_tokens=1000)
    assert long_request.engine is engines[0]  # a tie goes to the first replica
    short = [pool.assign(work_tokens=100) for _ in range(5)]
    # Five short requests (500 tokens) are still less work than the one long request.
    assert all(a.engine is engines[1] for a in short)
    assert pool.replicas[1].outstanding_tokens == 500 and pool.replicas[0].outstanding_tokens == 1000
    assert pool.assign(work_tokens=600).engine is engines[1]  # 500 < 1000: the emptier one, by tokens
    long_request.release()
    assert pool.replicas[0].outstanding_tokens == 0
    assert pool.assign(work_tokens=10).engine is engines[0]


def test_equal_work_goes_to_the_replica_with_fewer_sequences():
    pool, engines = _pool(3)
    assert pool.assign(work_tokens=0, num_seqs=2).engine is engines[0]
    assert pool.assign(work_tokens=0, num_seqs=1).engine is engines[1]
    assert pool.assign(work_tokens=0).engine is engines[2]
    assert pool.assign(work_tokens=0).engine is engines[1]
    assert pool.in_flight_seqs == 5


def test_a_full_bounded_queue_refuses_at_once_and_release_frees_room():
    pool, _ = _pool(1, max_running=2, max_queue=4)
    held = [pool.assign(work_tokens=50) for _ in range(6)]  # 2 running + 4 waiting
    assert not pool.replicas[0].has_room
    with pytest.raises(ModelOverloaded) as refused:
        pool.assign(work_tokens=50)
    assert refused.value.model == "chat" and refused.value.retry_after_s >= 1
    assert "queue is full" in str(refused.value)
    assert pool.in_flight_seqs == 6  # the refusal took nothing

    held[0].release()
    held[0].release()  # a second release is harmless and frees nothing more
    assert pool.in_flight_seqs == 5
    held.append(pool.assign(work_tokens=50))
    with pytest.raises(ModelOverloaded):
        pool.assign(work_tokens=50)
    for assignment in held:
        assignment.release()
    assert pool.in_flight_seqs == 0 and pool.replicas[0].outstanding_tokens == 0


def test_several_sequences_go_where_all_of_them_fit():
    pool, engines = _pool(2, max_running=2, max_queue=1)  # 3 seats per replica
    assert pool.assign(work_tokens=1000).engine is engines[0]
    assert pool.assign(work_tokens=10, num_seqs=2).engine is engines[1]
    # Replica 1 has less work but one seat left; only replica 0 can seat two more.
    assert pool.assign(work_tokens=10, num_seqs=2).engine is engines[0]
    with pytest.raises(ModelOverloaded):
        pool.assign(work_tokens=10, num_seqs=2)  # one seat left in all
    assert pool.assign(work_tokens=10).engine is engines[1]


def test_a_request_larger_than_any_replica_is_overloaded_not_an_error():
    pool, _ = _pool(2, max_running=2, max_queue=1)
    with pytest.raises(ModelOverloaded):
        pool.assign(work_tokens=10, num_seqs=4)
    assert pool.in_flight_seqs == 0


def test_a_replica_that_is_down_gets_nothing_until_it_is_back():
    pool, engines = _pool(2, max_running=8, max_queue=8)
    engines[0].healthy = False  # its worker process died and is restarting
    assert all(pool.assign(work_tokens=10).engine is engines[1] for _ in range(4))
    engines[1].healthy = False
    with pytest.raises(ModelOverloaded, match="every replica is restarting") as refused:
        pool.check_room()
    assert refused.value.retry_after_s == 2
    engines[0].healthy = True
    assert pool.assign(work_tokens=10).engine is engines[0]


SYSTEM_A = list(range(1000, 1256))  # 256 tokens (16 whole blocks) of a shared system prompt
SYSTEM_B = list(range(2000, 2256))


def test_prefix_routing_counts_a_warm_cache_as_work_the_replica_will_not_do():
    pool, engines = _pool(2, max_running=8, max_queue=8, routing="prefix")
    assert pool.assign(300, prompt_ids=SYSTEM_A + [1]).engine is engines[0]  # no history: by load
    assert pool.assign(300, prompt_ids=SYSTEM_B + [1]).engine is engines[1]
    assert pool.assign(200, prompt_ids=[5] * 10).engine is engines[0]  # a tie; now 500 vs 300
    # A's 256 tokens are cached on replica 0: 500 - 256 < 300, so A goes there though it is busier, and
    # the replica is counted only the work it will do.
    assert pool.assign(300, prompt_ids=SYSTEM_A + [2]).engine is engines[0]
    assert pool.num_warm_routed == 1 and pool.replicas[0].outstanding_tokens == 500 + 300 - 256
    assert pool.assign(1000, prompt_ids=SYSTEM_A + [3]).engine is engines[0]  # 544 - 256 < 300: warm
    # Load wins once the warm replica is busier by more than the cache saves (1288 - 256 > 300).
    assert pool.assign(300, prompt_ids=SYSTEM_A + [4]).engine is engines[1]
    # Under least-load routing a prefix counts for nothing.
    plain, plain_engines = _pool(2, max_running=8, max_queue=8, routing="least-load")
    plain.assign(300, prompt_ids=SYSTEM_A)
    assert plain.assign(300, prompt_ids=SYSTEM_A).engine is plain_engines[1]


def test_a_computed_prompt_no_longer_counts_as_work_so_a_repeat_finds_its_cache():
    pool, engines = _pool(2, max_running=8, max_queue=8, routing="prefix")
    first = pool.assign(300, prompt_ids=SYSTEM_A + [1])
    assert first.engine is engines[0]
    # While its prompt is computing, replica 0 is busier than its cache saves (300 - 256 > 0): a repeat
    # goes to the idle replica.
    assert pool.assign(300, prompt_ids=SYSTEM_A + [2]).engine is engines[1]
    second = pool.assign(300, prompt_ids=SYSTEM_B).engine
    assert second is engines[0]  # 300 < 600
    first.done(257)  # its prompt is computed; 43 tokens left to generate
    assert pool.replicas[0].outstanding_tokens == 43 + 300
    first.done(1000)  # never below nothing
    assert pool.replicas[0].outstanding_tokens == 300
    first.release()
    assert pool.replicas[0].outstanding_tokens == 300 and pool.in_flight_seqs == 2


def test_a_warm_replica_that_would_make_the_request_queue_loses_it_to_an_idle_one():
    pool, engines = _pool(2, max_running=2, max_queue=8, routing="prefix")
    assert pool.assign(300, prompt_ids=SYSTEM_A).engine is engines[0]
    assert pool.assign(300, prompt_ids=SYSTEM_B).engine is engines[1]
    assert pool.assign(300, prompt_ids=SYSTEM_A + [1]).engine is engines[0]  # warm, and runs at once
    # Replica 0 is warmer still, but both its seats are taken: replica 1 runs the request now.
    assert pool.assign(300, prompt_ids=SYSTEM_A + [2]).engine is engines[1]


def test_prefixes_of_different_adapters_never_match():
    affinity = PrefixAffinity()
    base, adapted = affinity.hashes(SYSTEM_A), affinity.hashes(SYSTEM_A, salt="adapter-x")
    assert len(base) == len(adapted) == 16 and not set(base) & set(adapted)
    affinity.record(base, 0)
    assert affinity.owner(adapted) is None and affinity.owner(base + adapted[:1]) == (0, 256)


def test_a_restarted_replica_is_no_longer_warm():
    pool, engines = _pool(2, max_running=8, max_queue=8, routing="prefix")
    pool.assign(300, prompt_ids=SYSTEM_A)  # replica 0 holds A
    pool.assign(400, prompt_ids=[7] * 20)  # replica 1: 400 vs 300
    engines[0].healthy = False
    assert pool.assign(50, prompt_ids=[5] * 20).engine is engines[1]  # only one up
    engines[0].healthy = True  # back, with an empty cache: A is no longer counted as cached there
    assert pool.assign(300, prompt_ids=SYSTEM_A).engine is engines[0]  # 300 < 450 by load alone ...
    assert pool.num_warm_routed == 0  # ... not as a warm choice


def test_session_routing_keeps_a_users_requests_on_one_replica():
    pool, engines = _pool(3, max_running=2, max_queue=8, routing="session")
    first = pool.assign(10, prompt_ids=[1, 2], session="alice")
    assert first.engine is engines[0]  # no history: by load
    assert pool.assign(500, session="bob").engine is engines[1]
    # alice comes back to replica 0 though replica 2 is idle; another user is spread by load.
    assert pool.assign(100, prompt_ids=[9], session="alice").engine is engines[0]
    assert pool.assign(10, session="carol").engine is engines[2]
    # Replica 0's two seats are taken: alice would queue there while replica 2 runs her at once.
    moved = pool.assign(10, session="alice")
    assert moved.engine is engines[2]
    assert pool.assign(10, session="alice").engine is engines[2]  # and she stays where she went
    # Requests naming no user are routed by their prefix (least-load would send the last one to replica 1).
    pool, engines = _pool(2, max_running=8, max_queue=8, routing="session")
    assert pool.assign(300, prompt_ids=SYSTEM_A).engine is engines[0]
    assert pool.assign(300, prompt_ids=SYSTEM_B).engine is engines[1]
    assert pool.assign(200, prompt_ids=[5] * 10).engine is engines[0]
    assert pool.assign(300, prompt_ids=SYSTEM_A + [2]).engine is engines[0]
