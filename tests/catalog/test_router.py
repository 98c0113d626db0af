"""Routing over a model's replicas: least outstanding work wins, and a full bounded queue refuses at once."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from tokenmill.catalog.router import ModelOverloaded, Replica, ReplicaPool


def _pool(num_replicas: int, max_running: int = 2, max_queue: int = 4) -> tuple[ReplicaPool, list[Any]]:
    engines = [SimpleNamespace(model_id="chat", index=i) for i in range(num_replicas)]
    replicas = [Replica(e, max_running=max_running, max_queue=max_queue) for e in engines]  # type: ignore[arg-type]
    return ReplicaPool("chat", replicas), engines


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
