"""The scheduling policy with no model: hand-made sampled tokens, exact budgets, blocks and preemption order."""

import random

import pytest

from tokenmill.engine.block_pool import BlockPool
from tokenmill.engine.request import RequestStatus, Sequence
from tokenmill.engine.sampling_params import InvalidRequestError, SamplingParams
from tokenmill.engine.scheduler import Scheduler

EOS = 0


def make_scheduler(num_blocks=16, block_size=4, budget=16, max_seqs=8, max_len=128) -> Scheduler:
    return Scheduler(BlockPool(num_blocks, block_size), budget, max_seqs, max_len, eos_token_ids=[EOS])


def seq(seq_id: str, num_prompt: int, max_tokens: int = 4, first_token: int = 1, **params) -> Sequence:
    prompt = list(range(first_token, first_token + num_prompt))
    return Sequence(seq_id, seq_id, 0, prompt, num_prompt, SamplingParams(max_tokens=max_tokens, **params))


def step(sched: Scheduler, token: int = 7):
    batch = sched.schedule()
    sched.update(batch, [token] * len(batch.sampling_items))
    return batch


def test_chunked_prefill_respects_budget_then_decodes():
    sched = make_scheduler(budget=8)
    s = seq("a", 20)
    sched.add(s)
    sizes = [item.num_new_tokens for item in step(sched).items]
    assert sizes == [8] and s.num_output_tokens == 0
    assert [i.num_new_tokens for i in step(sched).items] == [8]
    batch = step(sched)
    assert [i.num_new_tokens for i in batch.items] == [4] and batch.items[0].samples
    assert s.num_output_tokens == 1 and s.num_computed_tokens == 20
    assert [i.num_new_tokens for i in step(sched).items] == [1]


def test_decodes_and_prefill_chunks_share_one_step():
    sched = make_scheduler(budget=10)
    a, b = seq("a", 3), seq("b", 30, first_token=100)
    sched.add(a)
    step(sched)
    sched.add(b)
    batch = step(sched)
    assert [(i.seq.seq_id, i.num_new_tokens) for i in batch.items] == [("a", 1), ("b", 9)]


def test_max_num_seqs_caps_running():
    sched = make_scheduler(max_seqs=2, budget=100, num_blocks=64)
    for i in range(3):
        sched.add(seq(str(i), 4, first_token=10 * i + 1))
    batch = step(sched)
    assert [i.seq.seq_id for i in batch.items] == ["0", "1"]
    assert len(sched.waiting) == 1


def test_preempts_newest_when_blocks_run_out_and_recomputes_it():
    sched = make_scheduler(num_blocks=4, block_size=4, budget=64)
    old, new = seq("old", 7, max_tokens=6), seq("new", 7, max_tokens=6, first_token=50)
    sched.add(old)
    sched.add(new)
    step(sched)  # both prefilled: 2 blocks each, pool full
    assert sched.pool.num_free_blocks == 0
    batch = step(sched)  # both decode position 7 (fits in block 2); then old needs a 3rd block
    batch = step(sched)
    assert [s.seq_id for s in batch.preempted] == ["new"]
    assert new.status == RequestStatus.PREEMPTED and new.num_computed_tokens == 0 and new.block_ids == []
    assert sched.waiting[0] is new
    while sched.has_work:
        step(sched)
    assert old.num_output_tokens == 6 and new.num_output_tokens == 6
    assert new.num_preemptions >= 1
    sched.pool.check_invariants()
    assert sched.pool.num_free_blocks == 4


def test_prefix_hit_skips_cached_blocks_but_recomputes_last_token():
    sched = make_scheduler(block_size=4, budget=64)
    first = seq("first", 12, max_tokens=1)
    sched.add(first)
    step(sched)
    assert first.finished
    second = seq("second", 12, max_tokens=1)
    sched.add(second)
    batch = step(sched)
    # 12 tokens = 3 full blocks; 2 are reused, the last block is recomputed to produce logits.
    assert batch.items[0].start == 8 and batch.items[0].num_new_tokens == 4
    assert second.num_cached_tokens == 8
    different = seq("third", 12, max_tokens=1, first_token=2)
    sched.add(different)
    assert step(sched).items[0].start == 0


def test_request_that_can_never_fit_is_rejected_up_front():
    sched = make_scheduler(num_blocks=2, block_size=4, max_len=100)
    with pytest.raises(InvalidRequestError) as err:
        sched.add(seq("big", 8, max_tokens=4))
    assert err.value.param == "max_tokens"
    with pytest.raises(InvalidRequestError) as err:
        sched.add(seq("long", 98, max_tokens=4))
    assert err.value.code == "context_length_exceeded"
    assert not sched.has_work


def test_eos_stop_token_and_length():
    sched = make_scheduler()
    a = seq("a", 2, max_tokens=5)
    b = seq("b", 2, max_tokens=5, stop_token_ids=[9], first_token=20)
    c = seq("c", 2, max_tokens=2, first_token=40)
    d = seq("d", 2, max_tokens=5, min_tokens=3, first_token=60)
    for s in (a, b, c, d):
        sched.add(s)
    batch = sched.schedule()
    sched.update(batch, [EOS, 9, 5, EOS])
    assert a.status == RequestStatus.FINISHED_STOPPED and a.stop_reason is None
    assert b.status == RequestStatus.FINISHED_STOPPED and b.stop_reason == 9
    assert not c.finished and not d.finished  # d: eos before min_tokens does not stop
    step(sched)
    assert c.status == RequestStatus.FINISHED_LENGTH


def test_abort_frees_blocks_at_once():
    sched = make_scheduler()
    s = seq("a", 10, max_tokens=50)
    sched.add(s)
    step(sched)
    assert sched.pool.num_free_blocks < 16
    assert sched.abort(["a"]) == [s]
    assert s.status == RequestStatus.FINISHED_ABORTED
    assert sched.pool.num_free_blocks == 16 and not sched.has_work


def test_randomized_runs_leak_no_blocks():
    rng = random.Random(0)
    sched = make_scheduler(num_blocks=12, block_size=4, budget=12, max_seqs=4)
    seqs = []
    for i in range(40):
        s = seq(str(i), rng.randint(1, 20), max_tokens=rng.randint(1, 12), first_token=rng.randint(1, 3))
        sched.add(s)
        seqs.append(s)
        for _ in range(rng.randint(0, 3)):
            step(sched, token=rng.randint(1, 5))
        if rng.random() < 0.1:
            sched.abort([seqs[rng.randrange(len(seqs))].seq_id])
        sched.pool.check_invariants()
    while sched.has_work:
        step(sched, token=rng.randint(1, 5))
    sched.pool.check_invariants()
    assert sched.pool.num_free_blocks == 12
    assert all(s.finished for s in seqs)
    assert all(
        s.num_output_tokens == s.params.max_tokens for s in seqs if s.status == RequestStatus.FINISHED_LENGTH
    )
